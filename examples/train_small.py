"""Train a small real pi0.5 with Scheme B for a few steps, the way OpenPI's train step is built.

Shows the two things a training loop adds: LightVLA's noise schedule on the vote scores
(`openpi_prune.noise_scale`), and the pruner's telemetry returned from the jitted step as arrays
(`openpi_prune.telemetry.collect`). Run: .venv/bin/python examples/train_small.py [--steps 30]
"""

import argparse

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from rich.console import Console
from rich.progress import track

import openpi_prune
from openpi_prune import telemetry
from openpi_prune.pruner import methods
from openpi_prune.tools import small


def main(steps: int) -> None:
    console = Console()
    openpi_prune.enable(method="scheme_b", telemetry=False)  # before the model exists
    cfg = small.config(pi05=True)
    model = small.create(cfg)
    obs = small.observation(cfg, batch_size=4, prompt_tokens=[12, 9, 5, 14])
    actions = small.actions(cfg, batch_size=4)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    optimizer = optax.adamw(3e-4)
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(step, params, opt_state):
        def loss_fn(params):
            m = nnx.merge(graphdef, params, rest)
            rng = jax.random.fold_in(jax.random.key(0), step)
            scale = openpi_prune.linear_noise_scale(step, steps)  # LightVLA: 1 -> 0 over training
            with telemetry.collect() as reports, openpi_prune.noise_scale(scale):
                loss = jnp.mean(m.compute_loss(rng, obs, actions, train=True))
            return loss, reports[0]

        (loss, report), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        projector_grad = optax.global_norm(grads[methods.PROJECTOR])
        info = {"loss": loss, "kept": jnp.mean(report["kept"]), "query_spread": jnp.mean(report["query_spread"])}
        return optax.apply_updates(params, updates), opt_state, {**info, "projector_grad": projector_grad}

    history = []
    for step in track(range(steps), description="training (the first step compiles)", console=console):
        params, opt_state, info = train_step(step, params, opt_state)
        history.append(jax.device_get(info))
    for step in sorted({0, steps // 2, steps - 1}):
        row = history[step]
        console.print(
            f"step {step:3d}: loss {row['loss']:.3f}, kept {row['kept']:.0f} of 768, "
            f"query spread {row['query_spread']:.3f}, |grad projector| {row['projector_grad']:.2e}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    main(parser.parse_args().steps)
