"""Serving a pruned twin behind OpenPI's WebsocketPolicyServer to the real openpi-client."""

import socket
import threading
import time
import warnings

import jax
import numpy as np
import pytest
from conftest import run_child, small_train_config
from openpi.policies import policy_config
from openpi.serving import websocket_policy_server
from openpi_client import websocket_client_policy

import openpi_prune
from openpi_prune import configs
from openpi_prune.errors import UntrainedParametersWarning
from openpi_prune.tools import small


def _train_config(cfg, folder):
    assert cfg == small.config(pi05=True)
    return small_train_config("plain", "plain", folder / "no-assets-here")


def _serve(policy) -> websocket_client_policy.WebsocketClientPolicy:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = websocket_policy_server.WebsocketPolicyServer(policy, host="127.0.0.1", port=port)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    deadline = time.monotonic() + 60
    while True:  # this openpi-client connects once, without waiting for the server
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    return websocket_client_policy.WebsocketClientPolicy(host="127.0.0.1", port=port)


@pytest.fixture(scope="module")
def example(plain_checkpoint):
    cfg, _, _ = plain_checkpoint
    obs = small.observation(cfg, batch_size=1, camera_masks={"right_wrist_0_rgb": [False]})
    return jax.tree.map(lambda x: np.asarray(x[0]), obs.to_dict())


def test_the_client_receives_actions_and_this_call_s_pruning(plain_checkpoint, example):
    cfg, _, folder = plain_checkpoint
    twin = configs.with_pruning(_train_config(cfg, folder))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedParametersWarning)  # a plain checkpoint: fresh head
        with small.siglip_variant("mu/14"):
            policy = policy_config.create_trained_policy(twin, folder, sample_kwargs={"num_steps": 1})
    client = _serve(policy)
    response = client.infer(example)
    assert response["actions"].shape == (cfg.action_horizon, cfg.action_dim)
    assert np.isfinite(response["actions"]).all()
    figures = response["pruning"]
    assert figures["method"] == "relevance"
    assert figures["live_image_tokens"] == 512  # two live cameras of 256
    assert figures["kept"] == np.ceil(0.2 * 512) < figures["live_image_tokens"]
    assert figures["kept_per_camera"].tolist()[2] == 0 and sum(figures["kept_per_camera"]) == figures["kept"]
    assert figures["kept_patches"].shape == (3, 256)
    assert figures["kept_patches"].sum(axis=1).tolist() == figures["kept_per_camera"].tolist()
    assert figures["merged_patches"].shape == (3, 256) and not figures["merged_patches"].any()  # none merge
    assert figures["prefix_length"] == 154 + cfg.max_token_len  # compact: 20 % of 768 slots, then the prompt
    # The next call reports its own prefix: the masked camera now live.
    example3 = {**example, "image_mask": {**example["image_mask"], "right_wrist_0_rgb": np.True_}}
    assert client.infer(example3)["pruning"]["live_image_tokens"] == 768


def test_a_merging_twin_tells_the_client_which_kept_slots_hold_a_region_s_mean(plain_checkpoint, example):
    cfg, _, folder = plain_checkpoint
    twin = configs.with_pruning(_train_config(cfg, folder), merge_unkept=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedParametersWarning)
        with small.siglip_variant("mu/14"):
            policy = policy_config.create_trained_policy(twin, folder, sample_kwargs={"num_steps": 1})
    figures = _serve(policy).infer(example)["pruning"]
    kept, merged = figures["kept_patches"], figures["merged_patches"]
    assert merged.sum(axis=1).tolist() == [4, 4, 0]  # a region mean per quarter of each live camera
    assert not (merged & ~kept).any()  # each sits in a kept slot: the first unkept patch of its quarter
    assert (kept & ~merged).sum() == np.ceil(0.2 * 512)  # the head's picks, as many as without merging
    assert kept.sum(axis=1).tolist() == figures["kept_per_camera"].tolist()


def test_without_pruning_the_response_is_upstream_s(plain_checkpoint, example):
    cfg, _, folder = plain_checkpoint
    openpi_prune.disable()

    def policy():  # each starts from OpenPI's default rng: the same first actions
        with small.siglip_variant("mu/14"):
            return policy_config.create_trained_policy(
                _train_config(cfg, folder), folder, sample_kwargs={"num_steps": 1}
            )

    response = _serve(policy()).infer(example)
    direct = policy().infer(example)
    assert set(response) == set(direct) | {"server_timing"} and "pruning" not in response
    np.testing.assert_array_equal(response["actions"], direct["actions"])


BASE_INSTALL = """
import json, sys
sys.modules["matplotlib"] = None  # as on a base install, without the tools extra (rich comes with Flax)
import jax, numpy as np
from openpi.policies import policy as _policy
import openpi_prune
from openpi_prune.tools import small
cfg = small.config(pi05=True)
example = jax.tree.map(lambda x: np.asarray(x[0]), small.observation(cfg).to_dict())
response = _policy.Policy(small.create(cfg), sample_kwargs={"num_steps": 1}).infer(example)
print(json.dumps({"enabled": openpi_prune.is_enabled(), "figures": sorted(response["pruning"]),
                  "kept": response["pruning"]["kept"],
                  "tools": sorted(m for m in sys.modules if m.startswith("openpi_prune.tools."))}))
"""


def test_a_base_install_serves_pruned_without_the_tools_extra():
    result = run_child(BASE_INSTALL, OPENPI_PRUNE="1")
    assert result["enabled"] and result["kept"] == 154  # 20 % of three cameras' 768 patches
    assert result["figures"] == [
        "kept",
        "kept_patches",
        "kept_per_camera",
        "live_image_tokens",
        "merged_patches",
        "method",
        "prefix_length",
    ]
    assert result["tools"] == ["openpi_prune.tools.small"]  # the test's model; serving needs no tool
