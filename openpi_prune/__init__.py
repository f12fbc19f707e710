"""openpi-prune: LightVLA-style visual-token pruning for OpenPI's JAX pi0 / pi0.5, as a plugin.

    import openpi_prune
    openpi_prune.enable(method="relevance", mode="compact")  # or OPENPI_PRUNE=1 in the environment
    ...create, train and serve OpenPI models as usual...
    openpi_prune.disable()

Importing this package is cheap (no JAX): the start-up hook imports it at interpreter start.
"""

import contextlib
import threading

from openpi_prune.errors import (
    IncompatibleOpenPIError,
    OpenPIDependencyError,
    OpenPINotFoundError,
    PruneError,
    PruneInputError,
    SettingsError,
)
from openpi_prune.settings import PruneSettings

__all__ = [
    "IncompatibleOpenPIError",
    "OpenPIDependencyError",
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
    "keep_fraction",
    "gradual_keep_fraction",
    "noise_scale",
    "noisy_actions",
]

_lock = threading.RLock()


def enable(settings: PruneSettings | None = None, /, **changes) -> PruneSettings | None:
    """Patch OpenPI (importing the modules it patches) and prune with these settings from now on.

    Enable before models are created (Scheme B adds a trainable projector in `Pi0.__init__`)
    and before anything is jit-compiled. Calling it again changes the settings in place. These
    settings replace any from `OPENPI_PRUNE` that are still waiting for OpenPI's import. Returns
    the settings in force: these, or None when OpenPI did not match and `strict=False` left it
    unpatched.
    """
    from openpi_prune import _bootstrap, patch, plugins

    settings = (settings or PruneSettings()).replace(**changes)
    plugins.check_method(settings.method)  # a bad choice leaves the environment's in place
    _bootstrap.discard()  # the program's choice wins over the environment's
    # Outside the lock: OpenPI's import hook takes it, perhaps in a thread that holds the import lock.
    patch.import_openpi()
    return _apply(settings)


def _apply(settings: PruneSettings, lazy: bool = False) -> PruneSettings | None:
    from openpi_prune import patch, plugins, prefix

    with _lock:
        plugins.check_method(settings.method)
        if patch.is_installed() and settings == prefix.active_settings():
            return settings  # nothing changes: no need to wait for model calls in flight
        with patch.exclusive():
            return _change(settings, lazy)


def _change(settings: PruneSettings, lazy: bool) -> PruneSettings | None:
    from openpi_prune import patch, prefix

    if patch.is_installed():
        patch.note_patches_changed("settings changed")
        prefix.set_settings(settings)
        return settings
    prefix.set_settings(settings)
    if not patch.install(patch.WRAPPERS, strict=settings.strict, lazy=lazy):
        prefix.set_settings(PruneSettings())
        return None
    return settings


def _apply_pending() -> PruneSettings | None:
    """Apply `OPENPI_PRUNE`'s settings if they are still pending (OpenPI's import hook calls this)."""
    from openpi_prune import _bootstrap

    with _lock:
        settings = _bootstrap.discard()
        if isinstance(settings, Exception):
            raise settings
        # Lazily: this runs inside the import of `openpi`, where importing its modules could
        # deadlock with another thread's import of them.
        return None if settings is None else _apply(settings, lazy=True)


def disable() -> None:
    """Remove exactly openpi-prune's wrappers; OpenPI behaves as if never patched.

    Also cancels settings from `OPENPI_PRUNE` still waiting for OpenPI's import."""
    from openpi_prune import _bootstrap, patch, prefix

    with _lock:
        _bootstrap.discard()
        if not patch.is_installed():
            prefix.set_settings(PruneSettings())
            return
        with patch.exclusive():
            patch.uninstall()
            prefix.set_settings(PruneSettings())


def is_enabled() -> bool:
    """Whether OpenPI is patched now."""
    from openpi_prune import patch

    return patch.is_installed()


def current_settings() -> PruneSettings | None:
    """The settings in force; before OpenPI's import, those `OPENPI_PRUNE` will apply then; else None."""
    from openpi_prune import _bootstrap, prefix

    if is_enabled():
        return prefix.active_settings()
    return _bootstrap.pending()


def _restore(previous: PruneSettings | None, was_pending: bool) -> None:
    from openpi_prune import _bootstrap

    with _lock:
        if previous is None:
            disable()
        elif was_pending and not is_enabled() and _bootstrap.repend(previous):
            pass  # OpenPI was not imported in the block: its import applies them, as before
        else:
            enable(previous)


def _snapshot() -> tuple[PruneSettings | None, bool]:
    from openpi_prune import _bootstrap

    with _lock:
        return current_settings(), not is_enabled() and _bootstrap.pending() is not None


@contextlib.contextmanager
def enabled(settings: PruneSettings | None = None, /, **changes):
    """Prune inside the block; afterwards restore what was in force (or pending) before."""
    previous = _snapshot()
    try:
        yield enable(settings, **changes)
    finally:
        _restore(*previous)


@contextlib.contextmanager
def disabled():
    """Run OpenPI unpatched inside the block; afterwards restore what was in force (or pending) before."""
    previous = _snapshot()
    disable()
    try:
        yield
    finally:
        _restore(*previous)


def noisy_actions(x_t, time, *, rng=None, train: bool = False):
    """Context manager handing the pruner noisy actions for direct `embed_prefix` calls."""
    from openpi_prune import prefix

    return prefix.noisy_actions(x_t, time, rng=rng, train=train)


def noise_scale(scale):
    """Context manager setting the training noise on the scores (may be traced; see README)."""
    from openpi_prune import prefix

    return prefix.noise_scale(scale)


def keep_fraction(fraction):
    """Context manager setting the share a training pass keeps (may be traced; see README)."""
    from openpi_prune import prefix

    return prefix.keep_fraction(fraction)


def gradual_keep_fraction(step, ramp_steps: int, final: float):
    """Gradual pruning for `keep_fraction`: every patch at step 0, `final` from `ramp_steps` on."""
    from openpi_prune import prefix

    return prefix.gradual_keep_fraction(step, ramp_steps, final)


def linear_noise_scale(step, total_steps: int, start: float = 1.0):
    """LightVLA's schedule for `noise_scale`: `start` at step 0, falling linearly to 0 at `total_steps`."""
    from openpi_prune import prefix

    return prefix.linear_noise_scale(step, total_steps, start)
