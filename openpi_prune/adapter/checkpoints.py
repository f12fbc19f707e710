"""Checkpoints and the pruner's parameters: a method's `prune_*` parameters are created with the
model, filled in fresh (with a warning) when a checkpoint made without them is loaded, and kept
from the model when OpenPI's weight loader reads such a checkpoint, as it keeps LoRA's."""

import warnings

import jax
from flax import nnx

from openpi_prune import settings
from openpi_prune.adapter import training
from openpi_prune.errors import PruneInputError, UntrainedParametersWarning, UnusedParametersWarning
from openpi_prune.hookspecs import PARAMETER_PREFIX
from openpi_prune.pruner import plugins


def init_model(model, config, rngs) -> None:
    """After OpenPI's `Pi0.__init__`: the step the settings' schedules count, and the active
    method's parameters."""
    training.add_step(model)
    plugins.get_manager().hook.openpi_prune_init_model(
        model=model, config=config, rngs=rngs, settings=settings.active()
    )


class _Additions(nnx.Module):
    """Stands in for a `Pi0` to collect only what `openpi_prune_init_model` adds."""


def fresh_parameters(config, seed: int = 0) -> dict:
    """The parameters the active method adds to a model of `config`, freshly initialised, and the
    training step at 0."""
    holder = _Additions()
    init_model(holder, config, nnx.Rngs(seed))
    return nnx.state(holder, nnx.Any(nnx.Param, training.TrainingStep)).to_pure_dict()


def complete_params(config, params: dict) -> dict:
    """`params` plus fresh values for the method's parameters it lacks (warning that they are new)."""
    fresh = fresh_parameters(config)
    method = settings.active().method
    for name, value in fresh.items():
        if name in params:
            _check_shapes(name, value, params[name], method)
    unused = sorted(k for k in params if k.startswith(PARAMETER_PREFIX) and k not in fresh)
    if unused:
        warnings.warn(
            f"the checkpoint's {', '.join(unused)} belong to another pruning method than {method}; "
            "this model does not use them (the checkpoint keeps them).",
            UnusedParametersWarning,
            stacklevel=4,
        )
    missing = {k: v for k, v in fresh.items() if k not in params}
    missing_parameters = _untrained(fresh, params)
    if not missing_parameters:  # a step missing only starts the schedules from 0
        return {**params, **missing}
    warnings.warn(
        f"the checkpoint has no {', '.join(missing_parameters)} (it was trained without "
        f"{settings.active().method}); pruning with freshly initialised, untrained parameters. Fine-tune "
        "with openpi-prune enabled to train them.",
        UntrainedParametersWarning,
        stacklevel=4,
    )
    return {**params, **missing}


def untrained(config, params: dict) -> list[str]:
    """The active method's parameters that `params` lacks (the training step is no parameter: a
    checkpoint without it starts the schedules from 0)."""
    return _untrained(fresh_parameters(config), params)


def _untrained(fresh: dict, params: dict) -> list[str]:
    return sorted(k for k in fresh if k not in params and k != training.STEP)


def _check_shapes(name: str, expected, got, method: str) -> None:
    shapes = jax.tree.map(lambda leaf: tuple(leaf.shape), {"expected": expected, "got": got})
    if shapes["expected"] != shapes["got"]:
        raise PruneInputError(
            f"the checkpoint's {name} has shapes {shapes['got']}, but {method} on this model needs "
            f"{shapes['expected']}: it was trained on a model of another size, or under another "
            "relevance_hidden. Load it into that model's config under its settings, or drop the prune_* "
            "parameters to start them anew."
        )


def add_missing_from_reference(loaded: dict, reference: dict) -> dict:
    """`loaded` plus the method's parameters from `reference` where the checkpoint had none."""
    extra = {k: v for k, v in reference.items() if k.startswith(PARAMETER_PREFIX) and k not in loaded}
    return {**loaded, **extra} if extra else loaded
