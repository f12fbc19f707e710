"""The user's path in examples/: train a pruned twin, serve it, query it as a robot would."""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import child_env
from openpi.models import model as _model

from openpi_prune.pruner import methods

pytestmark = pytest.mark.slow  # three interpreters, a short training run and a server: a few minutes

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(*args, **kwargs):
    return subprocess.run([sys.executable, *args], env=child_env(), cwd=EXAMPLES, text=True, **kwargs)


def test_train_serve_and_query_a_pruned_twin(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import train_twin

    folder, state = train_twin.main(tmp_path, steps=3)
    assert folder == tmp_path / "checkpoints" / "small_pi05_prune" / "example" / "3"
    # OpenPI's checkpoint holds the trained pruner exactly, and it did train (it is not the fresh head).
    restored = _model.restore_params(folder / "params", restore_type=np.ndarray)
    config = train_twin.train_config(tmp_path, steps=3)
    initial = train_twin.init_train_state(config, jax.random.key(config.seed)).params
    for name in (methods.RELEVANCE_QUERY, methods.RELEVANCE_KEY):
        trained = np.asarray(state.params[name].value)
        np.testing.assert_array_equal(restored[name], trained)
        assert not np.allclose(trained, np.asarray(initial[name].value)), name
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENPI_PRUNE")}
    server = subprocess.Popen(
        [sys.executable, "serve_twin.py", "--out", str(tmp_path), "--port", str(port)],
        cwd=EXAMPLES,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        client = _run("robot_client.py", "--port", str(port), "--steps", "2", capture_output=True, timeout=900)
    finally:
        server.kill()
        server.wait()
    assert client.returncode == 0, client.stderr[-3000:]
    lines = [line for line in client.stdout.splitlines() if line.startswith("step")]
    assert len(lines) == 2, client.stdout
    for line in lines:
        kept, live = map(int, re.search(r"kept (\d+) of (\d+) live", line).groups())
        assert live == 512 and 0 < kept < live, line  # two live cameras of 256; the third masked
