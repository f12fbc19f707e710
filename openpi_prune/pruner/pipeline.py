"""The prune pipeline on arrays, as named steps: clean the image tokens, build the task context and
score the patches (the hooks), select (training: same length; masked: same length, pruned tokens
out of the mask; compact: `capacity` slots), append a method's hidden extension, and measure.
With `siglip_layer` (pruning inside SigLIP) each camera keeps its own share and has its own slots,
so that SigLIP's later layers run on a fixed number of patches per camera.

It knows nothing of OpenPI: the adapter hands it the image and prompt tokens of a prefix and
turns what it returns back into OpenPI's prefix (and its positions).
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from openpi_prune import call, telemetry
from openpi_prune.errors import PruneInputError
from openpi_prune.pruner import lightvla, merge, plugins, relevance
from openpi_prune.settings import CAPACITY_PER_CAMERA, PruneSettings


@dataclasses.dataclass(frozen=True)
class Prefix:
    """A prefix split for the pruner: image tokens (cameras in order), then the prompt."""

    image_tokens: jax.Array  # [b, n, d]
    text_tokens: jax.Array  # [b, t, d]
    candidate_mask: jax.Array  # [b, n]: live image tokens
    text_mask: jax.Array  # [b, t]
    ar_mask: jax.Array  # [n + t]
    per_camera: int


@dataclasses.dataclass(frozen=True)
class Pruned:
    tokens: jax.Array
    input_mask: jax.Array
    ar_mask: jax.Array
    slot_source: jax.Array  # [b, slots]: the unpruned index of the token each slot holds (before any extension)
    # Masked mode with `siglip_layer`: the patches the compact prefix would hold (the kept ones), which
    # SigLIP's later layers run on; None: those of `slot_source`.
    encoder_source: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class _Scored:
    task_tokens: jax.Array
    task_mask: jax.Array
    extension: jax.Array | None
    scored_patches: jax.Array  # as the scoring prepared them
    scored_task: jax.Array
    scores: jax.Array  # a vote [b,n,n] or a relevance [b,n]
    counts: jax.Array  # [b,n]: the priority the kept set is ranked by
    voted: bool


def prune(model, prefix: Prefix, state: call.CallState | None, settings: PruneSettings) -> Pruned:
    """The pruned prefix for `prefix` under `settings`, for the call whose state is `state`."""
    manager = plugins.get_manager()
    plugins.check_method(settings.method, manager)
    n = prefix.image_tokens.shape[1]
    cameras = n // prefix.per_camera
    capacity = compact_capacity(settings, n, cameras, manager)
    image_tokens, candidate_mask, nonfinite = _finite_only(prefix.image_tokens, prefix.candidate_mask)
    prefix = dataclasses.replace(prefix, image_tokens=image_tokens, candidate_mask=candidate_mask)
    scored = _score(model, prefix, state, settings, manager)
    extra, merged_mask = {}, None
    if state is not None and state.train:
        pruned, kept_mask, extra = _select_train(prefix, scored, state, settings, manager)
        mode, overflow = "train", jnp.zeros(image_tokens.shape[:1], jnp.int32)
        slots = pruned.input_mask.shape[1] - prefix.text_mask.shape[1]
    else:
        kept_mask = _select(prefix, scored, settings, manager)
        if settings.merge_unkept:
            prefix, kept_mask, merged_mask = _merged(prefix, prefix.image_tokens, kept_mask, settings.merge_unkept)
        if settings.mode == "masked" and settings.siglip_layer is not None:
            # SigLIP's later layers run on the patches the compact prefix holds, and those are kept:
            # masked and compact mode give the same tokens.
            compact, kept_mask, overflow = _compact(prefix, kept_mask, scored.counts, min(capacity, n), settings)
            image_slots = compact.slot_source.shape[1] - prefix.text_tokens.shape[1]
            encoder_source = compact.slot_source[:, :image_slots]
            pruned = dataclasses.replace(_masked(prefix, kept_mask), encoder_source=encoder_source)
            mode, slots = "masked", n
        elif settings.mode == "masked":
            pruned = _masked(prefix, kept_mask)
            mode, slots, overflow = "masked", n, jnp.zeros(image_tokens.shape[:1], jnp.int32)
        else:
            pruned, kept_mask, overflow = _compact(prefix, kept_mask, scored.counts, capacity, settings)
            mode, slots = "compact", pruned.slot_source.shape[1] - prefix.text_tokens.shape[1]
    if scored.extension is not None:
        pruned = _extend(pruned, scored.extension)
    if settings.telemetry or telemetry.collecting():
        values = _measure(prefix, scored, kept_mask, overflow) | extra
        values["prefix_length"] = jnp.full(pruned.tokens.shape[:1], pruned.tokens.shape[1], jnp.int32)
        values["nonfinite"] = nonfinite
        if merged_mask is not None:  # a slot compact mode dropped (overflow) holds nothing
            values["merged_mask"] = merged_mask & kept_mask
        telemetry.deliver_traced(values)
        if settings.telemetry:
            description = dict(
                method=settings.method,
                mode=mode,
                capacity=slots,
                warn_below=settings.warn_below,
                log_every=settings.log_every,
            )
            if not telemetry.deliver_returned(description, values):
                jax.debug.callback(functools.partial(report, description), values)
    return pruned


def compact_capacity(settings: PruneSettings, n: int, cameras: int, manager) -> int:
    """The compact prefix's image slots: the setting, else the method's own, else 64 per camera."""
    capacity = settings.capacity
    if capacity is None:
        capacity = method_capacity(settings, n, cameras, manager)
        capacity = CAPACITY_PER_CAMERA * cameras if capacity is None else capacity
    if settings.mode == "compact" and capacity > n:
        raise PruneInputError(
            f"capacity {capacity} exceeds the {n} image tokens of this model's {cameras} "
            f"camera(s); choose 1..{n} (or leave it unset for the method's own, or {CAPACITY_PER_CAMERA} "
            "per camera)."
        )
    return capacity


def method_capacity(settings: PruneSettings, n: int, cameras: int, manager) -> int | None:
    """The slots the method asks for (None: it names none), with room for the merged tokens."""
    capacity = manager.hook.openpi_prune_capacity(image_tokens=n, settings=settings)
    if capacity is not None and settings.merge_unkept:
        capacity = min(capacity + cameras * settings.merge_unkept, n)
    return capacity


def _finite_only(image_tokens, candidate_mask):
    """A token with a NaN or inf in it (a bad pixel spreads over its camera in SigLIP) is never kept,
    and is zeroed: attention over a masked NaN would still give NaN (0 x NaN)."""
    finite = jnp.all(jnp.isfinite(image_tokens), axis=-1)
    nonfinite = jnp.sum(candidate_mask & ~finite, axis=-1)
    return jnp.where(finite[..., None], image_tokens, 0), candidate_mask & finite, nonfinite


def _score(model, prefix: Prefix, state, settings, manager) -> _Scored:
    hook = manager.hook
    task_tokens, task_mask = hook.openpi_prune_task_context(
        model=model,
        text_tokens=prefix.text_tokens,
        text_mask=prefix.text_mask,
        noisy_actions=None if state is None else state.noisy_actions,
        time=None if state is None else state.time,
        settings=settings,
    )
    extension = hook.openpi_prune_prefix_extension(
        model=model, task_tokens=task_tokens, task_mask=task_mask, settings=settings
    )
    # What the scoring sees; the prefix keeps the tokens as they came.
    scored_patches, scored_task = lightvla.prepare(
        prefix.image_tokens, prefix.candidate_mask, task_tokens, task_mask, settings.scoring
    )
    scores = hook.openpi_prune_score(
        model=model,
        image_tokens=scored_patches,
        candidate_mask=prefix.candidate_mask,
        task_tokens=scored_task,
        task_mask=task_mask,
        settings=settings,
    )
    b, n = prefix.candidate_mask.shape
    _check_output("openpi_prune_score", scores, ((b, n, n), (b, n)), settings, manager)
    # A vote ([b,n,n]) ranks patches by their votes; a relevance ([b,n]) by itself.
    voted = scores.ndim == 3
    counts = (lightvla.votes if voted else relevance.priority)(scores, prefix.candidate_mask)
    return _Scored(task_tokens, task_mask, extension, scored_patches, scored_task, scores, counts, voted)


def _select_train(prefix: Prefix, scored: _Scored, state: call.CallState, settings, manager):
    """Training keeps the length (LightVLA: each live patch becomes its noisy pick), or, for a method
    that names the visible patches, gathers them into `state.train_capacity` slots as inference does;
    a method that learns from the saliency adds its loss to the call's."""
    hook = manager.hook
    b, n = prefix.candidate_mask.shape
    scale = settings.noise_scale if state.noise_scale is None else state.noise_scale
    noise = jax.random.uniform(state.rng, scored.scores.shape, dtype=scored.scores.dtype) * scale
    selected = _each_camera(
        hook.openpi_prune_select_train,
        prefix,
        settings,
        scores=scored.scores,
        candidate_mask=prefix.candidate_mask,
        image_tokens=prefix.image_tokens,
        noise=noise,
        saliency=state.saliency,
        keep_fraction=settings.keep_fraction if state.keep_fraction is None else state.keep_fraction,
    )
    if not isinstance(selected, tuple | list) or len(selected) not in (2, 3):
        _check_output("openpi_prune_select_train", selected, (), settings, manager)
    picked, kept_mask, *visible = selected
    if settings.siglip_layer is not None and picked is not prefix.image_tokens:
        raise PruneInputError(
            f"siglip_layer in training needs a method that keeps the patches as they are (relevance, random, "
            f"distinct, keep_all); {settings.method!r} trains on a mix of them, which SigLIP's later layers "
            "cannot take. Unset siglip_layer, or pick such a method."
        )
    _check_output("openpi_prune_select_train", picked, (prefix.image_tokens.shape,), settings, manager)
    _check_output("openpi_prune_select_train", kept_mask, ((b, n),), settings, manager)
    image_mask = prefix.candidate_mask & visible[0] if visible else prefix.candidate_mask
    if settings.merge_unkept:
        if not visible:
            raise PruneInputError(
                f"merge_unkept needs a method that names the patches it keeps (relevance, random, distinct, "
                f"keep_all); {settings.method!r} trains on a mix of them. Unset merge_unkept, or pick such a method."
            )
        prefix, image_mask, _ = _merged(prefix, picked, image_mask, settings.merge_unkept)
        picked = prefix.image_tokens
    if visible and state.train_capacity is not None:
        picked_prefix = dataclasses.replace(prefix, image_tokens=picked)
        pruned, kept_mask, _ = _compact(picked_prefix, image_mask, scored.counts, state.train_capacity, settings)
    else:
        pruned = _joined(prefix, picked, image_mask, prefix.ar_mask, jnp.arange(n))
    extra = {} if state.step is None else {"training_step": jnp.full((b,), state.step, jnp.int32)}
    if state.saliency is not None:
        loss = hook.openpi_prune_distill_loss(
            scores=scored.scores, saliency=state.saliency, candidate_mask=prefix.candidate_mask, settings=settings
        )
        if loss is not None:
            state.extra_loss = loss if state.extra_loss is None else state.extra_loss + loss
            extra["distill_loss"] = loss
    return pruned, kept_mask, extra


def _select(prefix: Prefix, scored: _Scored, settings, manager):
    """The kept set at inference; with no live task token there is nothing to score against, so
    every live patch is kept."""
    b, n = prefix.candidate_mask.shape
    kept_mask = _each_camera(
        manager.hook.openpi_prune_select, prefix, settings, scores=scored.scores, candidate_mask=prefix.candidate_mask
    )
    _check_output("openpi_prune_select", kept_mask, ((b, n),), settings, manager)
    live_task = jnp.sum(scored.task_mask, axis=-1)
    return jnp.where(live_task[:, None] > 0, kept_mask, True) & prefix.candidate_mask


def _merged(prefix: Prefix, image_tokens, kept_mask, regions: int) -> tuple[Prefix, jax.Array, jax.Array]:
    """`merge_unkept`: the unkept patches of each region of a camera as one more kept token (see
    `merge`); the prefix, the kept set and the merged slots."""
    tokens, kept_mask, merged_mask = merge.merge_unkept(
        image_tokens, prefix.candidate_mask, kept_mask, prefix.per_camera, regions
    )
    return dataclasses.replace(prefix, image_tokens=tokens), kept_mask, merged_mask


def _each_camera(hook, prefix: Prefix, settings, **arrays):
    """A selection hook over the whole prefix, or with `siglip_layer` over each camera as if it were
    a sample of its own (its share of its own live patches; a vote among its own patches); its
    arrays back in the prefix's shape."""
    if settings.siglip_layer is None:
        return hook(settings=settings, **arrays)
    b, n = prefix.candidate_mask.shape
    p = prefix.per_camera
    c = n // p

    def by_camera(name, x):
        if name in ("scores", "noise") and x.ndim == 3:  # a vote [b, n, n]: each camera's block of it
            blocks = x.reshape(b, c, p, c, p)[:, jnp.arange(c), :, jnp.arange(c), :]  # [c, b, p, p]
            return jnp.swapaxes(blocks, 0, 1).reshape(b * c, p, p)
        return x.reshape(b * c, p, *x.shape[2:]) if getattr(x, "shape", ())[:2] == (b, n) else x

    def back(x):
        return x.reshape(b, n, *x.shape[2:]) if getattr(x, "shape", ())[:2] == (b * c, p) else x

    rows = {k: by_camera(k, v) for k, v in arrays.items()}
    selected = hook(settings=settings, **rows)
    if not isinstance(selected, tuple | list):
        return back(selected)
    # Tokens handed back as they came stay the same array (`_select_train` checks for it).
    same = "image_tokens" in rows and selected[0] is rows["image_tokens"]
    return (arrays["image_tokens"] if same else back(selected[0]), *map(back, selected[1:]))


def _masked(prefix: Prefix, kept_mask) -> Pruned:
    n = prefix.image_tokens.shape[1]
    return _joined(prefix, prefix.image_tokens, kept_mask, prefix.ar_mask, jnp.arange(n))


def _compact(prefix: Prefix, kept_mask, counts, capacity: int, settings: PruneSettings):
    """The kept tokens gathered into `capacity` slots: the prefix is really shorter. With
    `siglip_layer`, each camera's into its own equal share of them, in camera order."""
    b, n = kept_mask.shape
    if settings.siglip_layer is None:
        indices, slot_mask, overflow = lightvla.fit_capacity(kept_mask, counts, capacity)
    else:
        p = prefix.per_camera
        cameras = n // p
        capacity = cameras * math.ceil(capacity / cameras)
        indices, slot_mask, overflow = lightvla.fit_capacity(
            kept_mask.reshape(b * cameras, p), counts.reshape(b * cameras, p), capacity // cameras
        )
        indices = (indices.reshape(b, cameras, -1) + p * jnp.arange(cameras)[None, :, None]).reshape(b, capacity)
        slot_mask, overflow = slot_mask.reshape(b, capacity), overflow.reshape(b, cameras).sum(-1)
    kept_image = jnp.take_along_axis(prefix.image_tokens, indices[..., None], axis=1)
    ar_mask = jnp.concatenate([prefix.ar_mask[:capacity], prefix.ar_mask[n:]])
    rows = jnp.arange(kept_mask.shape[0])[:, None]
    kept_mask = jnp.zeros_like(kept_mask).at[rows, indices].set(slot_mask)
    return _joined(prefix, kept_image, slot_mask, ar_mask, indices), kept_mask, overflow


def _joined(prefix: Prefix, image_tokens, image_mask, ar_mask, image_source) -> Pruned:
    b, n = prefix.candidate_mask.shape
    text_source = n + jnp.arange(prefix.text_tokens.shape[1])
    image_source = jnp.broadcast_to(image_source, (b, image_source.shape[-1]))
    source = jnp.concatenate([image_source, jnp.broadcast_to(text_source, (b, text_source.shape[0]))], axis=1)
    return Pruned(
        tokens=jnp.concatenate([image_tokens, prefix.text_tokens], axis=1),
        input_mask=jnp.concatenate([image_mask, prefix.text_mask], axis=1),
        ar_mask=ar_mask,
        slot_source=source,
    )


def _extend(pruned: Pruned, extension) -> Pruned:
    """Append tokens no one attends to: `input_mask` False hides them from every query, and
    positions (`cumsum(input_mask)`) of the tokens before them stay the same."""
    b, e = extension.shape[:2]
    return dataclasses.replace(
        pruned,
        tokens=jnp.concatenate([pruned.tokens, extension.astype(pruned.tokens.dtype)], axis=1),
        input_mask=jnp.concatenate([pruned.input_mask, jnp.zeros((b, e), dtype=bool)], axis=1),
        ar_mask=jnp.concatenate([pruned.ar_mask, jnp.zeros((e,), dtype=pruned.ar_mask.dtype)]),
    )


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


def _measure(prefix: Prefix, scored: _Scored, kept_mask, overflow) -> dict:
    """The telemetry of one pruned prefix (see `telemetry.Telemetry`)."""
    candidate_mask, task_mask = prefix.candidate_mask, scored.task_mask
    queries = lightvla.rms_normalize(lightvla.task_queries(scored.scored_patches, scored.scored_task, task_mask))
    b, n = kept_mask.shape
    if scored.voted:
        choice = lightvla.vote_statistics(scored.scores, candidate_mask, scored.counts)
    else:
        choice = relevance.statistics(scored.scores, candidate_mask, kept_mask)
    return {
        "kept": jnp.sum(kept_mask, axis=-1),
        "kept_per_camera": jnp.sum(kept_mask.reshape(b, n // prefix.per_camera, prefix.per_camera), axis=-1),
        "candidates": jnp.sum(candidate_mask, axis=-1),
        **choice,
        "query_spread": lightvla.spread(queries, candidate_mask),
        "patch_spread": lightvla.spread(lightvla.rms_normalize(scored.scored_patches), candidate_mask),
        "task_spread": lightvla.spread(lightvla.rms_normalize(scored.scored_task), task_mask),
        "live_task_tokens": jnp.sum(task_mask, axis=-1),
        "overflow": overflow,
        "kept_mask": kept_mask,
    }


def report(description: dict, values: dict) -> telemetry.Telemetry:
    """A pruned prefix's telemetry on the host (from its host callback, or read after a served call's
    actions): to the built-in recorder at once, and to the plugins' hooks, in pluggy's order, on the
    delivery thread, so that none can fail or stall a model call."""
    made = telemetry.Telemetry(values={k: np.asarray(v) for k, v in values.items()}, **description)
    hooks = list(reversed(plugins.get_manager().hook.openpi_prune_report.get_hookimpls()))
    for hook in hooks:
        if hook.plugin is telemetry.RECORDER:
            hook.function(telemetry=made)
    others = [h for h in hooks if h.plugin is not telemetry.RECORDER]
    if others:
        telemetry.DELIVERY.put(others, made)
    return made
