"""The plugin manager: built-in methods first, then third-party entry points, loaded once.

`OPENPI_PRUNE_PLUGINS=a,b` loads only those entry points; `OPENPI_PRUNE_DISABLE_PLUGINS=c` skips
some; `OPENPI_PRUNE_TRACE_HOOKS=1` logs every hook call.
"""

import importlib.metadata
import logging
import os
import threading

import pluggy

from openpi_prune import hookspecs
from openpi_prune.errors import SettingsError

logger = logging.getLogger("openpi_prune")

ALLOW_VAR = "OPENPI_PRUNE_PLUGINS"
BLOCK_VAR = "OPENPI_PRUNE_DISABLE_PLUGINS"
TRACE_VAR = "OPENPI_PRUNE_TRACE_HOOKS"

_lock = threading.Lock()
_manager: pluggy.PluginManager | None = None


def _names(var: str) -> set[str]:
    return {name.strip() for name in os.environ.get(var, "").split(",") if name.strip()}


def create_manager() -> pluggy.PluginManager:
    """A fresh manager with the hook specs, the built-in methods and the allowed entry points."""
    from openpi_prune import telemetry
    from openpi_prune.pruner import methods

    manager = pluggy.PluginManager(hookspecs.NAME)
    manager.add_hookspecs(hookspecs.PruneSpec)
    for plugin in (*methods.BUILTIN, telemetry.RECORDER, telemetry.TRAINING_LOG):
        manager.register(plugin, name=f"builtin:{type(plugin).__name__}")
    allow, block = _names(ALLOW_VAR), _names(BLOCK_VAR)
    for name in {ep.name for ep in importlib.metadata.entry_points(group=hookspecs.NAME)}:
        if name in block or (allow and name not in allow):
            manager.set_blocked(name)
    manager.load_setuptools_entrypoints(hookspecs.NAME)
    if os.environ.get(TRACE_VAR, "").strip() not in ("", "0"):
        manager.trace.root.setwriter(logger.info)
        manager.enable_tracing()
    return manager


def get_manager() -> pluggy.PluginManager:
    """The process-wide manager, created (and entry points loaded) on first use."""
    global _manager
    with _lock:
        if _manager is None:
            _manager = create_manager()
        return _manager


def set_manager(manager: pluggy.PluginManager | None) -> pluggy.PluginManager | None:
    """Swap the process-wide manager (None: build a fresh one next time); returns the old one."""
    global _manager
    with _lock:
        old, _manager = _manager, manager
        return old


def known_methods(manager: pluggy.PluginManager | None = None) -> dict[str, str]:
    """Method name -> name of the plugin that provides it."""
    manager = manager or get_manager()
    found = {}
    for impl in manager.hook.openpi_prune_methods.get_hookimpls():
        for method in impl.function() or ():
            found.setdefault(method, impl.plugin_name)
    return found


def check_method(method: str, manager: pluggy.PluginManager | None = None) -> None:
    known = known_methods(manager)
    if method not in known:
        raise SettingsError(
            f"unknown pruning method {method!r}; known: {', '.join(sorted(known))}. "
            f"A third-party method must be installed in the {hookspecs.NAME!r} entry-point group "
            f"(and not blocked by {ALLOW_VAR}/{BLOCK_VAR})."
        )


def plugin_distributions(manager: pluggy.PluginManager | None = None) -> list[tuple[str, str]]:
    """(plugin name, 'distribution version' or 'built-in') for every registered plugin."""
    manager = manager or get_manager()
    dists = {name: f"{dist.metadata['name']} {dist.version}" for name, dist in _dist_info(manager)}
    return [(name, dists.get(name, "built-in")) for name, _ in manager.list_name_plugin()]


def _dist_info(manager):
    for plugin, dist in manager.list_plugin_distinfo():
        yield manager.get_name(plugin), dist
