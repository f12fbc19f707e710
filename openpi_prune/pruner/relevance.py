"""A learned relevance score per patch, conditioned on the prompt, as pure `jax.numpy` functions.

Nothing here knows OpenPI. Shapes as in `lightvla`: `b` batch, `n` patches, `t` task tokens, `d`
width, `h` the head's hidden width, `r` its rank. The head is trained to reproduce the model's own
saliency (how much the unpruned model's loss depends on each patch), so it learns what the model
uses without labels.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

_NEG = -1e30


def scores(
    patches: Float[Array, "b n d"],
    task_tokens: Float[Array, "b t d"],
    task_mask: Bool[Array, "b t"],
    query_kernel: Float[Array, "d r"],
    key_kernel: Float[Array, "d r"],
) -> Float[Array, "b n"]:
    """Each patch's relevance: a soft maximum over the live task tokens of `query . key`.

    A bilinear form lets a word ("red") point at the patches that show it; the soft maximum lets
    each task token claim its own patches instead of averaging them away.
    """
    queries = jnp.einsum("btd,dr->btr", task_tokens.astype(jnp.float32), query_kernel.astype(jnp.float32))
    keys = jnp.einsum("bnd,dr->bnr", patches.astype(jnp.float32), key_kernel.astype(jnp.float32))
    logits = jnp.einsum("bnr,btr->bnt", keys, queries) / jnp.sqrt(keys.shape[-1])
    logits = jnp.where(task_mask[:, None, :], logits, _NEG)
    # No live task token: every patch scores 0 (nothing to be relevant to).
    return jnp.where(jnp.any(task_mask, axis=-1)[:, None], jax.nn.logsumexp(logits, axis=-1), 0.0)


def hidden_features(
    patches: Float[Array, "b n d"],
    candidate_mask: Bool[Array, "b n"],
    hidden_kernel: Float[Array, "2d h"],
    hidden_bias: Float[Array, " h"],
) -> Float[Array, "b n h"]:
    """Each patch beside the mean of its sample's live patches, through one GELU layer: what the
    patch shows, read against the rest of the scene, before `scores` compares it with the prompt.
    A bilinear form on the patch itself can only weigh each of its features linearly."""
    patches = patches.astype(jnp.float32)
    live = candidate_mask[..., None].astype(jnp.float32)
    scene = jnp.sum(patches * live, axis=1, keepdims=True) / jnp.maximum(jnp.sum(live, axis=1, keepdims=True), 1.0)
    both = jnp.concatenate([patches, jnp.broadcast_to(scene, patches.shape)], axis=-1)
    return jax.nn.gelu(both @ hidden_kernel.astype(jnp.float32) + hidden_bias.astype(jnp.float32))


def rank(relevance: Float[Array, "b n"], candidate_mask: Bool[Array, "b n"]) -> Int[Array, "b n"]:
    """0 for the most relevant candidate, 1 for the next, ...; non-candidates rank last (ties: the
    earlier patch first)."""
    order = jnp.argsort(-jnp.where(candidate_mask, relevance, _NEG), axis=-1, stable=True)
    return jnp.argsort(order, axis=-1)


def keep_top(relevance: Float[Array, "b n"], candidate_mask: Bool[Array, "b n"], fraction: float) -> Bool[Array, "b n"]:
    """The `fraction` most relevant of each sample's candidates (at least one if any is live)."""
    live = jnp.sum(candidate_mask, axis=-1, keepdims=True)
    count = jnp.where(live > 0, jnp.maximum(jnp.ceil(fraction * live), 1), 0)
    return (rank(relevance, candidate_mask) < count) & candidate_mask


def keep_mass(
    relevance: Float[Array, "b n"], candidate_mask: Bool[Array, "b n"], mass: float, fraction: float
) -> Bool[Array, "b n"]:
    """Each sample's fewest most relevant candidates whose share of the softmax over its candidates
    reaches `mass`: a scene whose relevance is spread keeps more. At least one, at most `fraction`
    of the live ones (rounded up), so that a compact prefix sized for `fraction` always holds them."""
    probs = jax.nn.softmax(jnp.where(candidate_mask, relevance, _NEG), axis=-1)
    probs = jnp.where(candidate_mask, probs, 0.0)
    ranks = rank(relevance, candidate_mask)
    ordered = jnp.take_along_axis(probs, jnp.argsort(ranks, axis=-1), axis=-1)
    # Patches needed: those before the running sum reaches `mass`, and the one that reaches it.
    needed = jnp.sum(jnp.cumsum(ordered, axis=-1) - ordered < mass, axis=-1, keepdims=True)
    live = jnp.sum(candidate_mask, axis=-1, keepdims=True)
    count = jnp.where(live > 0, jnp.clip(needed, 1, jnp.ceil(fraction * live)), 0)
    return (ranks < count) & candidate_mask


def priority(relevance: Float[Array, "b n"], candidate_mask: Bool[Array, "b n"]) -> Int[Array, "b n"]:
    """Higher for more relevant patches, as `lightvla.fit_capacity` wants it."""
    return relevance.shape[-1] - rank(relevance, candidate_mask)


def saliency(
    gradient: Float[Array, "b n d"], patches: Float[Array, "b n d"], kind: str = "gradient"
) -> Float[Array, "b n"]:
    """What the head learns to reproduce, from the gradient of the unpruned loss at each patch:
    `gradient`, its norm; `deviation`, the first-order change of the loss were the patch the batch's
    mean patch at its place, |gradient . (patch - mean)|, which is 0 for a patch alike in every scene."""
    gradient = gradient.astype(jnp.float32)
    if kind == "gradient":
        return jnp.linalg.norm(gradient, axis=-1)
    patches = patches.astype(jnp.float32)
    return jnp.abs(jnp.sum(gradient * (patches - jnp.mean(patches, axis=0, keepdims=True)), axis=-1))


def distillation_loss(
    relevance: Float[Array, "b n"], saliency: Float[Array, "b n"], candidate_mask: Bool[Array, "b n"]
) -> Float[Array, " b"]:
    """Cross-entropy from the saliency (normalised over the candidates) to the softmax of the relevance."""
    weights = jnp.where(candidate_mask, saliency, 0.0)
    target = weights / jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1e-12)
    log_q = jax.nn.log_softmax(jnp.where(candidate_mask, relevance, _NEG), axis=-1)
    return -jnp.sum(jnp.where(candidate_mask, target * log_q, 0.0), axis=-1)


def statistics(
    relevance: Float[Array, "b n"], candidate_mask: Bool[Array, "b n"], kept_mask: Bool[Array, "b n"]
) -> dict[str, Float[Array, " b"] | Int[Array, " b"]]:
    """The vote's telemetry keys for a relevance score: picks (kept patches), the top patch's share of
    the softmax, and the gap between the best two scores."""
    masked = jnp.where(candidate_mask, relevance, _NEG)
    top2 = jax.lax.top_k(masked, 2)[0]
    enough = jnp.sum(candidate_mask, axis=-1) >= 2
    return {
        "union_picks": jnp.sum(kept_mask, axis=-1),
        "top1_vote_share": jnp.where(jnp.any(candidate_mask, -1), jnp.max(jax.nn.softmax(masked, -1), -1), 0.0),
        "score_gap": jnp.where(enough, top2[:, 0] - top2[:, 1], 0.0),
    }


def random_scores(patches: Float[Array, "b n d"]) -> Float[Array, "b n"]:
    """Uniform random scores, drawn anew for every sample: seeded by the bits of its patches' sum, so
    that the same image gets the same draw (a jitted function needs no key)."""
    seeds = jax.lax.bitcast_convert_type(jnp.sum(patches.astype(jnp.float32), axis=(1, 2)), jnp.uint32)
    keys = jax.vmap(lambda seed: jax.random.fold_in(jax.random.key(0), seed))(seeds)
    return jax.vmap(lambda key: jax.random.uniform(key, patches.shape[1:2]))(keys)
