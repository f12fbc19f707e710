"""What `OPENPI_PRUNE` does once the start-up file has seen it set: parse, then wait for OpenPI."""

import logging

logger = logging.getLogger("openpi_prune")

_pending = None


def arm(value: str) -> None:
    """Validate the variable now (a bad value is reported at start-up), patch on OpenPI's import."""
    global _pending
    from openpi_prune.settings import parse

    _pending = parse(value)
    import wrapt

    wrapt.register_post_import_hook(_on_import, "openpi.models.pi0")


def _on_import(module) -> None:
    # A strict-mode incompatibility raises here and so fails the import of openpi.models.pi0: the
    # user asked for pruning, and running unpruned without saying so would hide it.
    import openpi_prune

    openpi_prune.enable(_pending)
    logger.info("openpi-prune enabled from the environment: %s", _pending)
