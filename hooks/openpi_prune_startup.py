"""Interpreter start-up entry for openpi-prune, installed at the top of site-packages.

It runs at every Python start through `openpi-prune-startup.pth` (or `.start` on Python 3.15+),
so it imports nothing but `os` until `OPENPI_PRUNE` asks for pruning, never raises, and only
registers a post-import hook: OpenPI is patched when its package `openpi` is imported, that is
before any OpenPI module a program imports first, and a program's own `enable()` / `disable()`
before then takes precedence.
"""

import os

_started = False


def start() -> None:
    global _started
    value = os.environ.get("OPENPI_PRUNE", "").strip()
    if _started or value.lower() in ("", "0", "false", "off", "no"):
        return
    _started = True
    try:
        from openpi_prune import _bootstrap

        _bootstrap.arm(value)
    except Exception as error:  # noqa: BLE001 - start-up must never break the interpreter
        import sys

        print(f"openpi-prune: not enabled: {error}", file=sys.stderr)
