"""What `OPENPI_PRUNE` does once the start-up file has seen it set: parse, then wait for OpenPI.

The hook sits on the top-level package `openpi`, not on `openpi.models.pi0`: a program may import
any OpenPI module first (`openpi.training.config`, `openpi.policies.policy_config`, ...) and reach
`Pi0` only later, lazily, in the middle of a call such as `config.model.load(params)`. Patching then
would be too late for that call. The package `openpi` is imported before any of its submodules, so
the hook runs before any OpenPI code a target affects, and `enable()` imports every module a target
lives in, completely, before the submodule the program asked for starts.

The environment's settings are *pending* until the hook applies them. A program's own `enable()` or
`disable()` before that takes precedence and discards them (code beats the environment).
"""

import logging
import sys

logger = logging.getLogger("openpi_prune")

PACKAGE = "openpi"


def arm(value: str) -> None:
    """Validate the variable now (a bad value is reported at start-up), patch on OpenPI's import."""
    from openpi_prune.adapter import pending
    from openpi_prune.errors import SettingsError
    from openpi_prune.settings import parse

    try:
        settings = parse(value)
    except SettingsError as error:
        # Raised at OpenPI's import, every import, as for an unknown method: the user asked for
        # pruning, and an unpruned run would hide the typo.
        settings = error
    if not pending.arm(settings):
        return
    import wrapt

    # Runs `_on_import` at once when `openpi` is already imported.
    wrapt.register_post_import_hook(_on_import, PACKAGE)


def _on_import(module) -> None:
    # A strict-mode incompatibility or a missing OpenPI dependency raises here and so fails the
    # import of `openpi`: the user asked for pruning, and running unpruned without saying so would
    # hide it.
    from openpi_prune.adapter import lifecycle, pending

    asked = pending.fire()
    before = set(sys.modules)
    try:
        settings = lifecycle.apply_pending()
    except BaseException:
        # Python drops the failed `openpi` but keeps the submodules imported here; without them a
        # later import of OpenPI starts afresh instead of tripping over their remains.
        for name in set(sys.modules) - before:
            if name.startswith(PACKAGE + "."):
                del sys.modules[name]
        # And a later import must fail the same way, not run OpenPI unpatched without a word: the
        # settings wait again, and the hook waits for the next import (with `openpi` gone from
        # sys.modules, which Python would do anyway, registering does not fire it at once).
        pending.unfire(asked)
        sys.modules.pop(PACKAGE, None)
        import wrapt

        wrapt.register_post_import_hook(_on_import, PACKAGE)
        raise
    if settings is not None:
        logger.info("openpi-prune enabled from the environment: %s", settings)
