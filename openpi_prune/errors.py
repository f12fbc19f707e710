"""Errors openpi-prune raises, each saying what was wrong and what to do."""


class PruneError(Exception):
    """Base class of openpi-prune's errors."""


class SettingsError(PruneError, ValueError):
    """A setting (from code or from `OPENPI_PRUNE`) has a bad name or value."""


class OpenPINotFoundError(PruneError, ImportError):
    """No importable OpenPI in this environment."""


class OpenPIDependencyError(OpenPINotFoundError):
    """OpenPI is installed, but a module OpenPI itself imports is missing (the message names it)."""


class IncompatibleOpenPIError(PruneError):
    """The installed OpenPI differs from what a patch assumes; nothing was patched."""


class PruneInputError(PruneError, ValueError):
    """A model input cannot be pruned as asked (no prompt, capacity out of range, ...)."""
