"""The pruned prefix: what the patched OpenPI methods hand over to, and where the hooks are asked.

Between the math (`lightvla`) and the patches (`patch`): it splits OpenPI's prefix into image and
prompt tokens, asks the hooks for a task context, scores and a kept set, and returns the prefix
OpenPI goes on with: masked (same length) or compact (`capacity` image slots, really shorter).
"""

import contextlib
import contextvars
import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
from flax import nnx

from openpi_prune import lightvla, plugins, telemetry
from openpi_prune.errors import PruneInputError
from openpi_prune.settings import CAPACITY_PER_CAMERA, PruneSettings

_settings: PruneSettings = PruneSettings()


def active_settings() -> PruneSettings:
    return _settings


def set_settings(settings: PruneSettings) -> None:
    global _settings
    _settings = settings


@dataclasses.dataclass(frozen=True)
class ActionContext:
    noisy_actions: jax.Array
    time: jax.Array
    rng: jax.Array | None  # for the training noise on the scores
    train: bool


_actions: contextvars.ContextVar[ActionContext | None] = contextvars.ContextVar("openpi_prune_actions", default=None)
_noise_scale: contextvars.ContextVar = contextvars.ContextVar("openpi_prune_noise_scale", default=None)


@contextlib.contextmanager
def noisy_actions(x_t, time, *, rng=None, train: bool = False):
    """Hand the pruner the flow-matching input of the model call made inside the block."""
    if train and rng is None:
        raise PruneInputError("noisy_actions(train=True) needs rng=: training adds random noise to the vote scores")
    token = _actions.set(ActionContext(jnp.asarray(x_t), jnp.asarray(time), rng, train))
    try:
        yield
    finally:
        _actions.reset(token)


@contextlib.contextmanager
def noise_scale(scale):
    """Scale of the training noise on the scores inside the block; may be a traced value, e.g.
    `linear_noise_scale(step, total_steps)` computed in the train step, overriding `PruneSettings.noise_scale`."""
    token = _noise_scale.set(scale)
    try:
        yield
    finally:
        _noise_scale.reset(token)


def linear_noise_scale(step, total_steps: int, start: float = 1.0):
    """LightVLA's schedule: `start` at step 0, falling linearly to 0 at `total_steps`."""
    return start * jnp.clip(1.0 - jnp.asarray(step, jnp.float32) / total_steps, 0.0, 1.0)


# Parameters a method adds to `Pi0` are named so; loaders fill them in like OpenPI's LoRA weights.
PARAMETER_PREFIX = "prune_"


class UntrainedParametersWarning(UserWarning):
    """A checkpoint lacks the parameters the pruning method adds; they start from scratch."""


def init_model(model, config, rngs) -> None:
    settings = active_settings()
    plugins.get_manager().hook.openpi_prune_init_model(model=model, config=config, rngs=rngs, settings=settings)


class _Additions(nnx.Module):
    """Stands in for a `Pi0` to collect only what `openpi_prune_init_model` adds."""


def fresh_parameters(config) -> dict:
    """The parameters the active method adds to a model of `config`, freshly initialised (seed 0)."""
    holder = _Additions()
    init_model(holder, config, nnx.Rngs(0))
    return nnx.state(holder, nnx.Param).to_pure_dict()


def complete_params(config, params: dict) -> dict:
    """`params` plus fresh values for the method's parameters it lacks (warning that they are new)."""
    missing = {k: v for k, v in fresh_parameters(config).items() if k not in params}
    if not missing:
        return params
    warnings.warn(
        f"the checkpoint has no {', '.join(sorted(missing))} (it was trained without "
        f"{active_settings().method}); pruning with freshly initialised, untrained parameters. Fine-tune "
        "with openpi-prune enabled to train them.",
        UntrainedParametersWarning,
        stacklevel=4,
    )
    return {**params, **missing}


def add_missing_from_reference(loaded: dict, reference: dict) -> dict:
    """`loaded` plus the method's parameters from `reference` where the checkpoint had none."""
    extra = {k: v for k, v in reference.items() if k.startswith(PARAMETER_PREFIX) and k not in loaded}
    return {**loaded, **extra} if extra else loaded


def adjust_attn_mask(attn_mask, input_mask, mask_ar):
    adjusted = plugins.get_manager().hook.openpi_prune_attn_mask(
        attn_mask=attn_mask, input_mask=input_mask, mask_ar=mask_ar, settings=active_settings()
    )
    return attn_mask if adjusted is None else adjusted


def split_prefix(observation, tokens) -> tuple[int, int]:
    """(image tokens per camera, number of cameras) of an `embed_prefix` output."""
    if observation.tokenized_prompt is None:
        raise PruneInputError(
            "the observation has no tokenized prompt: the pruner's patches vote against the task "
            "tokens, so pruning needs one. Tokenize a prompt (OpenPI's TokenizePrompt transform), or "
            "disable openpi-prune for prompt-free models."
        )
    cameras = len(observation.images)
    image_len = tokens.shape[1] - observation.tokenized_prompt.shape[1]
    if cameras == 0 or image_len <= 0 or image_len % cameras:
        raise PruneInputError(
            f"embed_prefix gave {tokens.shape[1]} tokens for {cameras} camera(s) and a "
            f"{observation.tokenized_prompt.shape[1]}-token prompt; expected an equal number of tokens "
            "per camera followed by the prompt."
        )
    return image_len // cameras, cameras


def prune(model, observation, tokens, input_mask, ar_mask):
    """The pruned version of `embed_prefix`'s `(tokens, input_mask, ar_mask)`."""
    settings = active_settings()
    manager = plugins.get_manager()
    plugins.check_method(settings.method, manager)
    per_camera, cameras = split_prefix(observation, tokens)
    image_len = per_camera * cameras
    capacity = settings.capacity_for(cameras)
    if settings.mode == "compact" and capacity > image_len:
        raise PruneInputError(
            f"capacity {capacity} exceeds the {image_len} image tokens of this model's {cameras} "
            f"camera(s); choose 1..{image_len} (or leave it unset for {CAPACITY_PER_CAMERA} per camera)."
        )
    image_tokens, text_tokens = tokens[:, :image_len], tokens[:, image_len:]
    candidate_mask, text_mask = input_mask[:, :image_len], input_mask[:, image_len:]
    context = _actions.get()
    hook = manager.hook
    task_tokens, task_mask = hook.openpi_prune_task_context(
        model=model,
        text_tokens=text_tokens,
        text_mask=text_mask,
        noisy_actions=None if context is None else context.noisy_actions,
        time=None if context is None else context.time,
        settings=settings,
    )
    extension = hook.openpi_prune_prefix_extension(
        model=model, task_tokens=task_tokens, task_mask=task_mask, settings=settings
    )
    # What the vote sees; the prefix keeps the tokens as they came.
    scored_patches, scored_task = lightvla.prepare(
        image_tokens, candidate_mask, task_tokens, task_mask, settings.scoring
    )
    scores = hook.openpi_prune_score(
        image_tokens=scored_patches,
        candidate_mask=candidate_mask,
        task_tokens=scored_task,
        task_mask=task_mask,
        settings=settings,
    )
    live_task = jnp.sum(task_mask, axis=-1)
    counts = lightvla.votes(scores, candidate_mask)

    if context is not None and context.train:
        # Training keeps the length (LightVLA: each live patch becomes its noisy pick).
        scale = _noise_scale.get()
        scale = settings.noise_scale if scale is None else scale
        noise = jax.random.uniform(context.rng, scores.shape, dtype=scores.dtype) * scale
        picked, kept_mask = hook.openpi_prune_select_train(
            scores=scores, candidate_mask=candidate_mask, image_tokens=image_tokens, noise=noise, settings=settings
        )
        tokens = jnp.concatenate([picked, text_tokens], axis=1)
        mode, slot_capacity, overflow = "train", image_len, jnp.zeros(tokens.shape[:1], jnp.int32)
    else:
        kept_mask = hook.openpi_prune_select(scores=scores, candidate_mask=candidate_mask, settings=settings)
        # No live task token: nothing to vote against, so keep every live patch.
        kept_mask = jnp.where(live_task[:, None] > 0, kept_mask, True) & candidate_mask
        mode = settings.mode
        if mode == "masked":
            input_mask = jnp.concatenate([kept_mask, text_mask], axis=1)
            slot_capacity, overflow = image_len, jnp.zeros(tokens.shape[:1], jnp.int32)
        else:
            indices, slot_mask, overflow = lightvla.fit_capacity(kept_mask, counts, capacity)
            kept_image = jnp.take_along_axis(image_tokens, indices[..., None], axis=1)
            tokens = jnp.concatenate([kept_image, text_tokens], axis=1)
            input_mask = jnp.concatenate([slot_mask, text_mask], axis=1)
            ar_mask = jnp.concatenate([ar_mask[:capacity], ar_mask[image_len:]])
            rows = jnp.arange(kept_mask.shape[0])[:, None]
            kept_mask = jnp.zeros_like(kept_mask).at[rows, indices].set(slot_mask)
            slot_capacity = capacity

    if extension is not None:
        tokens, input_mask, ar_mask = _extend(tokens, input_mask, ar_mask, extension)
    if not (settings.telemetry or telemetry.collecting()):
        return tokens, input_mask, ar_mask
    values = _telemetry(
        scores, counts, candidate_mask, kept_mask, scored_patches, scored_task, task_mask, per_camera, overflow
    )
    telemetry.deliver_traced(values)
    if settings.telemetry:
        meta = dict(method=settings.method, mode=mode, capacity=slot_capacity, warn_below=settings.warn_below)
        jax.debug.callback(functools.partial(_report, meta), values)
    return tokens, input_mask, ar_mask


def _extend(tokens, input_mask, ar_mask, extension):
    """Append tokens no one attends to: `input_mask` False hides them from every query, and
    positions (`cumsum(input_mask)`) of the tokens before them stay the same."""
    b, e = extension.shape[:2]
    tokens = jnp.concatenate([tokens, extension.astype(tokens.dtype)], axis=1)
    input_mask = jnp.concatenate([input_mask, jnp.zeros((b, e), dtype=bool)], axis=1)
    ar_mask = jnp.concatenate([ar_mask, jnp.zeros((e,), dtype=ar_mask.dtype)])
    return tokens, input_mask, ar_mask


def _telemetry(scores, counts, candidate_mask, kept_mask, image_tokens, task_tokens, task_mask, per_camera, overflow):
    queries = lightvla.rms_normalize(lightvla.task_queries(image_tokens, task_tokens, task_mask))
    b, n = kept_mask.shape
    return {
        "kept": jnp.sum(kept_mask, axis=-1),
        "kept_per_camera": jnp.sum(kept_mask.reshape(b, n // per_camera, per_camera), axis=-1),
        "candidates": jnp.sum(candidate_mask, axis=-1),
        **lightvla.vote_statistics(scores, candidate_mask, counts),
        "query_spread": lightvla.spread(queries, candidate_mask),
        "patch_spread": lightvla.spread(lightvla.rms_normalize(image_tokens), candidate_mask),
        "task_spread": lightvla.spread(lightvla.rms_normalize(task_tokens), task_mask),
        "live_task_tokens": jnp.sum(task_mask, axis=-1),
        "overflow": overflow,
        "kept_mask": kept_mask,
    }


def _report(meta, values):
    import numpy as np

    report = telemetry.Telemetry(values={k: np.asarray(v) for k, v in values.items()}, **meta)
    plugins.get_manager().hook.openpi_prune_report(telemetry=report)
