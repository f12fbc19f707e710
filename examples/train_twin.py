"""Fine-tune a pruned twin of a small pi0.5 config with OpenPI's own training machinery, on a CPU.

The twin comes from `with_pruning` (as `pi05_libero_prune` comes from `pi05_libero`). Everything else
is OpenPI's: its `TrainConfig`, its data loader on `FakeDataConfig` (with every camera and prompt
token marked live), its optimizer and schedule, its `TrainState` and orbax checkpoints, and a train
step written as OpenPI's `scripts/train.py` writes it, with no openpi-prune call in it. Training
starts from a checkpoint written without openpi-prune, so the pruner's parameters start fresh, and
prunes gradually (every patch at first, 20 % from a quarter of the way on): the twin's settings carry
the schedule and the model counts its own steps (saved in the checkpoint, so a resumed run goes on
where it was). The pruner's line in the training log comes every `log_every` steps. The last
checkpoint is what `serve_twin.py` serves.

Run: .venv/bin/python examples/train_twin.py --out /tmp/twin [--steps 20]
"""

import argparse
import dataclasses
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from openpi import transforms
from openpi.training import checkpoints, data_loader, sharding, weight_loaders
from openpi.training import config as _config
from openpi.training import optimizer as _optimizer
from openpi.training import utils as training_utils
from rich.console import Console
from rich.progress import track

import openpi_prune
from openpi_prune import configs, telemetry
from openpi_prune.tools import small

SIGLIP = "mu/14"  # small.config's pi0.5 with a small SigLIP: 256 tokens per camera still


def _all_live(data: dict) -> dict:
    # OpenPI's fake samples mark every camera and prompt token as padding; a robot's are live.
    return {
        **data,
        "image_mask": {k: np.True_ for k in data["image_mask"]},
        "tokenized_prompt_mask": np.ones_like(data["tokenized_prompt_mask"]),
    }


@dataclasses.dataclass(frozen=True)
class LiveFakeData(_config.FakeDataConfig):
    def create(self, assets_dirs, model_config):
        return dataclasses.replace(
            # A repack transform: it shapes the dataset's samples only, not what a served policy gets.
            super().create(assets_dirs, model_config),
            repack_transforms=transforms.Group(inputs=[_all_live]),
        )


def train_config(out: pathlib.Path, steps: int):
    """The twin of a small pi0.5 config, fine-tuned from `out/plain/params`."""
    base = _config.TrainConfig(
        name="small_pi05",
        exp_name="example",
        model=small.config(pi05=True),
        data=LiveFakeData(),
        weight_loader=weight_loaders.CheckpointWeightLoader(str(out / "plain" / "params")),
        lr_schedule=_optimizer.CosineDecaySchedule(warmup_steps=2, peak_lr=3e-4, decay_steps=steps, decay_lr=3e-5),
        ema_decay=None,
        batch_size=4,
        num_workers=0,
        num_train_steps=steps,
        checkpoint_base_dir=str(out / "checkpoints"),
        assets_base_dir=str(out / "assets"),
        wandb_enabled=False,
    )
    # Gradual pruning over the first quarter, LightVLA's noise falling to 0 over the run (the
    # relevance head ignores it), the pruner's log line every quarter of the run.
    return configs.with_pruning(
        base, warn_below=0, keep_ramp_steps=steps // 4, noise_steps=steps, log_every=max(steps // 4, 1)
    )


def write_plain_checkpoint(folder: pathlib.Path) -> None:
    """A pi0.5 checkpoint made without openpi-prune, as a released one is."""
    with openpi_prune.disabled():  # random weights, none of them zero (OpenPI zero-initialises some)
        params = nnx.state(small.create(small.config(pi05=True), siglip=SIGLIP), nnx.Param).to_pure_dict()
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(folder.absolute(), {"params": params}, force=True)


def on_mesh(config, state: training_utils.TrainState) -> training_utils.TrainState:
    """`state` placed as OpenPI's `scripts/train.py` places it, on the batch's mesh, where the train
    step's output lands: the step then compiles once, not once more for its own output."""
    mesh = sharding.make_mesh(config.fsdp_devices)
    return jax.device_put(state, sharding.fsdp_sharding(state, mesh))


def init_train_state(config, rng) -> training_utils.TrainState:
    tx = _optimizer.create_optimizer(config.optimizer, config.lr_schedule)
    with small.siglip_variant(SIGLIP):
        model = config.model.create(rng)  # the twin turns pruning on here: the pruner's parameters exist
    graphdef, state = nnx.split(model)
    # OpenPI's weight loader: the checkpoint's values, the pruner's fresh ones kept from the model.
    loaded = config.weight_loader.load(state.to_pure_dict())
    state.replace_by_pure_dict(loaded)
    params = nnx.state(nnx.merge(graphdef, state))
    state = training_utils.TrainState(
        step=jnp.zeros((), jnp.int32),  # typed as a restored checkpoint's step is
        params=params,
        model_def=graphdef,
        opt_state=tx.init(params.filter(config.trainable_filter)),
        tx=tx,
        ema_decay=None,
        ema_params=None,
    )
    return on_mesh(config, state)


def train_step(config, rng, state: training_utils.TrainState, batch):
    """One step as OpenPI's `scripts/train.py` takes it: nothing here knows of openpi-prune."""
    model = nnx.merge(state.model_def, state.params)
    model.train()

    def loss_fn(model, rng, observation, actions):
        return jnp.mean(model.compute_loss(rng, observation, actions, train=True))

    observation, actions = batch
    trainable = nnx.DiffState(0, config.trainable_filter)
    loss, grads = nnx.value_and_grad(loss_fn, argnums=trainable)(
        model, jax.random.fold_in(rng, state.step), observation, actions
    )
    params = state.params.filter(config.trainable_filter)
    updates, opt_state = state.tx.update(grads, state.opt_state, params)
    nnx.update(model, optax.apply_updates(params, updates))
    info = {"loss": loss, "grad_norm": optax.global_norm(grads)}
    return dataclasses.replace(state, step=state.step + 1, params=nnx.state(model), opt_state=opt_state), info


def main(out: pathlib.Path, steps: int) -> tuple[pathlib.Path, training_utils.TrainState]:
    console = Console()
    config = train_config(out, steps)
    write_plain_checkpoint(out / "plain" / "params")
    loader = data_loader.create_data_loader(config, shuffle=True, num_batches=steps)
    state = init_train_state(config, jax.random.key(config.seed))
    step_fn = jax.jit(lambda rng, state, batch: train_step(config, rng, state, batch))
    rng = jax.random.key(1)
    batches = iter(loader)
    for step in track(range(steps), description="training the pruned twin (the first step compiles)", console=console):
        state, info = step_fn(rng, state, next(batches))
        if step in (0, steps - 1):
            console.print(f"step {step}: loss {float(info['loss']):.3f}")
    telemetry.DELIVERY.flush(timeout=30)  # the pruner's log lines have been written
    manager, _ = checkpoints.initialize_checkpoint_dir(
        config.checkpoint_dir, keep_period=config.keep_period, overwrite=True, resume=False
    )
    checkpoints.save_state(manager, state, loader, steps)
    manager.wait_until_finished()
    folder = config.checkpoint_dir / str(steps)
    console.print(f"checkpoint (params/ holds the trained pruner): {folder}")
    return folder, state


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # as OpenPI's train.py logs
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("twin-example"))
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    main(args.out, args.steps)
