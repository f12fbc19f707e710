"""Enable, change and disable: the settings in force and the patches, changed together, while no
model call runs; the environment's settings wait for OpenPI's import (`bootstrap`)."""

import threading

from openpi_prune import settings as store
from openpi_prune.adapter import install, pending
from openpi_prune.pruner import plugins
from openpi_prune.settings import PruneSettings

_lock = threading.RLock()


def enable(settings: PruneSettings) -> PruneSettings | None:
    """`openpi_prune.enable`: the program's settings, over any the environment left pending."""
    plugins.check_method(settings.method)  # a bad choice leaves the environment's in place
    pending.discard()  # the program's choice wins over the environment's
    # Outside the lock: OpenPI's import hook takes it, perhaps in a thread that holds the import lock.
    install.import_openpi()
    return apply(settings)


def apply(settings: PruneSettings, lazy: bool = False) -> PruneSettings | None:
    """Put `settings` in force, patching OpenPI if it is not (lazily: as its modules are imported)."""
    with _lock:
        plugins.check_method(settings.method)
        if install.is_installed() and settings == store.active():
            return settings  # nothing changes: no need to wait for model calls in flight
        with install.exclusive():
            return _change(settings, lazy)


def _change(settings: PruneSettings, lazy: bool) -> PruneSettings | None:
    if install.is_installed():
        install.note_patches_changed("settings changed")
        store.activate(settings)
        return settings
    store.activate(settings)
    if not install.install(strict=settings.strict, lazy=lazy):
        store.activate(None)
        return None
    return settings


def apply_pending() -> PruneSettings | None:
    """Apply `OPENPI_PRUNE`'s settings if they are still pending (OpenPI's import hook calls this)."""
    with _lock:
        settings = pending.discard()
        if isinstance(settings, Exception):
            raise settings
        # Lazily: this runs inside the import of `openpi`, where importing its modules could
        # deadlock with another thread's import of them.
        return None if settings is None else apply(settings, lazy=True)


def disable() -> None:
    """Remove exactly openpi-prune's wrappers; OpenPI behaves as if never patched.

    Also cancels settings from `OPENPI_PRUNE` still waiting for OpenPI's import."""
    with _lock:
        pending.discard()
        if not install.is_installed():
            store.activate(None)
            return
        with install.exclusive():
            install.uninstall()
            store.activate(None)


def current_settings() -> PruneSettings | None:
    """The settings in force; before OpenPI's import, those `OPENPI_PRUNE` will apply then; else None."""
    if install.is_installed():
        return store.active()
    return pending.pending()


def snapshot() -> tuple[PruneSettings | None, bool]:
    """What a block (`enabled`, `disabled`) restores: the settings in force or pending, and which."""
    with _lock:
        return current_settings(), not install.is_installed() and pending.pending() is not None


def restore(previous: PruneSettings | None, was_pending: bool) -> None:
    with _lock:
        if previous is None:
            disable()
        elif was_pending and not install.is_installed() and pending.repend(previous):
            pass  # OpenPI was not imported in the block: its import applies them, as before
        else:
            enable(previous)
