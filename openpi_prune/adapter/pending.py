"""The environment's settings (`OPENPI_PRUNE`) while they wait for OpenPI's import: set by
`bootstrap` at start-up, taken by the first `enable`, `disable` or OpenPI's import, whichever comes
first (code beats the environment). Imports nothing: the start-up hook reaches it."""

import threading

_lock = threading.RLock()
_pending = None  # PruneSettings from OPENPI_PRUNE (or the SettingsError it gave), not applied yet
_armed = False  # the post-import hook is registered
_fired = False  # it ran: OpenPI was imported


def arm(settings) -> bool:
    """Make `settings` pending at start-up; False if they already were (the hook is registered)."""
    global _pending, _armed
    with _lock:
        if _armed:
            return False
        _pending, _armed = settings, True
        return True


def pending():
    """The environment's settings while they wait for OpenPI's import, else None."""
    return None if isinstance(_pending, Exception) else _pending


def discard():
    """Forget the pending settings (the program chose its own). Returns what was pending."""
    global _pending
    with _lock:
        settings, _pending = _pending, None
        return settings


def repend(settings) -> bool:
    """Make `settings` pending again if the hook has yet to run; False if it ran (apply them now)."""
    global _pending
    with _lock:
        if not _armed or _fired:
            return False
        _pending = settings
        return True


def fire():
    """OpenPI is being imported: what was asked for (to wait again if applying it fails)."""
    global _fired
    with _lock:
        _fired = True
        return _pending


def unfire(asked) -> None:
    """Applying failed with OpenPI's import: `asked` waits for the next import."""
    global _pending, _fired
    with _lock:
        _pending, _fired = asked, False
