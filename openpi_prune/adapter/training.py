"""A pruned training pass of OpenPI's `compute_loss`: the schedules the settings carry, counted by a
step the model keeps (so OpenPI's own train step ramps, and resumes from a checkpoint, with no
openpi-prune call in it), the saliency on every k-th step or of a share of the batch only, and
after the ramp the compact prefix that inference runs, so the pruned pass is shorter than upstream's.

Static shapes: at most two prefix lengths (full during the ramp, `capacity` after it), chosen by
`lax.cond` on the step, so one compile holds both and each step runs one.
"""

import inspect
import math
import warnings

import jax
import jax.numpy as jnp
from flax import nnx

from openpi_prune import call, settings, telemetry
from openpi_prune.adapter import prefix
from openpi_prune.errors import PruneInputError, UncountedStepsWarning
from openpi_prune.hookspecs import PARAMETER_PREFIX
from openpi_prune.pruner import pipeline, plugins

STEP = PARAMETER_PREFIX + "step"


class TrainingStep(nnx.Variable):
    """How many training passes a pruned model has made. Not a parameter (no gradient, no optimiser
    state); saved with the parameters in OpenPI's checkpoints, so a resumed run goes on where it was."""


def add_step(model) -> None:
    setattr(model, STEP, TrainingStep(jnp.zeros((), jnp.int32)))


def _advance(model, active: settings.PruneSettings, traced: bool):
    """This pass's step, counted; None for a model made before pruning was enabled. A model that a
    jitted function closes over (a constant there, its step not traced) cannot carry a new count out
    of it: its step is read, not advanced."""
    counter = getattr(model, STEP, None)
    if counter is None:
        if active.keep_ramp_steps or active.noise_steps:
            raise PruneInputError(
                "keep_ramp_steps and noise_steps count the model's training steps, and this Pi0 keeps none: "
                "it was created before openpi-prune was enabled. Enable it first, then create (or load) the model."
            )
        return None
    step = counter.value
    if isinstance(step, jax.core.Tracer) or not traced:
        counter.value = step + 1
    return step


def schedules(active: settings.PruneSettings, step) -> dict:
    """The call-state inputs the settings' schedules give at `step` (a block's own values win)."""
    if step is None:
        return {}
    out = {}
    if active.keep_ramp_steps:
        out["keep_fraction"] = call.gradual_keep_fraction(step, active.keep_ramp_steps, active.keep_fraction)
    if active.noise_steps:
        out["noise_scale"] = call.linear_noise_scale(step, active.noise_steps, active.noise_scale)
    return out


def _training_capacity(active: settings.PruneSettings, state: call.CallState | None, image_tokens) -> int | None:
    """Image slots of the compact training pass after the ramp, or None (full length throughout):
    only for a method that keeps a bounded share, with the share the settings' own, and fewer slots
    than `image_tokens()` (traced only then)."""
    if not active.compact_training or active.mode != "compact":
        return None
    if state is not None and state.keep_fraction is not None:  # a hand-written ramp: its end is unknown here
        return None
    n, cameras = image_tokens()
    capacity = pipeline.method_capacity(active, n, cameras, plugins.get_manager())
    return capacity if capacity is not None and capacity < n else None


def loss(wrapped, model, args, kwargs, x_t, time, rng):
    """OpenPI's `compute_loss(train=True)` pruned: returns (per-sample loss, the pruner's per-sample
    loss or None)."""
    active = settings.active()
    outer = call.current()
    step = _advance(model, active, traced=isinstance(x_t, jax.core.Tracer))
    inputs = schedules(active, step)
    if outer is not None:  # a block's schedule wins over the settings'
        inputs = {k: v for k, v in inputs.items() if getattr(outer, k) is None}
    saliency = _saliency(wrapped, args, kwargs, active, step)

    added = []  # whether the method added a loss of its own (known while tracing)

    def branch(capacity):
        def run(_):
            with (
                telemetry.isolated() as reports,
                call.noisy_actions(x_t, time, rng=rng, train=True, saliency=saliency),
                call.scope(train_capacity=capacity, step=step, **inputs) as this_call,
            ):
                value = wrapped(*args, **kwargs)
            extra = this_call.extra_loss
            added.append(extra is not None)
            return value, (jnp.zeros(x_t.shape[:1]) if extra is None else extra), (reports[0] if reports else {})

        return run

    capacity = _training_capacity(active, outer, lambda: _image_tokens(wrapped, args, kwargs))
    if capacity is None:
        value, extra, report = branch(None)(None)
    elif not active.keep_ramp_steps or step is None:
        value, extra, report = branch(capacity)(None)
    else:
        value, extra, report = jax.lax.cond(step >= active.keep_ramp_steps, branch(capacity), branch(None), None)
    if report:
        telemetry.deliver_traced(report)
    return value, (extra if any(added) else None)


def _saliency(wrapped, args, kwargs, active, step):
    """The model's saliency for a method that learns from it: every `saliency_every`-th step, of the
    batch's first `saliency_share` (zeros elsewhere, where the pruner's loss is zero and its head
    keeps what it learnt)."""
    if not prefix.wants_saliency():
        return None

    def full(_):
        if active.saliency_share == 1:
            return prefix.saliency(lambda: wrapped(*args, **kwargs))
        # The slice's own compute_loss draws its own noise: the saliency of the same samples at another x_t.
        bound = inspect.signature(wrapped).bind(*args, **kwargs)
        batch = bound.arguments["actions"].shape[0]
        share = math.ceil(active.saliency_share * batch)
        for name in ("observation", "actions"):
            bound.arguments[name] = jax.tree.map(lambda x: x[:share], bound.arguments[name])
        sliced = prefix.saliency(lambda: wrapped(*bound.args, **bound.kwargs))
        return jnp.zeros((batch, *sliced.shape[1:]), sliced.dtype).at[:share].set(sliced)

    if step is None and active.saliency_every > 1:  # a cost setting, not a schedule: carry on at full cost
        warnings.warn(
            f"saliency_every={active.saliency_every} counts the model's training steps, and this Pi0 keeps none "
            "(it was created before openpi-prune was enabled): its saliency runs on every step. Enable "
            "openpi-prune first, then create (or load) the model, for the cheaper training step.",
            UncountedStepsWarning,
            stacklevel=2,
        )
    if active.saliency_every == 1 or step is None:
        return full(None)
    shape = jax.eval_shape(full, None)
    return jax.lax.cond(step % active.saliency_every == 0, full, lambda _: jnp.zeros(shape.shape, shape.dtype), None)


def _image_tokens(wrapped, args, kwargs) -> tuple[int, int]:
    """Image tokens of the unpruned prefix (all cameras) and its cameras, read from a shape-only trace."""
    probe = prefix.Probe()
    with call.scope(probe=probe):
        jax.eval_shape(lambda: wrapped(*args, **kwargs))
    return probe.shape.shape[1], probe.cameras
