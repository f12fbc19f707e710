"""Shared real OpenPI models: created once per session (a few seconds each on a CPU)."""

import os

import pytest

# The tests choose their settings themselves.
for _var in [v for v in os.environ if v.startswith("OPENPI_PRUNE")]:
    del os.environ[_var]

import jax  # noqa: E402

import openpi_prune  # noqa: E402
from openpi_prune import plugins, small, telemetry  # noqa: E402


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


@pytest.fixture(params=["pi0", "pi05"])
def any_model(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(autouse=True)
def _clean_state():
    """Every test starts and ends with OpenPI unpatched, the default manager and no reports."""
    openpi_prune.disable()
    telemetry.clear()
    yield
    openpi_prune.disable()
    plugins.set_manager(None)
    telemetry.clear()


def last_report():
    jax.effects_barrier()
    reports = telemetry.recent()
    assert reports, "no telemetry was reported"
    return reports[-1]
