"""openpi-prune: LightVLA-style visual-token pruning for OpenPI's JAX pi0 / pi0.5, as a plugin.

    import openpi_prune
    openpi_prune.enable(method="relevance", mode="compact")  # or OPENPI_PRUNE=1 in the environment
    ...create, train and serve OpenPI models as usual...
    openpi_prune.disable()

Importing this package is cheap (no JAX): the start-up hook imports it at interpreter start.
"""

import contextlib

from openpi_prune.errors import (
    CollapseWarning,
    IncompatibleOpenPIError,
    NonFiniteInputWarning,
    OpenPIDependencyError,
    OpenPINotFoundError,
    PruneError,
    PruneInputError,
    SettingsError,
    TracedBeforeChangeWarning,
    UncountedStepsWarning,
    UntrainedParametersWarning,
    UnusedParametersWarning,
)
from openpi_prune.settings import PruneSettings

__all__ = [
    "CollapseWarning",
    "IncompatibleOpenPIError",
    "NonFiniteInputWarning",
    "OpenPIDependencyError",
    "OpenPINotFoundError",
    "PruneError",
    "PruneInputError",
    "PruneSettings",
    "SettingsError",
    "TracedBeforeChangeWarning",
    "UncountedStepsWarning",
    "UnusedParametersWarning",
    "UntrainedParametersWarning",
    "current_settings",
    "disable",
    "disabled",
    "enable",
    "enabled",
    "is_enabled",
    "linear_noise_scale",
    "keep_fraction",
    "gradual_keep_fraction",
    "noise_scale",
    "noisy_actions",
]


def enable(settings: PruneSettings | None = None, /, **changes) -> PruneSettings | None:
    """Patch OpenPI (importing the modules it patches) and prune with these settings from now on.

    Enable before models are created (Scheme B adds a trainable projector in `Pi0.__init__`)
    and before anything is jit-compiled. Calling it again changes the settings in place. These
    settings replace any from `OPENPI_PRUNE` that are still waiting for OpenPI's import. Returns
    the settings in force: these, or None when OpenPI did not match and `strict=False` left it
    unpatched.
    """
    from openpi_prune.adapter import lifecycle

    return lifecycle.enable((settings or PruneSettings()).replace(**changes))


def disable() -> None:
    """Remove exactly openpi-prune's wrappers; OpenPI behaves as if never patched.

    Also cancels settings from `OPENPI_PRUNE` still waiting for OpenPI's import."""
    from openpi_prune.adapter import lifecycle

    lifecycle.disable()


def is_enabled() -> bool:
    """Whether OpenPI is patched now."""
    from openpi_prune.adapter import install

    return install.is_installed()


def current_settings() -> PruneSettings | None:
    """The settings in force; before OpenPI's import, those `OPENPI_PRUNE` will apply then; else None."""
    from openpi_prune.adapter import lifecycle

    return lifecycle.current_settings()


@contextlib.contextmanager
def enabled(settings: PruneSettings | None = None, /, **changes):
    """Prune inside the block; afterwards restore what was in force (or pending) before."""
    from openpi_prune.adapter import lifecycle

    previous = lifecycle.snapshot()
    try:
        yield enable(settings, **changes)
    finally:
        lifecycle.restore(*previous)


@contextlib.contextmanager
def disabled():
    """Run OpenPI unpatched inside the block; afterwards restore what was in force (or pending) before."""
    from openpi_prune.adapter import lifecycle

    previous = lifecycle.snapshot()
    disable()
    try:
        yield
    finally:
        lifecycle.restore(*previous)


# The schedules and the flow-matching input of direct calls: blocks around model calls (see README).


def noisy_actions(x_t, time, *, rng=None, train: bool = False):
    """Context manager handing the pruner noisy actions for direct `embed_prefix` calls."""
    from openpi_prune import call

    return call.noisy_actions(x_t, time, rng=rng, train=train)


def noise_scale(scale):
    """Context manager setting the training noise on the scores (may be traced)."""
    from openpi_prune import call

    return call.noise_scale(scale)


def keep_fraction(fraction):
    """Context manager setting the share a training pass keeps (may be traced)."""
    from openpi_prune import call

    return call.keep_fraction(fraction)


def gradual_keep_fraction(step, ramp_steps: int, final: float):
    """Gradual pruning for `keep_fraction`: every patch at step 0, `final` from `ramp_steps` on."""
    from openpi_prune import call

    return call.gradual_keep_fraction(step, ramp_steps, final)


def linear_noise_scale(step, total_steps: int, start: float = 1.0):
    """LightVLA's schedule for `noise_scale`: `start` at step 0, falling linearly to 0 at `total_steps`."""
    from openpi_prune import call

    return call.linear_noise_scale(step, total_steps, start)
