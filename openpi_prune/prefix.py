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
import numpy as np
from flax import nnx

from openpi_prune import lightvla, plugins, relevance, telemetry
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
    saliency: jax.Array | None = None  # [b, image tokens], for methods that learn from it
    extra_losses: list | None = None  # per-sample losses the pruner adds to this training call
    # What `prune` leaves for `upstream_positions`: per prefix slot and after the prefix, how far
    # each token's position moved when pruned tokens left the mask.
    position_shift: dict = dataclasses.field(default_factory=dict)


_actions: contextvars.ContextVar[ActionContext | None] = contextvars.ContextVar("openpi_prune_actions", default=None)
_noise_scale: contextvars.ContextVar = contextvars.ContextVar("openpi_prune_noise_scale", default=None)
_keep_fraction: contextvars.ContextVar = contextvars.ContextVar("openpi_prune_keep_fraction", default=None)


@contextlib.contextmanager
def noisy_actions(x_t, time, *, rng=None, train: bool = False, saliency=None, extra_losses: list | None = None):
    """Hand the pruner the flow-matching input of the model call made inside the block (and, in
    training, the model's saliency and a list that collects the pruner's own losses)."""
    if train and rng is None:
        raise PruneInputError("noisy_actions(train=True) needs rng=: training adds random noise to the vote scores")
    token = _actions.set(ActionContext(jnp.asarray(x_t), jnp.asarray(time), rng, train, saliency, extra_losses))
    try:
        yield
    finally:
        _actions.reset(token)


class _Probe:
    """Inside `saliency`: `embed_prefix` returns the unpruned prefix with `delta` added to its image
    tokens (or, with no delta yet, records their shape)."""

    def __init__(self):
        self.delta = None
        self.shape = None

    def apply(self, tokens, image_len):
        if self.delta is None:
            self.shape = jax.ShapeDtypeStruct(tokens[:, :image_len].shape, tokens.dtype)
            return tokens
        return tokens.at[:, :image_len].add(self.delta.astype(tokens.dtype))


_probe: contextvars.ContextVar[_Probe | None] = contextvars.ContextVar("openpi_prune_probe", default=None)


def probing() -> bool:
    return _probe.get() is not None


def wants_saliency() -> bool:
    return bool(plugins.get_manager().hook.openpi_prune_wants_saliency(settings=active_settings()))


def saliency(loss_fn) -> jax.Array:
    """`[b, image tokens]`: the norm of the gradient of the unpruned `loss_fn()` (per-sample losses,
    e.g. OpenPI's `compute_loss`) at each image token of the prefix; no gradient flows back into it."""
    probe = _Probe()
    token = _probe.set(probe)
    try:
        jax.eval_shape(loss_fn)
        if probe.shape is None:
            raise PruneInputError("saliency: the loss never built a prefix (no embed_prefix call inside it)")

        def total(delta):
            probe.delta = delta
            return jnp.sum(loss_fn().astype(jnp.float32))

        grad = jax.grad(total)(jnp.zeros(probe.shape.shape, probe.shape.dtype))
    finally:
        _probe.reset(token)
    return jax.lax.stop_gradient(jnp.linalg.norm(grad.astype(jnp.float32), axis=-1))


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


def _or_setting(scheduled, setting):
    """A training schedule's value (`noise_scale`, `keep_fraction` blocks) if one is in force."""
    return setting if scheduled is None else scheduled


@contextlib.contextmanager
def keep_fraction(fraction):
    """Share of the live patches a training pass keeps inside the block; may be a traced value, e.g.
    `gradual_keep_fraction(step, ...)` computed in the train step, overriding `PruneSettings.keep_fraction`."""
    token = _keep_fraction.set(fraction)
    try:
        yield
    finally:
        _keep_fraction.reset(token)


def gradual_keep_fraction(step, ramp_steps: int, final: float):
    """Gradual pruning: every patch at step 0, falling linearly to `final` at `ramp_steps`, then `final`."""
    done = jnp.clip(jnp.asarray(step, jnp.float32) / max(ramp_steps, 1), 0.0, 1.0)
    return 1.0 - (1.0 - final) * done


# Parameters a method adds to `Pi0` are named so; loaders fill them in like OpenPI's LoRA weights.
PARAMETER_PREFIX = "prune_"


class UntrainedParametersWarning(UserWarning):
    """A checkpoint lacks the parameters the pruning method adds; they start from scratch."""


class UnusedParametersWarning(UserWarning):
    """A checkpoint carries another pruning method's parameters, which this model does not use."""


def init_model(model, config, rngs) -> None:
    settings = active_settings()
    plugins.get_manager().hook.openpi_prune_init_model(model=model, config=config, rngs=rngs, settings=settings)


class _Additions(nnx.Module):
    """Stands in for a `Pi0` to collect only what `openpi_prune_init_model` adds."""


def fresh_parameters(config, seed: int = 0) -> dict:
    """The parameters the active method adds to a model of `config`, freshly initialised."""
    holder = _Additions()
    init_model(holder, config, nnx.Rngs(seed))
    return nnx.state(holder, nnx.Param).to_pure_dict()


def complete_params(config, params: dict) -> dict:
    """`params` plus fresh values for the method's parameters it lacks (warning that they are new)."""
    fresh = fresh_parameters(config)
    method = active_settings().method
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


def _check_shapes(name: str, expected, got, method: str) -> None:
    shapes = jax.tree.map(lambda leaf: tuple(leaf.shape), {"expected": expected, "got": got})
    if shapes["expected"] != shapes["got"]:
        raise PruneInputError(
            f"the checkpoint's {name} has shapes {shapes['got']}, but {method} on this model needs "
            f"{shapes['expected']}: it was trained on a model of another size. Load it into that "
            "model's config, or drop the prune_* parameters to start them anew."
        )


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


def observation_for_prefix(observation):
    """`observation` less the cameras `drop_cameras` names, for `embed_prefix` to embed."""
    drop = active_settings().drop_cameras
    if not drop:
        return observation
    present = list(observation.images)
    missing = [c for c in drop if c not in present]
    kept = [c for c in present if c not in drop]
    if missing or not kept:
        problem = f"names {', '.join(missing)}, which it does not have" if missing else "drops every one of them"
        raise PruneInputError(
            f"drop_cameras={drop!r}: the observation has the cameras {', '.join(present)}, and the setting "
            f"{problem}. Name only cameras of this config that it never uses."
        )
    return dataclasses.replace(
        observation,
        images={c: observation.images[c] for c in kept},
        image_masks={c: m for c, m in observation.image_masks.items() if c in kept},
    )


_PROMPT_FIELDS = ("tokenized_prompt", "tokenized_prompt_mask", "token_ar_mask", "token_loss_mask")


def bucket_prompt(observation, buckets: tuple[int, ...]):
    """`observation` with the prompt's trailing padding cut to the smallest of `buckets` that holds
    every live token (of any sample), or as it is. On concrete arrays, before a jitted call, so
    that each bucket compiles once; padding is masked out of attention, so the actions are upstream's."""
    mask = observation.tokenized_prompt_mask
    if not buckets or mask is None:
        return observation
    width = mask.shape[1]
    live = np.asarray(mask).any(axis=0)
    needed = int(np.flatnonzero(live)[-1]) + 1 if live.any() else 0
    length = next((b for b in buckets if needed <= b < width), width)
    if length == width:
        return observation
    cut = {f: getattr(observation, f)[:, :length] for f in _PROMPT_FIELDS if getattr(observation, f, None) is not None}
    return dataclasses.replace(observation, **cut)


def prune(model, observation, tokens, input_mask, ar_mask):
    """The pruned version of `embed_prefix`'s `(tokens, input_mask, ar_mask)`."""
    settings = active_settings()
    manager = plugins.get_manager()
    plugins.check_method(settings.method, manager)
    per_camera, cameras = split_prefix(observation, tokens)
    image_len = per_camera * cameras
    probe = _probe.get()
    if probe is not None:
        return probe.apply(tokens, image_len), input_mask, ar_mask
    capacity = settings.capacity
    if capacity is None:
        capacity = manager.hook.openpi_prune_capacity(image_tokens=image_len, settings=settings)
        capacity = CAPACITY_PER_CAMERA * cameras if capacity is None else capacity
    if settings.mode == "compact" and capacity > image_len:
        raise PruneInputError(
            f"capacity {capacity} exceeds the {image_len} image tokens of this model's {cameras} "
            f"camera(s); choose 1..{image_len} (or leave it unset for the method's own, or {CAPACITY_PER_CAMERA} "
            "per camera)."
        )
    unpruned_mask = input_mask
    image_tokens, text_tokens = tokens[:, :image_len], tokens[:, image_len:]
    candidate_mask, text_mask = input_mask[:, :image_len], input_mask[:, image_len:]
    # A token with a NaN or inf in it (a bad pixel spreads over its camera in SigLIP) is never kept,
    # and is zeroed: attention over a masked NaN would still give NaN (0 x NaN).
    finite = jnp.all(jnp.isfinite(image_tokens), axis=-1)
    nonfinite = jnp.sum(candidate_mask & ~finite, axis=-1)
    candidate_mask = candidate_mask & finite
    image_tokens = jnp.where(finite[..., None], image_tokens, 0)
    tokens = jnp.concatenate([image_tokens, text_tokens], axis=1)
    input_mask = jnp.concatenate([candidate_mask, text_mask], axis=1)
    slot_source = jnp.broadcast_to(jnp.arange(tokens.shape[1]), input_mask.shape)
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
        model=model,
        image_tokens=scored_patches,
        candidate_mask=candidate_mask,
        task_tokens=scored_task,
        task_mask=task_mask,
        settings=settings,
    )
    b, n = candidate_mask.shape
    _check_output("openpi_prune_score", scores, ((b, n, n), (b, n)), settings, manager)
    live_task = jnp.sum(task_mask, axis=-1)
    # A vote ([b,n,n]) ranks patches by their votes; a relevance ([b,n]) by itself.
    voted = scores.ndim == 3
    counts = lightvla.votes(scores, candidate_mask) if voted else relevance.priority(scores, candidate_mask)

    extra = {}  # training-only telemetry
    if context is not None and context.train:
        # Training keeps the length (LightVLA: each live patch becomes its noisy pick).
        scale = _or_setting(_noise_scale.get(), settings.noise_scale)
        noise = jax.random.uniform(context.rng, scores.shape, dtype=scores.dtype) * scale
        selected = hook.openpi_prune_select_train(
            scores=scores,
            candidate_mask=candidate_mask,
            image_tokens=image_tokens,
            noise=noise,
            saliency=context.saliency,
            keep_fraction=_or_setting(_keep_fraction.get(), settings.keep_fraction),
            settings=settings,
        )
        if not isinstance(selected, tuple | list) or len(selected) not in (2, 3):
            _check_output("openpi_prune_select_train", selected, (), settings, manager)
        picked, kept_mask, *visible = selected
        _check_output("openpi_prune_select_train", picked, (image_tokens.shape,), settings, manager)
        _check_output("openpi_prune_select_train", kept_mask, ((b, n),), settings, manager)
        tokens = jnp.concatenate([picked, text_tokens], axis=1)
        if visible:
            input_mask = jnp.concatenate([candidate_mask & visible[0], text_mask], axis=1)
        if context.saliency is not None and context.extra_losses is not None:
            loss = hook.openpi_prune_distill_loss(
                scores=scores, saliency=context.saliency, candidate_mask=candidate_mask, settings=settings
            )
            if loss is not None:
                context.extra_losses.append(loss)
                extra["distill_loss"] = loss
        mode, slot_capacity, overflow = "train", image_len, jnp.zeros(tokens.shape[:1], jnp.int32)
    else:
        kept_mask = hook.openpi_prune_select(scores=scores, candidate_mask=candidate_mask, settings=settings)
        _check_output("openpi_prune_select", kept_mask, ((b, n),), settings, manager)
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
            slot_source = jnp.concatenate([indices, slot_source[:, image_len:]], axis=1)

    if context is not None and settings.keep_positions:
        shift, after = _position_shift(unpruned_mask, slot_source, input_mask)
        context.position_shift.update(prefix=shift, after=after)

    if extension is not None:
        tokens, input_mask, ar_mask = _extend(tokens, input_mask, ar_mask, extension)
    if not (settings.telemetry or telemetry.collecting()):
        return tokens, input_mask, ar_mask
    values = (
        _telemetry(
            scores,
            counts,
            candidate_mask,
            kept_mask,
            scored_patches,
            scored_task,
            task_mask,
            per_camera,
            overflow,
            voted,
        )
        | extra
    )
    values["prefix_length"] = jnp.full(tokens.shape[:1], tokens.shape[1], jnp.int32)
    values["nonfinite"] = nonfinite
    telemetry.deliver_traced(values)
    if settings.telemetry:
        meta = dict(method=settings.method, mode=mode, capacity=slot_capacity, warn_below=settings.warn_below)
        jax.debug.callback(functools.partial(_report, meta), values)
    return tokens, input_mask, ar_mask


def _check_output(hook_name: str, value, shapes: tuple, settings: PruneSettings, manager) -> None:
    """A method's hook must answer with an array of one of `shapes` (checked while tracing)."""
    shape = getattr(value, "shape", None)
    if shape is not None and tuple(shape) in shapes:
        return
    provider = plugins.known_methods(manager).get(settings.method, "?")
    got = f"shape {tuple(shape)}" if shape is not None else f"a {type(value).__name__}"
    wanted = " or ".join(str(list(s)) for s in shapes) or "a tuple (image_tokens, kept_mask[, visible])"
    raise PruneInputError(
        f"{hook_name} of method {settings.method!r} (plugin {provider!r}) returned {got}; expected "
        f"{wanted}. Fix the plugin, or pick another method."
    )


def _position_shift(unpruned_mask, slot_source, input_mask):
    """Upstream position minus pruned position of every slot (`slot_source`: the unpruned index
    each slot holds), and of whatever follows the prefix."""
    upstream = jnp.take_along_axis(jnp.cumsum(unpruned_mask, axis=1), slot_source, axis=1)
    pruned = jnp.cumsum(input_mask[:, : slot_source.shape[1]], axis=1)
    after = jnp.sum(unpruned_mask, axis=1) - jnp.sum(input_mask, axis=1)
    return upstream - pruned, after


def upstream_positions(embedded, positions):
    """`positions` of a PaliGemma call inside a pruned `compute_loss` / `sample_actions`, moved back to
    where upstream had them; None when nothing is to be moved (`embedded[0]` is the prefix, if present)."""
    context = _actions.get()
    shift = None if context is None else context.position_shift
    if not shift:
        return None
    after = shift["after"][:, None]
    if embedded[0] is None:  # the suffix alone, against the cached prefix
        return positions + after
    prefix_shift = shift["prefix"]
    rest = positions.shape[1] - prefix_shift.shape[1]
    return positions + jnp.concatenate([prefix_shift, jnp.broadcast_to(after, (after.shape[0], rest))], axis=1)


def _extend(tokens, input_mask, ar_mask, extension):
    """Append tokens no one attends to: `input_mask` False hides them from every query, and
    positions (`cumsum(input_mask)`) of the tokens before them stay the same."""
    b, e = extension.shape[:2]
    tokens = jnp.concatenate([tokens, extension.astype(tokens.dtype)], axis=1)
    input_mask = jnp.concatenate([input_mask, jnp.zeros((b, e), dtype=bool)], axis=1)
    ar_mask = jnp.concatenate([ar_mask, jnp.zeros((e,), dtype=ar_mask.dtype)])
    return tokens, input_mask, ar_mask


def _telemetry(
    scores, counts, candidate_mask, kept_mask, image_tokens, task_tokens, task_mask, per_camera, overflow, voted
):
    queries = lightvla.rms_normalize(lightvla.task_queries(image_tokens, task_tokens, task_mask))
    b, n = kept_mask.shape
    if voted:
        choice = lightvla.vote_statistics(scores, candidate_mask, counts)
    else:
        choice = relevance.statistics(scores, candidate_mask, kept_mask)
    return {
        "kept": jnp.sum(kept_mask, axis=-1),
        "kept_per_camera": jnp.sum(kept_mask.reshape(b, n // per_camera, per_camera), axis=-1),
        "candidates": jnp.sum(candidate_mask, axis=-1),
        **choice,
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
    # The built-in recorder at once (a policy's response carries its figures); the plugins' hooks,
    # in pluggy's order, on the delivery thread, so that none can fail or stall this model call.
    hooks = list(reversed(plugins.get_manager().hook.openpi_prune_report.get_hookimpls()))
    recorders = [h for h in hooks if h.plugin is telemetry.RECORDER]
    for hook in recorders:
        hook.function(telemetry=report)
    others = [h for h in hooks if h.plugin is not telemetry.RECORDER]
    if others:
        telemetry.DELIVERY.put(others, report)


def serving_figures(reports) -> dict | None:
    """What a policy server sends with the actions: the pruning of this call (`reports`: its host
    telemetry, the last one its prefix for the actions), or None without any."""
    import numpy as np

    if not reports:
        return None
    report = reports[-1]
    return {
        "method": report.method,
        "kept": int(report.kept[0]),
        "kept_per_camera": np.asarray(report.kept_per_camera[0], np.int32),
        "live_image_tokens": int(report.candidates[0]),
        "prefix_length": int(report.prefix_length[0]),
    }
