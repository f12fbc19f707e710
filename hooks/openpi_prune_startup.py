"""Interpreter start-up entry for openpi-prune, installed at the top of site-packages.

It runs at every Python start through `openpi-prune-startup.pth` (or `.start` on Python 3.15+),
so it must cost nothing measurable and never raise. It does two things:
- always, it waits for OpenPI's config registry (`openpi.training.config`) and adds the pruned
  twins of its pi0 / pi0.5 configs (`openpi_prune.configs`) when, and only if, a program imports it;
- when `OPENPI_PRUNE` asks for pruning, it registers a post-import hook (wrapt's): OpenPI is patched
  when its package `openpi` is imported, that is before any OpenPI module a program imports first,
  and a program's own `enable()` / `disable()` before then takes precedence.
"""

import os
import sys

CONFIG_MODULE = "openpi.training.config"
_started = False


class _ConfigTwins:
    """A one-shot import finder for OpenPI's config registry. Not wrapt's post-import hooks: importing
    wrapt at every interpreter start would cost more than everything else here together."""

    def find_spec(self, name, path=None, target=None):
        if name != CONFIG_MODULE:
            return None
        import importlib.util

        sys.meta_path.remove(self)  # the real spec, found without us; and only once
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_add_twins(module):
            exec_module(module)
            try:
                from openpi_prune import configs

                configs.register(module)
            except Exception as error:  # noqa: BLE001 - OpenPI's own configs must still import
                print(f"openpi-prune: pruned configs not registered: {error}", file=sys.stderr)

        spec.loader.exec_module = exec_and_add_twins
        return spec


def start() -> None:
    global _started
    if _started:
        return
    _started = True
    if CONFIG_MODULE not in sys.modules:
        sys.meta_path.insert(0, _ConfigTwins())
    else:  # started late, by hand: the registry is there already
        try:
            from openpi_prune import configs

            configs.register(sys.modules[CONFIG_MODULE])
        except Exception as error:  # noqa: BLE001
            print(f"openpi-prune: pruned configs not registered: {error}", file=sys.stderr)
    value = os.environ.get("OPENPI_PRUNE", "").strip()
    if value.lower() in ("", "0", "false", "off", "no"):
        return
    try:
        from openpi_prune.adapter import bootstrap

        bootstrap.arm(value)
    except Exception as error:  # noqa: BLE001 - start-up must never break the interpreter
        print(f"openpi-prune: not enabled: {error}", file=sys.stderr)
