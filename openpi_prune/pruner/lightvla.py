"""LightVLA's token pruner as pure `jax.numpy` functions.

Nothing here knows OpenPI. Shapes: `b` batch, `n` image patches (all cameras together), `t` task
tokens, `d` width. Masks are True where a token is live. Patches with a False `candidate_mask`
neither vote nor can be voted for; task tokens with a False `task_mask` are not attended to.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

_EPS = 1e-6
# Finite stand-in for -inf, so that a row with nothing live gives zeros, never NaN.
_NEG = -1e30


def rms_normalize(x: Float[Array, "... d"]) -> Float[Array, "... d"]:
    """Weight-free RMS normalisation over the last axis (LightVLA normalises without a scale)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + _EPS)


def _live_mean(x, mask):
    w = mask[..., None].astype(jnp.float32)
    return jnp.sum(x * w, axis=1, keepdims=True) / jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1.0)


def _order_key(x: Float[Array, "..."]) -> Int[Array, "..."]:
    """float32 -> int32, in the same order (negative floats have their magnitude bits flipped)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _from_order_key(key: Int[Array, "..."]) -> Float[Array, "..."]:
    return jax.lax.bitcast_convert_type(jnp.where(key < 0, key ^ 0x7FFFFFFF, key), jnp.float32)


def live_median(x: Float[Array, "b k d"], mask: Bool[Array, "b k"]) -> Float[Array, "b 1 d"]:
    """Per sample and dimension, the median of the live tokens (0 where none is live); the same
    values as `jnp.nanmedian` over the masked tokens, for finite `x`.

    On a CPU a bisection on the float's bits, 32 counting passes: on a full pi0.5 prefix (512 x 2048
    image tokens) a CPU sorts for 130 ms, and counts for 18. On an accelerator one sort: there the
    32 passes are launch after launch, the sort a single one. Both pick the same two middle keys.
    """
    key = _order_key(x)
    count = jnp.sum(mask, axis=1)
    # The two middle ranks (the same one for an odd count), 1-based; a row with nothing live asks for 1.
    need = jnp.stack([jnp.maximum((count + 1) // 2, 1), jnp.maximum(count // 2 + 1, 1)])[..., None, None]
    middle = _from_order_key(jax.lax.platform_dependent(key, mask, need, cpu=_bisected_keys, default=_sorted_keys))
    median = (middle[0] + middle[1]) / 2
    return jnp.where(count[:, None, None] > 0, median, 0.0)


def _bisected_keys(key, mask, need):
    """The `need`-th smallest live key of each column (`need`: [2, b, 1, 1]), by bisection."""
    live = mask[..., None]
    top = jnp.max(jnp.where(live, key, jnp.iinfo(jnp.int32).min), axis=1, keepdims=True)
    bottom = jnp.min(jnp.where(live, key, jnp.iinfo(jnp.int32).max), axis=1, keepdims=True)
    # Invariant: fewer than `need` live keys are <= lo, at least `need` are <= hi.
    lo = jnp.broadcast_to(jnp.minimum(bottom, top) - 1, need.shape[:1] + top.shape)
    hi = jnp.broadcast_to(top, lo.shape)

    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor of the mean, without overflow
        enough = jnp.sum(live & (key <= mid), axis=-2, keepdims=True) >= need
        return jnp.where(enough, lo, mid), jnp.where(enough, mid, hi)

    return jax.lax.fori_loop(0, 32, halve, (lo, hi))[1]


def _sorted_keys(key, mask, need):
    """The same keys as `_bisected_keys`, by one sort (the dead ones after every live one)."""
    ordered = jnp.sort(jnp.where(mask[..., None], key, jnp.iinfo(jnp.int32).max), axis=1)
    return jnp.stack(
        [jnp.take_along_axis(ordered, jnp.broadcast_to(n - 1, n.shape[:1] + (1, key.shape[-1])), axis=1) for n in need]
    )


def centre(x: Float[Array, "b k d"], mask: Bool[Array, "b k"]) -> Float[Array, "b k d"]:
    """Remove each sample's mean over its live tokens: the direction every token shares.

    A shared component larger than the tokens' differences makes every query point the same way
    after the weight-free RMS norm, and every row then votes for the same few patches.
    """
    x = x.astype(jnp.float32)
    return jnp.where(mask[..., None], x - _live_mean(x, mask), 0.0)


def robust_standardise(x: Float[Array, "b k d"], mask: Bool[Array, "b k"], clip: float = 4.0) -> Float[Array, "b k d"]:
    """Per sample and per dimension: subtract the median over live tokens, divide by their median
    absolute deviation, clip to +-`clip`.

    Centring removes a shared direction but not a few dimensions whose values are huge and vary
    ("massive activations"): after the RMS norm those dimensions alone decide every similarity.
    Per-dimension robust scaling gives every dimension an equal say, and the median and the clip
    keep a few outlier tokens (ViT "registers") from setting the scale.
    """
    x = x.astype(jnp.float32)
    live = mask[..., None]
    median = live_median(x, mask)  # 0 for a sample with no live token
    mad = live_median(jnp.abs(x - median), mask)  # 0 for a constant dimension
    floor = 1e-3 * jnp.median(mad, axis=-1, keepdims=True) + _EPS
    z = (x - median) / jnp.maximum(1.4826 * mad, floor)
    return jnp.where(live, jnp.clip(z, -clip, clip), 0.0)


def prepare(
    patches: Float[Array, "b n d"],
    candidate_mask: Bool[Array, "b n"],
    task_tokens: Float[Array, "b t d"],
    task_mask: Bool[Array, "b t"],
    scoring: str,
) -> tuple[Float[Array, "b n d"], Float[Array, "b t d"]]:
    """The patches and task tokens as `scoring` hands them to the vote (each set on its own
    statistics): `lightvla` as they come, `centred`, or `robust` (per-dimension, see above)."""
    if scoring == "lightvla":
        return patches, task_tokens
    transform = {"centred": centre, "robust": robust_standardise}[scoring]
    return transform(patches, candidate_mask), transform(task_tokens, task_mask)


def _masked_softmax(logits, mask):
    logits = jnp.where(mask, logits, _NEG)
    weights = jax.nn.softmax(logits, axis=-1)
    return jnp.where(mask, weights, 0.0)


def task_queries(
    patches: Float[Array, "b n d"], task_tokens: Float[Array, "b t d"], task_mask: Bool[Array, "b t"]
) -> Float[Array, "b n d"]:
    """Each patch's attention over the live task tokens: the queries that cast its vote."""
    p, t = rms_normalize(patches), rms_normalize(task_tokens)
    logits = jnp.einsum("bnd,btd->bnt", p, t) / jnp.sqrt(p.shape[-1])
    return jnp.einsum("bnt,btd->bnd", _masked_softmax(logits, task_mask[:, None, :]), t)


def vote_scores(
    patches: Float[Array, "b n d"], task_tokens: Float[Array, "b t d"], task_mask: Bool[Array, "b t"]
) -> Float[Array, "b n n"]:
    """Row i scores every patch j as the one patch i would keep: normalised query_i . patch_j."""
    queries = rms_normalize(task_queries(patches, task_tokens, task_mask))
    return jnp.einsum("bnd,bmd->bnm", queries, rms_normalize(patches)) / jnp.sqrt(patches.shape[-1])


def mask_candidates(scores: Float[Array, "b n n"], candidate_mask: Bool[Array, "b n"]) -> Float[Array, "b n n"]:
    """Scores with non-candidate columns pushed to the bottom, so no row can pick them."""
    return jnp.where(candidate_mask[:, None, :], scores, _NEG)


def votes(scores: Float[Array, "b n n"], candidate_mask: Bool[Array, "b n"]) -> Int[Array, "b n"]:
    """How many live rows pick each patch as their argmax."""
    picks = jnp.argmax(mask_candidates(scores, candidate_mask), axis=-1)
    one_hot = jax.nn.one_hot(picks, scores.shape[-1], dtype=jnp.int32)
    return jnp.sum(one_hot * candidate_mask[..., None], axis=1)


def union_of_argmax(scores: Float[Array, "b n n"], candidate_mask: Bool[Array, "b n"]) -> Bool[Array, "b n"]:
    """LightVLA's inference rule: keep every patch that is some live row's argmax."""
    return votes(scores, candidate_mask) > 0


def straight_through(
    scores: Float[Array, "b n n"],
    candidate_mask: Bool[Array, "b n"],
    patches: Float[Array, "b n d"],
    noise: Float[Array, "b n n"],
) -> Float[Array, "b n d"]:
    """LightVLA's training rule: each live row becomes the patch it picks (forward: one-hot argmax of
    the noisy scores; backward: their softmax), so the loss's gradient reaches the scores. Rows of
    non-candidates keep their own patch; the length is unchanged and duplicates are allowed."""
    noisy = mask_candidates(scores + noise, candidate_mask)
    soft = jax.nn.softmax(noisy, axis=-1)
    hard = jax.nn.one_hot(jnp.argmax(noisy, axis=-1), scores.shape[-1], dtype=soft.dtype)
    weights = hard + soft - jax.lax.stop_gradient(soft)
    picked = jnp.einsum("bnm,bmd->bnd", weights, patches.astype(weights.dtype)).astype(patches.dtype)
    return jnp.where(candidate_mask[..., None], picked, patches)


def fit_capacity(
    kept_mask: Bool[Array, "b n"], priority: Int[Array, "b n"], capacity: int
) -> tuple[Int[Array, "b c"], Bool[Array, "b c"], Int[Array, "b"]]:
    """Static-size selection for a compact prefix.

    Returns the indices of `capacity` patches in their original order, which slots hold a kept
    patch, and how many kept patches did not fit. When more are kept than fit, the highest
    `priority` (ties: the earlier patch) wins. Slots left over hold unkept patches, marked False.
    """
    n = kept_mask.shape[-1]
    if not 0 < capacity <= n:
        raise ValueError(f"capacity must be in 1..{n}, got {capacity}")
    # Kept patches outrank every unkept one; lax.top_k prefers the lower index on ties.
    rank = jnp.where(kept_mask, priority.astype(jnp.int32) + 1, 0)
    _, chosen = jax.lax.top_k(rank, capacity)
    indices = jnp.sort(chosen, axis=-1)
    slot_mask = jnp.take_along_axis(kept_mask, indices, axis=-1)
    overflow = jnp.sum(kept_mask, axis=-1) - jnp.sum(slot_mask, axis=-1)
    return indices, slot_mask, overflow


def spread(x: Float[Array, "b k d"], mask: Bool[Array, "b k"]) -> Float[Array, " b"]:
    """How different the live tokens are, 0 (all the same) to 1 (no shared component):
    sqrt(mean |x_i - mean x|^2 / mean |x_i|^2) over the live tokens of each sample."""
    x = x.astype(jnp.float32)
    w = mask[..., None].astype(jnp.float32)
    count = jnp.maximum(jnp.sum(w, axis=1), 1.0)
    mean = jnp.sum(x * w, axis=1, keepdims=True) / count[:, None]
    spread_sq = jnp.sum(jnp.square(x - mean) * w, axis=(1, 2)) / count[:, 0]
    power = jnp.sum(jnp.square(x) * w, axis=(1, 2)) / count[:, 0]
    return jnp.sqrt(spread_sq / jnp.maximum(power, _EPS))


def vote_statistics(
    scores: Float[Array, "b n n"], candidate_mask: Bool[Array, "b n"], counts: Int[Array, "b n"] | None = None
) -> dict[str, Float[Array, " b"] | Int[Array, " b"]]:
    """Per-sample numbers that tell a healthy vote from a collapsed one (`counts`: `votes(...)`,
    if the caller has them already)."""
    live = candidate_mask.astype(jnp.float32)
    voters = jnp.maximum(jnp.sum(live, axis=-1), 1.0)
    counts = votes(scores, candidate_mask) if counts is None else counts
    top2 = jax.lax.top_k(mask_candidates(scores, candidate_mask), 2)[0]
    gap = jnp.where(candidate_mask, top2[..., 0] - top2[..., 1], 0.0)
    # With fewer than two candidates there is no runner-up: report no gap.
    gap = jnp.where(jnp.sum(candidate_mask, axis=-1, keepdims=True) >= 2, gap, 0.0)
    return {
        "union_picks": jnp.sum(counts > 0, axis=-1),
        "top1_vote_share": jnp.max(counts, axis=-1) / voters,
        "score_gap": jnp.sum(gap, axis=-1) / voters,
    }
