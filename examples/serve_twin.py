"""Serve the pruned twin trained by `train_twin.py` the way OpenPI serves any checkpoint.

OpenPI's `create_trained_policy` on the twin's config and checkpoint, behind its
`WebsocketPolicyServer`. Every response carries the call's pruning figures (`response["pruning"]`).
Run: .venv/bin/python examples/serve_twin.py --out /tmp/twin [--port 8000]
"""

import argparse
import pathlib

import numpy as np
from openpi.policies import policy_config
from openpi.serving import websocket_policy_server
from openpi.shared import normalize
from train_twin import SIGLIP, train_config

from openpi_prune import configs
from openpi_prune.tools import small


def create_policy(out: pathlib.Path):
    # Training ran with telemetry off; serving reports it, so responses carry the pruning figures.
    config = configs.with_pruning(train_config(out, steps=1), telemetry=True)
    step = max(int(p.name) for p in config.checkpoint_dir.iterdir() if p.name.isdigit())
    # The fake data has no norm stats; a real config's come from the checkpoint's assets.
    identity = normalize.NormStats(mean=np.zeros(32), std=np.ones(32), q01=-np.ones(32), q99=np.ones(32))
    with small.siglip_variant(SIGLIP):
        return policy_config.create_trained_policy(
            config,
            config.checkpoint_dir / str(step),
            norm_stats={"state": identity, "actions": identity},
            sample_kwargs={"num_steps": 10},
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("twin-example"))
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    policy = create_policy(args.out)
    print(f"serving the pruned twin on port {args.port}", flush=True)
    websocket_policy_server.WebsocketPolicyServer(policy, host="127.0.0.1", port=args.port).serve_forever()
