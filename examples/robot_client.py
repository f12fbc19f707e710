"""Query a policy server as a robot would: OpenPI's `openpi-client`, one observation per control step.

Each observation has two live cameras and a masked third, as LIBERO's have, and a tokenized prompt.
The server (`serve_twin.py`) answers with an action chunk and what the pruner kept for it.
Run: .venv/bin/python examples/robot_client.py [--port 8000] [--steps 3]
"""

import argparse
import socket
import time

import numpy as np
from openpi_client import websocket_client_policy


def observation(step: int) -> dict:
    rng = np.random.default_rng(step)
    image = lambda: rng.uniform(-1, 1, (224, 224, 3)).astype(np.float32)  # noqa: E731
    tokens = np.zeros(32, np.int32)  # the small config's max_token_len
    tokens[:6] = [2, 4968, 908, 573, 3868, 3963]  # a prompt, already tokenized
    return {
        "image": {"base_0_rgb": image(), "left_wrist_0_rgb": image(), "right_wrist_0_rgb": image()},
        "image_mask": {"base_0_rgb": np.True_, "left_wrist_0_rgb": np.True_, "right_wrist_0_rgb": np.False_},
        "state": rng.normal(size=32).astype(np.float32),
        "tokenized_prompt": tokens,
        "tokenized_prompt_mask": np.arange(32) < 6,
    }


def wait_for(port: int, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def main(port: int, steps: int) -> list[dict]:
    wait_for(port)
    client = websocket_client_policy.WebsocketClientPolicy(host="127.0.0.1", port=port)
    responses = []
    for step in range(steps):
        response = client.infer(observation(step))
        pruning = response["pruning"]
        print(
            f"step {step}: actions {response['actions'].shape}, kept {pruning['kept']} of "
            f"{pruning['live_image_tokens']} live image tokens {pruning['kept_per_camera'].tolist()}, "
            f"prefix {pruning['prefix_length']} positions, {response['policy_timing']['infer_ms']:.0f} ms"
        )
        responses.append(response)
    return responses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    main(args.port, args.steps)
