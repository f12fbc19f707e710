"""One model call's state, in one context variable: what the patched OpenPI methods hand the pruner
(the flow-matching input, the training rng, the saliency, the schedules in force) and what the
pruned prefix leaves for the rest of the same call (position shifts, the pruner's own loss).

A block (`scope`) derives a new state from the one around it: inputs are inherited, what a call
leaves is not, so nested and concurrent calls (threads, asyncio tasks) never see each other's.
"""

import contextlib
import contextvars
import dataclasses
from typing import Any

import jax.numpy as jnp

from openpi_prune.errors import PruneInputError


@dataclasses.dataclass
class Served:
    """A served call (`Policy.infer`): its compiled `sample_actions` returns the telemetry of the
    prefix it pruned with its actions; the telemetry waits here, as device arrays, until the actions
    have been read."""

    telemetry: tuple[dict, dict] | None = None  # (description, values)


@dataclasses.dataclass
class CallState:
    # Inputs, set by the block that opens the state and inherited by inner blocks.
    noisy_actions: Any = None  # [b, horizon, action_dim]: x_t in training, the initial noise in sampling
    time: Any = None  # [b]
    rng: Any = None  # the training noise on the scores
    train: bool = False
    saliency: Any = None  # [b, image tokens], for methods that learn from it
    noise_scale: Any = None  # a schedule's value (may be traced), over `PruneSettings.noise_scale`
    keep_fraction: Any = None  # a schedule's value (may be traced), over `PruneSettings.keep_fraction`
    probe: Any = None  # inside a saliency pass: the unpruned prefix, perturbed
    train_capacity: int | None = None  # a training pass on the compact prefix: its image slots
    train_compact: bool = False  # the same for a PyTorch model, whose pipeline sizes the slots itself
    step: Any = None  # the model's training step (may be traced), for the schedules and the log
    served: Served | None = None
    siglip: Any = None  # inside a split `embed_prefix` (`siglip_layer`): its `adapter.siglip.Split`
    # For the tools' patches (`adapter.table.TOOLS`): small models and the lab's training.
    siglip_variant: str | None = None  # the SigLIP `Pi0.__init__` builds, instead of So400m/14
    siglip_depth: int | None = None  # its layers, where not the variant's own
    unaugmented: bool = False  # training preprocesses images as at inference
    # Left by the pruned prefix for the rest of this call (never inherited).
    position_shift: tuple | None = None  # (per prefix slot, after the prefix), see adapter.prefix
    extra_loss: Any = None  # [b]: the pruner's own loss, added to OpenPI's by compute_loss

    _LEFT = ("position_shift", "extra_loss")


_current: contextvars.ContextVar[CallState | None] = contextvars.ContextVar("openpi_prune_call", default=None)


def current() -> CallState | None:
    """The state of the call running now, or None outside every block."""
    return _current.get()


@contextlib.contextmanager
def scope(**inputs):
    """A block whose model calls see `inputs` over the state around it; yields the new state."""
    outer = _current.get() or CallState()
    state = dataclasses.replace(outer, **dict.fromkeys(CallState._LEFT), **inputs)
    token = _current.set(state)
    try:
        yield state
    finally:
        _current.reset(token)


def noisy_actions(x_t, time, *, rng=None, train: bool = False, saliency=None):
    """Hand the pruner the flow-matching input of the model call made inside the block (and, in
    training, the rng for the noise on the scores and the model's saliency)."""
    if train and rng is None:
        raise PruneInputError("noisy_actions(train=True) needs rng=: training adds random noise to the vote scores")
    return scope(noisy_actions=jnp.asarray(x_t), time=jnp.asarray(time), rng=rng, train=train, saliency=saliency)


def noise_scale(scale):
    """Scale of the training noise on the scores inside the block; may be a traced value, e.g.
    `linear_noise_scale(step, total_steps)` computed in the train step."""
    return scope(noise_scale=scale)


def keep_fraction(fraction):
    """Share of the live patches a training pass keeps inside the block; may be a traced value, e.g.
    `gradual_keep_fraction(step, ...)` computed in the train step."""
    return scope(keep_fraction=fraction)


def linear_noise_scale(step, total_steps: int, start: float = 1.0):
    """LightVLA's schedule: `start` at step 0, falling linearly to 0 at `total_steps`."""
    return start * jnp.clip(1.0 - jnp.asarray(step, jnp.float32) / total_steps, 0.0, 1.0)


def gradual_keep_fraction(step, ramp_steps: int, final: float):
    """Gradual pruning: every patch at step 0, falling linearly to `final` at `ramp_steps`, then `final`."""
    done = jnp.clip(jnp.asarray(step, jnp.float32) / max(ramp_steps, 1), 0.0, 1.0)
    return 1.0 - (1.0 - final) * done
