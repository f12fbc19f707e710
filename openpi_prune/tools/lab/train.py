"""Train and evaluate a small real pi0.5 on the lab's scenes, unpruned or with a pruning method.

The model is OpenPI's own `Pi0` (pi0.5, `dummy` Gemma for both experts, SigLIP `mu/28`: 8 x 8
patches a camera), trained with its own `compute_loss` and sampled with its own `sample_actions`.
The prompt's embedding table stays frozen (the prompt has a handful of fixed words), which
also keeps the optimiser off its 16M rows.
"""

import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import pathlib
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import openpi_prune
from openpi_prune import telemetry
from openpi_prune.adapter import training
from openpi_prune.tools import small
from openpi_prune.tools.lab import scenes

SIGLIP = "mu/28"
_RENDER_THREADS = 3  # batches rendered ahead of the step that trains on them
VALIDATION_SEED = 1_000_000  # training batches use seeds 0, 1, ...; validation never meets them
TEST_SEED = 2_000_000


@dataclasses.dataclass(frozen=True)
class Schedule:
    steps: int
    lr: float
    batch_size: int = 32
    # Curriculum: the first `single_object` fraction of steps shows one block only (plain
    # localisation), then the full scenes with distractors.
    single_object: float = 0.0
    warmup: int = 50
    seed: int = 0  # offset of the training batches' seeds
    # OpenPI's image augmentation in `compute_loss(train=True)` (crop, rotation, colour jitter). Off
    # in the lab: its actions are an exact function of where the named colour is, so a shifted or
    # recoloured image makes a noisy label (fine-tuning with it took the unpruned model from 0.0105
    # to 0.0294 x predict-the-mean). The pruner's training rule runs either way.
    augment: bool = False
    # Gradual pruning: over this share of the steps the kept share falls from every patch to the
    # method's `keep_fraction` (0: pruned at the setting from the first step).
    keep_ramp: float = 0.0


def family(spec):
    """The module that draws batches of `spec`'s family: `scenes` (blocks, one named by colour),
    `named` (two named objects among distractors) or `metaworld` (expert episodes)."""
    from openpi_prune.tools.lab import metaworld, named

    return {named.NamedSpec: named, metaworld.MetaWorldSpec: metaworld}.get(type(spec), scenes)


def model_config(spec: scenes.SceneSpec):
    return small.config(
        pi05=True, action_horizon=spec.horizon, max_token_len=spec.max_token_len, action_dim=spec.action_dim
    )


def siglip_depth(spec) -> int | None:
    """SigLIP's layers where `spec` names them (Meta-World's `--siglip-depth`), else `mu/28`'s one."""
    return getattr(spec, "siglip_depth", None)


def create(spec: scenes.SceneSpec, seed: int = 0):
    """A fresh pi0.5 for the lab (the active pruning method adds its parameters)."""
    return small.create(model_config(spec), seed=seed, siglip=SIGLIP, siglip_depth=siglip_depth(spec))


def load(spec: scenes.SceneSpec, params: dict):
    """A model from `params` through OpenPI's `BaseModelConfig.load`, as OpenPI serves a checkpoint:
    a method's parameters the checkpoint lacks start fresh (with a warning)."""
    with small.siglip_variant(SIGLIP, siglip_depth(spec)):
        return model_config(spec).load(params)


def params_of(model) -> dict:
    return nnx.state(model, nnx.Param).to_pure_dict()


def without_augmentation():
    """While tracing: OpenPI's `compute_loss(train=True)` preprocesses its images as at inference."""
    from openpi_prune.adapter import install, table

    return install.patched(table.UNAUGMENTED, unaugmented=True)


_TRAINABLE = nnx.All(nnx.Param, nnx.Not(lambda path, _: "input_embedding" in path))


SAVE_SECONDS = 300  # how often a resumable run saves where it is


def train(
    model,
    spec: scenes.SceneSpec,
    schedule: Schedule,
    progress=None,
    description: str = "training",
    check=None,
    resume: pathlib.Path | None = None,
    teacher=None,
):
    """Train `model` in place with the pruning settings in force (or none); returns per-step metrics:
    loss, and with pruning on the pruner's kept count and query spread in the training forward pass
    (and, for a method with its own loss, `distill_loss` and the flow-matching `action_loss`).
    `check(model) -> dict` of figures, if given, runs every tenth of the steps; they join that step's
    metrics and the progress line. With `resume`, the run saves its whole state there every few
    minutes and at the end, and a later call goes on from the last save: a run longer than a session
    is done in pieces, with the same batches and updates as one run. With a `teacher` (an unpruned
    model, frozen), each step's targets are the teacher's actions sampled from the very noise the
    loss draws (`teacher_targets`), in place of the batch's own."""
    graphdef, params, counter, rest = nnx.split(model, _TRAINABLE, training.TrainingStep, ...)
    teacher_graphdef, teacher_state = nnx.split(teacher) if teacher is not None else (None, None)
    lr = optax.warmup_cosine_decay_schedule(
        0.0, schedule.lr, min(schedule.warmup, schedule.steps // 2), max(schedule.steps, 2), schedule.lr * 0.1
    )
    optimizer = optax.adamw(lr, weight_decay=1e-4)
    opt_state = optimizer.init(params)

    @jax.jit
    def step_fn(step, params, counter, opt_state, observation, actions, teacher_state):
        rng = jax.random.fold_in(jax.random.key(schedule.seed), step)
        if teacher_state is not None:
            actions = teacher_targets(nnx.merge(teacher_graphdef, teacher_state), rng, observation, actions)

        def loss_fn(params):
            m = nnx.merge(graphdef, params, counter, rest)
            with (
                telemetry.collect() as reports,
                contextlib.nullcontext() if schedule.augment else without_augmentation(),
            ):
                loss = jnp.mean(m.compute_loss(rng, observation, actions, train=True))
            info = {}
            if reports:
                live = reports[0]["candidates"] > 0
                info = {
                    "kept": jnp.mean(reports[0]["kept"]),
                    "query_spread": jnp.sum(reports[0]["query_spread"] * live) / jnp.maximum(jnp.sum(live), 1),
                }
                if "distill_loss" in reports[0]:  # included in `loss`; the flow-matching part apart
                    distill = reports[0]["distill_loss"]
                    info["action_loss"] = loss - jnp.mean(distill)
                    # Over the samples whose saliency ran (`saliency_share`), so that shares compare.
                    info["distill_loss"] = jnp.sum(distill) / jnp.maximum(jnp.sum(distill != 0), 1)
            return loss, (info, nnx.state(m, training.TrainingStep))

        (loss, (info, counter)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), counter, opt_state, {"loss": loss, **info}

    history, start = [], 0
    if resume is not None and resume.exists():
        start, history, (params, counter, opt_state) = _restore(resume, schedule, (params, counter, opt_state))
    task = progress.add_task(description, total=schedule.steps, completed=start) if progress is not None else None
    saved = time.monotonic()

    def batch_of(step):
        batch = family(spec).render(*_batch_arguments(schedule, spec, step))
        return batch.observation(), jnp.asarray(batch.actions)

    note = ""
    # The next batches are rendered while the device trains on this one (on a GPU, rendering on
    # the host would otherwise take most of a step).
    with _schedules(schedule), concurrent.futures.ThreadPoolExecutor(_RENDER_THREADS) as pool:
        ahead = collections.deque(
            pool.submit(batch_of, s) for s in range(start, min(start + _RENDER_THREADS, schedule.steps))
        )
        for step in range(start, schedule.steps):
            observation, actions = ahead.popleft().result()
            if step + _RENDER_THREADS < schedule.steps:
                ahead.append(pool.submit(batch_of, step + _RENDER_THREADS))
            params, counter, opt_state, info = step_fn(
                step, params, counter, opt_state, observation, actions, teacher_state
            )
            history.append({k: float(v) for k, v in jax.device_get(info).items()})
            if check is not None and (step + 1) % max(schedule.steps // 10, 1) == 0:
                nnx.update(model, params, counter)
                figures = check(model)
                history[-1] |= figures
                note = " ".join(f"{k} {v:.4f}" for k, v in figures.items())
            if progress is not None:
                progress.update(task, advance=1, description=f"{description}: loss {history[-1]['loss']:.3f} {note}")
            if resume is not None and (step + 1 == schedule.steps or time.monotonic() - saved > SAVE_SECONDS):
                _save(resume, schedule, step + 1, history, (params, counter, opt_state))
                saved = time.monotonic()
    nnx.update(model, params, counter)
    return history


def teacher_targets(teacher, rng, observation, actions):
    """The unpruned `teacher`'s actions, sampled from the noise that `compute_loss(rng, observation,
    actions)` draws. Trained on them, the pruned student learns the teacher's own map from each noise
    to its actions (a reflow, as in rectified flow): where the expert's chunk is one answer, the
    teacher's map is the one that solves the scenes the teacher solves, from every noise draw."""
    from openpi_prune.adapter import wrappers

    noise, _ = wrappers.flow_draws(rng, actions)
    with warnings.catch_warnings():
        # Off and on again while this step is traced: what was compiled before is not involved.
        warnings.simplefilter("ignore", openpi_prune.TracedBeforeChangeWarning)
        with openpi_prune.disabled():
            targets = teacher.sample_actions(rng, observation, noise=noise)
    return targets.astype(actions.dtype)


def _save(path: pathlib.Path, schedule: Schedule, steps_done: int, history: list, state) -> None:
    """The training state's leaves, the steps done and their metrics; written whole or not at all."""
    leaves = {f"leaf_{i}": np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(jax.device_get(state)))}
    record = {"schedule": dataclasses.asdict(schedule), "steps_done": steps_done, "history": history}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as file:
        np.savez(file, record=np.asarray(json.dumps(record)), **leaves)
    partial.replace(path)


def _restore(path: pathlib.Path, schedule: Schedule, state) -> tuple[int, list, tuple]:
    """Where a saved run stopped, into the structure of a fresh `state` (params, step, optimiser)."""
    with np.load(path) as saved:
        record = json.loads(str(saved["record"]))
        leaves = [saved[f"leaf_{i}"] for i in range(len(saved.files) - 1)]
    if record["schedule"] != json.loads(json.dumps(dataclasses.asdict(schedule))):
        raise ValueError(
            f"{path} is a run of another schedule ({record['schedule']}, this one is "
            f"{dataclasses.asdict(schedule)}): delete it to start this run afresh"
        )
    fresh, treedef = jax.tree.flatten(state)
    if [np.shape(x) for x in fresh] != [x.shape for x in leaves]:
        raise ValueError(
            f"{path} holds another model's training state (of another shape: another --siglip-depth?): "
            "resume it with the options that made it, or delete it to start this run afresh"
        )
    restored = jax.tree.unflatten(treedef, [jnp.asarray(x, dtype=f.dtype) for x, f in zip(leaves, fresh, strict=True)])
    return record["steps_done"], record["history"], restored


@contextlib.contextmanager
def _schedules(schedule: Schedule):
    """The schedules as a user's settings carry them, counted by the model's own step: gradual
    pruning over the ramp, LightVLA's noise falling to 0 over the run."""
    if not openpi_prune.is_enabled():
        yield
        return
    ramp, noise = int(schedule.keep_ramp * schedule.steps), schedule.steps
    # What runs after the block is compiled anew (the lab jits each evaluation).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", openpi_prune.TracedBeforeChangeWarning)
        with openpi_prune.enabled(openpi_prune.current_settings(), keep_ramp_steps=ramp, noise_steps=noise):
            yield


def _batch_arguments(schedule: Schedule, spec: scenes.SceneSpec, step: int) -> tuple:
    """`scenes.render`'s arguments for a training step's batch (of the train split)."""
    single = step < int(schedule.single_object * schedule.steps)
    return schedule.seed + step, schedule.batch_size, spec, 1 if single else None, "train"


def training_layouts(schedule: Schedule, spec: scenes.SceneSpec) -> set[tuple]:
    """Every layout a training run with `schedule` draws, without drawing its images."""
    return {
        layout
        for step in range(schedule.steps)
        for layout in family(spec).layouts(*_batch_arguments(schedule, spec, step))
    }


@dataclasses.dataclass(frozen=True)
class Evaluation:
    mse: float  # validation sampled-action MSE
    mean_mse: float  # MSE of predicting the training actions' mean
    kept_per_camera: np.ndarray | None  # [samples, live cameras]
    recall: float | None  # share of the target's patches kept, over the validation set
    query_spread: float | None
    kept_mask: np.ndarray | None  # [samples, patches of every camera]
    patches_per_camera: int = 0

    @property
    def mse_ratio(self) -> float:
        return self.mse / self.mean_mse

    @property
    def kept_fraction(self) -> float | None:
        return None if self.kept_per_camera is None else float(self.kept_per_camera.mean() / self.patches_per_camera)

    def summary(self) -> dict:
        row = {"val_mse": self.mse, "mse_vs_mean": self.mse_ratio}
        if self.kept_per_camera is not None:
            k = self.kept_per_camera
            row |= {
                "kept_mean": float(k.mean()),
                "kept_min": int(k.min()),
                "kept_max": int(k.max()),
                "kept_fraction": self.kept_fraction,
                "target_recall": self.recall,
                "query_spread": self.query_spread,
            }
        return row


def validation(spec: scenes.SceneSpec, size: int = 64) -> scenes.Batch:
    """Scenes of the validation split: what choices are made on."""
    return family(spec).render(VALIDATION_SEED, size, spec, split="validation")


def test(spec: scenes.SceneSpec, size: int = 1024) -> scenes.Batch:
    """Scenes of the test split, whose layouts training never draws: what is reported."""
    return family(spec).render(TEST_SEED, size, spec, split="test")


def mean_action(spec: scenes.SceneSpec) -> np.ndarray:
    """The training actions' mean chunk: what predicting the mean predicts."""
    return family(spec).render(VALIDATION_SEED + 1, 1024, spec, split="train").actions.mean(0)


def mean_action_mse(spec: scenes.SceneSpec, val: scenes.Batch) -> float:
    return float(np.mean((val.actions - mean_action(spec)) ** 2))


_samplers: dict = {}


def _sampler(graphdef, state, num_steps: int):
    """One compiled sampler per model structure and pruning settings (a stressed copy of a model
    reuses its model's): the settings in force when it was traced stay compiled in."""
    # Each parameter's path, shape and dtype: two models that differ only in a size (an action
    # dimension) must not share a sampler traced for the other's.
    leaves = jax.tree_util.tree_flatten_with_path(state.to_pure_dict())[0]
    structure = tuple((jax.tree_util.keystr(path), jnp.shape(x), str(jnp.result_type(x))) for path, x in leaves)
    key = (structure, openpi_prune.current_settings(), num_steps)
    if key not in _samplers:

        @jax.jit
        def sample(state, observation, noise_seed):
            m = nnx.merge(graphdef, state)
            with telemetry.collect() as reports:
                actions = m.sample_actions(jax.random.key(noise_seed), observation, num_steps=num_steps)
            return actions, (reports[0] if reports else {})

        _samplers[key] = sample
    return _samplers[key]


def sample(model, batch: scenes.Batch, noise_seed: int = VALIDATION_SEED, num_steps: int = 10, chunk: int = 256):
    """`sample_actions` on `batch` (noise from `noise_seed`, in chunks of `chunk` scenes) and the
    pruner's report, each as numpy."""
    graphdef, state = nnx.split(model)
    sampler = _sampler(graphdef, state, num_steps)
    parts = []
    for start in range(0, len(batch.actions), chunk):
        observation = jax.tree.map(lambda x, s=start: x[s : s + chunk], batch.observation())
        parts.append(jax.device_get(sampler(state, observation, jnp.uint32(noise_seed + start))))
    actions = np.concatenate([np.asarray(a) for a, _ in parts])
    report = {k: np.concatenate([np.asarray(r[k]) for _, r in parts]) for k in parts[0][1]}
    return actions, report


def evaluate(model, spec: scenes.SceneSpec, val: scenes.Batch, mean_mse: float, num_steps: int = 10) -> Evaluation:
    """Sampled actions (fixed noise) against the truth, and what the pruner in force kept."""
    pruned = openpi_prune.is_enabled()
    actions, report = sample(model, val, num_steps=num_steps)
    mse = float(np.mean((actions - val.actions) ** 2))
    if not pruned or not report:
        return Evaluation(mse, mean_mse, None, None, None, None)
    live = [i for i, camera in enumerate(val.images) if camera != scenes.MASKED_CAMERA]
    kept_mask = report["kept_mask"]
    target = val.target_mask
    recall = float((kept_mask & target).sum() / target.sum())
    return Evaluation(
        mse,
        mean_mse,
        report["kept_per_camera"][:, live],
        recall,
        float(np.mean(report["query_spread"])),
        kept_mask,
        spec.grid**2,
    )


def save_params(params: dict, path: pathlib.Path) -> None:
    """Save as OpenPI saves `params` (orbax, `{"params": ...}`), so OpenPI's `restore_params` reads it."""
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(path.absolute(), {"params": params}, force=True)


def restore_params(path: pathlib.Path, spec: scenes.SceneSpec) -> dict:
    """Params saved by `save_params`, for a model of this spec with the pruning settings in force
    (a fine-tuned variant's own parameters, such as the relevance head, included)."""
    import orbax.checkpoint as ocp

    # orbax itself, not OpenPI's `restore_params`, which reads metadata as only the orbax version
    # OpenPI pins lays it out. Each leaf as numpy (the tree from a model of this spec), then as a
    # device array: a traced index cannot read numpy leaves.
    tree = params_of(create(spec))
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), {"params": tree})
    with ocp.PyTreeCheckpointer() as checkpointer:
        restored = checkpointer.restore(path.absolute(), args=ocp.args.PyTreeRestore(restore_args=restore_args))
    return jax.tree.map(jnp.asarray, restored["params"])
