"""Errors openpi-prune raises and warnings it gives, each saying what was wrong and what to do."""


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


# Warnings: each says what happened and what to do.


class TracedBeforeChangeWarning(UserWarning):
    """A model function was compiled before the patches changed; it keeps the old behaviour."""


class UntrainedParametersWarning(UserWarning):
    """A checkpoint lacks the parameters the pruning method adds; they start from scratch."""


class UnusedParametersWarning(UserWarning):
    """A checkpoint carries another pruning method's parameters, which this model does not use."""


class UncountedStepsWarning(UserWarning):
    """A model created before pruning was enabled counts no training steps: saliency every step."""


class CollapseWarning(UserWarning):
    """The pruner kept fewer image tokens than `PruneSettings.warn_below`."""


class NonFiniteInputWarning(UserWarning):
    """Image tokens with NaN or inf (from bad pixels) reached the pruner; none of them was kept."""
