"""openpi-prune: LightVLA-style visual-token pruning for OpenPI's JAX pi0 / pi0.5, as a plugin.

    import openpi_prune
    openpi_prune.enable(method="scheme_b", mode="compact")   # or OPENPI_PRUNE=1 in the environment
    ...create, train and serve OpenPI models as usual...
    openpi_prune.disable()

Importing this package is cheap (no JAX): the start-up hook imports it at interpreter start.
"""

import contextlib
import threading

from openpi_prune.errors import (
    IncompatibleOpenPIError,
    OpenPINotFoundError,
    PruneError,
    PruneInputError,
    SettingsError,
)
from openpi_prune.settings import PruneSettings

__all__ = [
    "IncompatibleOpenPIError",
    "OpenPINotFoundError",
    "PruneError",
    "PruneInputError",
    "PruneSettings",
    "SettingsError",
    "current_settings",
    "disable",
    "disabled",
    "enable",
    "enabled",
    "is_enabled",
    "linear_noise_scale",
    "noise_scale",
    "noisy_actions",
]

_lock = threading.RLock()


def enable(settings: PruneSettings | None = None, /, **changes) -> PruneSettings:
    """Patch OpenPI (importing `openpi.models.pi0`) and prune with these settings from now on.

    Enable before models are created (Scheme B adds a trainable projector in `Pi0.__init__`)
    and before anything is jit-compiled. Calling it again changes the settings in place.
    """
    from openpi_prune import patch, plugins, prefix

    settings = (settings or PruneSettings()).replace(**changes)
    with _lock:
        plugins.check_method(settings.method)
        if patch.is_installed():
            if settings != prefix.active_settings():
                patch.note_patches_changed("settings changed")
            prefix.set_settings(settings)
            return settings
        prefix.set_settings(settings)
        if not patch.install(patch.WRAPPERS, strict=settings.strict):
            prefix.set_settings(PruneSettings())
        return settings


def disable() -> None:
    """Remove exactly openpi-prune's wrappers; OpenPI behaves as if never patched."""
    from openpi_prune import patch, prefix

    with _lock:
        patch.uninstall()
        prefix.set_settings(PruneSettings())


def is_enabled() -> bool:
    from openpi_prune import patch

    return patch.is_installed()


def current_settings() -> PruneSettings | None:
    """The settings in force, or None when disabled."""
    from openpi_prune import prefix

    return prefix.active_settings() if is_enabled() else None


def _restore(previous: PruneSettings | None) -> None:
    if previous is None:
        disable()
    else:
        enable(previous)


@contextlib.contextmanager
def enabled(settings: PruneSettings | None = None, /, **changes):
    """Prune inside the block; afterwards restore what was in force before."""
    previous = current_settings()
    try:
        yield enable(settings, **changes)
    finally:
        _restore(previous)


@contextlib.contextmanager
def disabled():
    """Run OpenPI unpatched inside the block; afterwards restore what was in force before."""
    previous = current_settings()
    disable()
    try:
        yield
    finally:
        _restore(previous)


def noisy_actions(x_t, time, *, rng=None, train: bool = False):
    """Context manager handing the pruner noisy actions for direct `embed_prefix` calls."""
    from openpi_prune import prefix

    return prefix.noisy_actions(x_t, time, rng=rng, train=train)


def noise_scale(scale):
    """Context manager setting the training noise on the scores (may be traced; see README)."""
    from openpi_prune import prefix

    return prefix.noise_scale(scale)


def linear_noise_scale(step, total_steps: int, start: float = 1.0):
    """LightVLA's schedule for `noise_scale`: `start` at step 0, falling linearly to 0 at `total_steps`."""
    from openpi_prune import prefix

    return prefix.linear_noise_scale(step, total_steps, start)
