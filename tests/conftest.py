"""Shared real OpenPI models: created once per session (a few seconds each on a CPU)."""

import os

import pytest

# The tests choose their settings themselves.
for _var in [v for v in os.environ if v.startswith("OPENPI_PRUNE")]:
    del os.environ[_var]

import jax  # noqa: E402
import numpy as np  # noqa: E402

import openpi_prune  # noqa: E402
from openpi_prune import telemetry  # noqa: E402
from openpi_prune.pruner import plugins  # noqa: E402
from openpi_prune.tools import small  # noqa: E402


def _create(pi05: bool):
    # Created while Scheme B is on, so the models carry its projector; unpatched OpenPI ignores it.
    with openpi_prune.enabled(method="scheme_b"):
        cfg = small.config(pi05=pi05)
        return cfg, small.create(cfg)


@pytest.fixture(scope="session")
def pi05():
    return _create(pi05=True)


@pytest.fixture(scope="session")
def pi0():
    return _create(pi05=False)


@pytest.fixture(scope="session")
def plain_checkpoint(tmp_path_factory):
    """A small pi0.5 saved as OpenPI lays out a checkpoint, by a model made without openpi-prune:
    `params/` (orbax, `{"params": ...}`, what `restore_params` reads) and `assets/plain/norm_stats.json`.
    Returns the config, the params and the checkpoint folder."""
    import numpy as np
    import orbax.checkpoint as ocp
    from flax import nnx
    from openpi.shared import normalize

    with openpi_prune.disabled():
        cfg = small.config(pi05=True)
        params = nnx.state(small.create(cfg), nnx.Param).to_pure_dict()
    folder = tmp_path_factory.mktemp("checkpoint")
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(folder / "params", {"params": params})
    dim = cfg.action_dim
    stats = normalize.NormStats(mean=np.zeros(dim), std=np.ones(dim), q01=-np.ones(dim), q99=np.ones(dim))
    normalize.save(folder / "assets" / "plain", {"state": stats, "actions": stats})
    return cfg, params, folder


@pytest.fixture(scope="session")
def relevance_model(pi05):
    """The small pi0.5 with the relevance head (fresh, seed 1)."""
    cfg, _ = pi05
    with openpi_prune.enabled(method="relevance"):
        return cfg, small.create(cfg, seed=1)


@pytest.fixture(scope="session")
def relevance_hidden_model(pi05):
    """The small pi0.5 with a relevance head of hidden width 16 (fresh, seed 2)."""
    cfg, _ = pi05
    with openpi_prune.enabled(method="relevance", relevance_hidden=16):
        return cfg, small.create(cfg, seed=2)


@pytest.fixture(params=["pi0", "pi05"])
def any_model(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module", autouse=True)
def _free_compiled_code():
    """Drop JAX's compiled executables after each module: one process compiles hundreds of model
    functions over the suite, and XLA's CPU compiler crashed late in the run when they were kept."""
    yield
    jax.clear_caches()


@pytest.fixture(autouse=True)
def _clean_state():
    """Every test starts and ends with OpenPI unpatched, the default manager and no reports."""
    openpi_prune.disable()
    telemetry.clear()
    yield
    openpi_prune.disable()
    plugins.set_manager(None)
    telemetry.clear()


@pytest.fixture
def register_plugin():
    """`register(plugin, name=None)`: a plugin of this test only (`_clean_state` drops the manager)."""

    def register(plugin, name: str | None = None):
        plugins.get_manager().register(plugin, name=name)
        return plugin

    return register


def child_env(*, drop: tuple[str, ...] = (), **changes: str) -> dict[str, str]:
    """This environment for a fresh interpreter: nothing that steers openpi-prune (or `drop`), on the
    CPU, with `changes`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENPI_PRUNE") and k not in drop}
    return env | {"JAX_PLATFORMS": "cpu"} | changes


def run_child(script: str, *args: str, timeout: float = 600, drop: tuple[str, ...] = (), **env: str) -> dict:
    """Run `script` in a fresh interpreter (`child_env`); the JSON it printed last."""
    import json
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        env=child_env(drop=drop, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def last_report():
    jax.effects_barrier()
    reports = telemetry.recent()
    assert reports, "no telemetry was reported"
    return reports[-1]


def two_scenes(cfg):
    """Two observations: three live cameras and a 12-token prompt; two (the right wrist masked) and 7."""
    return small.observation(
        cfg, batch_size=2, prompt_tokens=[12, 7], camera_masks={"right_wrist_0_rgb": [True, False]}
    )


def in_both_modes(model, cfg, **settings):
    """`sample_actions` on `two_scenes` in masked and in compact mode, the same noise: the actions
    and the last telemetry report of each."""
    obs, noise = two_scenes(cfg), jax.random.normal(jax.random.key(3), (2, cfg.action_horizon, cfg.action_dim))
    actions, reports = {}, {}
    for mode in ("masked", "compact"):
        with openpi_prune.enabled(mode=mode, warn_below=0, **settings):
            actions[mode] = np.asarray(model.sample_actions(jax.random.key(0), obs, num_steps=2, noise=noise))
            reports[mode] = last_report()
    return actions, reports


def _no_transforms(model_config):
    from openpi import transforms

    return transforms.Group()


def small_train_config(name: str, asset_id: str, assets_base_dir):
    """An OpenPI `TrainConfig` of the small pi0.5 with normalisation only (OpenPI's prompt transforms
    would download a tokenizer; the tests feed tokens)."""
    from openpi.training import config as _config

    return _config.TrainConfig(
        name=name,
        model=small.config(pi05=True),
        data=_config.SimpleDataConfig(
            repo_id=name,
            assets=_config.AssetsConfig(asset_id=asset_id),
            data_transforms=_no_transforms,
            model_transforms=_no_transforms,
        ),
        assets_base_dir=str(assets_base_dir),
    )
