"""OpenPI's prefix, seen by the pruner: split into image and prompt tokens for the pipeline, and
joined back with the positions upstream gave them; the observation edits (cameras dropped, prompt
cut to a bucket), the saliency probe, and the figures a served call returns with its actions."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from openpi_prune import call, settings
from openpi_prune.errors import PruneInputError
from openpi_prune.pruner import pipeline, plugins, relevance


def prune(model, observation, tokens, input_mask, ar_mask):
    """The pruned version of `embed_prefix`'s `(tokens, input_mask, ar_mask)` for `observation`."""
    state = call.current()
    if state is not None and state.probe is not None:
        per_camera, cameras = split_prefix(observation, tokens)
        return state.probe.apply(tokens, per_camera, cameras), input_mask, ar_mask
    pruned = pruned_prefix(model, observation, tokens, input_mask, ar_mask)
    return pruned.tokens, pruned.input_mask, pruned.ar_mask


def pruned_prefix(model, observation, tokens, input_mask, ar_mask) -> pipeline.Pruned:
    """The pipeline on a prefix; leaves the call its position shift."""
    active = settings.active()
    per_camera, cameras = split_prefix(observation, tokens)
    image_len = per_camera * cameras
    state = call.current()
    split = pipeline.Prefix(
        image_tokens=tokens[:, :image_len],
        text_tokens=tokens[:, image_len:],
        candidate_mask=input_mask[:, :image_len],
        text_mask=input_mask[:, image_len:],
        ar_mask=ar_mask,
        per_camera=per_camera,
    )
    pruned = pipeline.prune(model, split, state, active)
    if state is not None and active.keep_positions:
        state.position_shift = _position_shift(input_mask, pruned.slot_source, pruned.input_mask)
    return pruned


def prefix_pass(model, observation):
    """The first pass of `sample_actions` alone, as the patched model runs it: the observation
    preprocessed, the prefix embedded (pruned) and run through PaliGemma once to fill the KV cache
    the denoising steps read. Returns the cache and the prefix's input mask. The statements it
    repeats are checked with the `sample_actions` row of the table."""
    from openpi.models import model as _model
    from openpi.models import pi0

    observation = _model.preprocess_observation(None, observation, train=False)
    b = observation.state.shape[0]
    noise = jnp.zeros((b, model.action_horizon, model.action_dim))
    with call.scope(noisy_actions=noise, time=jnp.ones(b), rng=None, train=False, saliency=None):
        tokens, mask, ar_mask = model.embed_prefix(observation)
        positions = jnp.cumsum(mask, axis=1) - 1
        _, kv_cache = model.PaliGemma.llm([tokens, None], mask=pi0.make_attn_mask(mask, ar_mask), positions=positions)
    return kv_cache, mask


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


# --- positions: OpenPI numbers tokens by cumsum(input_mask), so a pruned prefix would renumber its
# kept tokens; PaliGemma gets the positions they had upstream.


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
    state = call.current()
    if state is None or state.position_shift is None:
        return None
    prefix_shift, after = state.position_shift
    after = after[:, None]
    if embedded[0] is None:  # the suffix alone, against the cached prefix
        return positions + after
    rest = positions.shape[1] - prefix_shift.shape[1]
    return positions + jnp.concatenate([prefix_shift, jnp.broadcast_to(after, (after.shape[0], rest))], axis=1)


def adjust_attn_mask(attn_mask, input_mask, mask_ar):
    adjusted = plugins.get_manager().hook.openpi_prune_attn_mask(
        attn_mask=attn_mask, input_mask=input_mask, mask_ar=mask_ar, settings=settings.active()
    )
    return attn_mask if adjusted is None else adjusted


# --- the saliency probe: the gradient of OpenPI's unpruned loss at each image token.


class Probe:
    """Inside `saliency`: `embed_prefix` returns the unpruned prefix with `delta` added to its image
    tokens (or, with no delta yet, records their shape)."""

    def __init__(self):
        self.delta = None
        self.image_tokens = None  # the unperturbed image tokens of the pass with a delta
        self.shape = None
        self.cameras = None

    def apply(self, tokens, per_camera, cameras):
        image_len = per_camera * cameras
        if self.delta is None:
            self.shape = jax.ShapeDtypeStruct(tokens[:, :image_len].shape, tokens.dtype)
            self.cameras = cameras
            return tokens
        self.image_tokens = tokens[:, :image_len]
        return tokens.at[:, :image_len].add(self.delta.astype(tokens.dtype))


def wants_saliency() -> bool:
    return bool(plugins.get_manager().hook.openpi_prune_wants_saliency(settings=settings.active()))


def saliency(loss_fn) -> jax.Array:
    """`[b, image tokens]`: the model's saliency (`settings.saliency`) of each image token of the
    prefix, from the gradient of the unpruned `loss_fn()` (per-sample losses, e.g. OpenPI's
    `compute_loss`) at it; no gradient flows back into it."""
    probe = Probe()
    with call.scope(probe=probe):
        jax.eval_shape(loss_fn)
        if probe.shape is None:
            raise PruneInputError("saliency: the loss never built a prefix (no embed_prefix call inside it)")

        def total(delta):
            probe.delta = delta
            return jnp.sum(loss_fn().astype(jnp.float32)), probe.image_tokens

        grad, image_tokens = jax.grad(total, has_aux=True)(jnp.zeros(probe.shape.shape, probe.shape.dtype))
    return jax.lax.stop_gradient(relevance.saliency(grad, image_tokens, settings.active().saliency))


# --- observation edits, before the prefix is embedded.


def observation_for_prefix(observation):
    """`observation` less the cameras `drop_cameras` names, for `embed_prefix` to embed."""
    drop = settings.active().drop_cameras
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


# --- a served call's figures: the telemetry its compiled `sample_actions` returns with the actions.


@jax.tree_util.register_pytree_node_class
class Carried:
    """The actions of a served `sample_actions` and the telemetry of the prefix it pruned, returned
    together by its compiled function (the description, static, as the pytree's metadata)."""

    def __init__(self, actions, values: dict, description: dict):
        self.actions, self.values, self.description = actions, values, description

    def tree_flatten(self):
        return (self.actions, self.values), tuple(sorted(self.description.items()))

    @classmethod
    def tree_unflatten(cls, description, children):
        return cls(*children, dict(description))


def serving_figures(description: dict, values: dict) -> dict:
    """What a policy server sends with the actions: this call's pruning, read once its actions have
    been (so that it waits for nothing), and reported to the recorder and the plugins' hooks."""
    report = pipeline.report(description, jax.device_get(values))
    kept_per_camera = np.asarray(report.kept_per_camera[0], np.int32)
    cameras = len(kept_per_camera)
    kept_patches = np.asarray(report.values["kept_mask"][0], bool).reshape(cameras, -1)
    merged = report.values.get("merged_mask")
    return {
        "method": report.method,
        "kept": int(report.kept[0]),
        "kept_per_camera": kept_per_camera,
        # Which slots: [camera, patch] in the cameras' order, each camera's patches row by row.
        "kept_patches": kept_patches,
        # Those of them that hold a region's mean (`merge_unkept`), not the patch in their place.
        "merged_patches": np.zeros_like(kept_patches)
        if merged is None
        else np.asarray(merged[0], bool).reshape(cameras, -1),
        "live_image_tokens": int(report.candidates[0]),
        "prefix_length": int(report.prefix_length[0]),
    }
