"""Timing as the bench does it: warmed up, every call waited for, and `sample_actions` compiled as
OpenPI's `Policy` compiles it."""

import time

import jax
from flax import nnx
from rich.console import Console

from openpi_prune import call

console = Console(width=max(Console().width, 110))


def timed(fn, args, repeats: int) -> list[float]:
    """Milliseconds of `repeats` calls of `fn(*args)`, after one call to warm up."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return times


def compiled_sample(model, observation, num_steps):
    """`sample_actions` compiled as `nnx_utils.module_jit` (and so `Policy`) compiles it, with the
    settings in force, and its arguments. Traced as a served call, so that a pruned one returns its
    telemetry with its actions, as under `Policy.infer`. The model's state is an argument, not a
    constant; it is compiled ahead of time so that the executable timed is the one analysed. The
    observation goes in as leaves: its type check rejects jax's placeholders in lowering."""
    graphdef, state = nnx.split(model)
    leaves, tree = jax.tree.flatten(observation)

    def sample(state, leaves):
        return nnx.merge(graphdef, state).sample_actions(jax.random.key(0), tree.unflatten(leaves), num_steps=num_steps)

    with call.scope(served=call.Served()):
        return jax.jit(sample).lower(state, leaves).compile(), (state, leaves)
