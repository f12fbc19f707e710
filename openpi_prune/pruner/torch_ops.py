"""The pruner's math in `torch`, for OpenPI's PyTorch models: the functions of `lightvla` and
`relevance` that the PyTorch methods use, with the same results up to float rounding and the same
tie-breaking (tested against the JAX ones on the same arrays).

Nothing here knows OpenPI. Shapes as in `lightvla`: `b` batch, `n` patches, `t` task tokens, `d`
width, `r` the head's rank. Every selection has a static shape, so `torch.compile` traces it once.
"""

import math

import torch

_EPS = 1e-6
_NEG = -1e30


def rms_normalize(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(torch.mean(torch.square(x), dim=-1, keepdim=True) + _EPS)


def _live_mean(x, mask):
    w = mask[..., None].float()
    return torch.sum(x * w, dim=1, keepdim=True) / torch.clamp(torch.sum(w, dim=1, keepdim=True), min=1.0)


def live_median(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`[b, k, d]` -> `[b, 1, d]`: per sample and dimension, the median of the live tokens (the mean
    of the two middle ones for an even count; 0 where none is live), as `lightvla.live_median`."""
    count = torch.sum(mask, dim=1)  # [b]
    ordered = torch.sort(torch.where(mask[..., None], x, torch.inf), dim=1).values
    low = torch.clamp((count + 1) // 2, min=1) - 1
    high = torch.clamp(count // 2 + 1, min=1) - 1
    d = x.shape[-1]
    pick = lambda rank: torch.gather(ordered, 1, rank[:, None, None].expand(-1, 1, d))  # noqa: E731
    median = (pick(low) + pick(high)) / 2
    return torch.where(count[:, None, None] > 0, median, torch.zeros_like(median))


def centre(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return torch.where(mask[..., None], x - _live_mean(x, mask), 0.0)


def robust_standardise(x: torch.Tensor, mask: torch.Tensor, clip: float = 4.0) -> torch.Tensor:
    """Per sample and dimension: minus the live median, over the live median absolute deviation,
    clipped (see `lightvla.robust_standardise` for why)."""
    x = x.float()
    median = live_median(x, mask)
    mad = live_median(torch.abs(x - median), mask)
    floor = 1e-3 * torch.quantile(mad, 0.5, dim=-1, keepdim=True) + _EPS
    z = (x - median) / torch.maximum(1.4826 * mad, floor)
    return torch.where(mask[..., None], torch.clamp(z, -clip, clip), 0.0)


def prepare(patches, candidate_mask, task_tokens, task_mask, scoring: str):
    """The patches and task tokens as `scoring` hands them to the score (`lightvla.prepare`)."""
    if scoring == "lightvla":
        return patches, task_tokens
    transform = {"centred": centre, "robust": robust_standardise}[scoring]
    return transform(patches, candidate_mask), transform(task_tokens, task_mask)


def vote_scores(patches, task_tokens, task_mask) -> torch.Tensor:
    """`[b, n, n]`: LightVLA's vote, row i scoring every patch j (`lightvla.vote_scores`)."""
    p, t = rms_normalize(patches), rms_normalize(task_tokens)
    logits = torch.einsum("bnd,btd->bnt", p, t) / math.sqrt(p.shape[-1])
    logits = torch.where(task_mask[:, None, :], logits, _NEG)
    weights = torch.where(task_mask[:, None, :], torch.softmax(logits, dim=-1), 0.0)
    queries = rms_normalize(torch.einsum("bnt,btd->bnd", weights, t))
    return torch.einsum("bnd,bmd->bnm", queries, p) / math.sqrt(p.shape[-1])


def votes(scores, candidate_mask) -> torch.Tensor:
    """How many live rows pick each patch as their argmax (the first maximum on ties)."""
    picks = torch.argmax(torch.where(candidate_mask[:, None, :], scores, _NEG), dim=-1)
    one_hot = torch.nn.functional.one_hot(picks, scores.shape[-1]) * candidate_mask[..., None]
    return torch.sum(one_hot, dim=1)


def relevance_scores(patches, task_tokens, task_mask, query_kernel, key_kernel) -> torch.Tensor:
    """`[b, n]`: the relevance head (`relevance.scores`)."""
    queries = torch.einsum("btd,dr->btr", task_tokens.float(), query_kernel.float())
    keys = torch.einsum("bnd,dr->bnr", patches.float(), key_kernel.float())
    logits = torch.einsum("bnr,btr->bnt", keys, queries) / math.sqrt(keys.shape[-1])
    logits = torch.where(task_mask[:, None, :], logits, _NEG)
    return torch.where(torch.any(task_mask, dim=-1)[:, None], torch.logsumexp(logits, dim=-1), 0.0)


def hidden_features(patches, candidate_mask, hidden_kernel, hidden_bias) -> torch.Tensor:
    """`[b, n, h]`: each patch beside its sample's mean live patch, through the head's hidden layer
    (`relevance.hidden_features`; JAX's default GELU is the tanh form)."""
    patches = patches.float()
    live = candidate_mask[..., None].float()
    scene = torch.sum(patches * live, dim=1, keepdim=True) / torch.clamp(torch.sum(live, dim=1, keepdim=True), min=1.0)
    both = torch.cat([patches, scene.expand_as(patches)], dim=-1)
    return torch.nn.functional.gelu(both @ hidden_kernel.float() + hidden_bias.float(), approximate="tanh")


def rank(scores, candidate_mask) -> torch.Tensor:
    """0 for the best candidate, ...; non-candidates last; ties: the earlier patch first."""
    order = torch.argsort(-torch.where(candidate_mask, scores.float(), _NEG), dim=-1, stable=True)
    return torch.argsort(order, dim=-1)


def keep_top(scores, candidate_mask, fraction: float) -> torch.Tensor:
    """The `fraction` best of each sample's candidates (at least one if any is live)."""
    live = torch.sum(candidate_mask, dim=-1, keepdim=True)
    count = torch.where(live > 0, torch.clamp(torch.ceil(fraction * live.float()), min=1), 0)
    return (rank(scores, candidate_mask) < count) & candidate_mask


def keep_mass(scores, candidate_mask, mass: float, fraction: float) -> torch.Tensor:
    """The fewest best candidates whose softmax share reaches `mass`, within `fraction` (`relevance.keep_mass`)."""
    probs = torch.softmax(torch.where(candidate_mask, scores.float(), _NEG), dim=-1)
    probs = torch.where(candidate_mask, probs, 0.0)
    ranks = rank(scores, candidate_mask)
    ordered = torch.gather(probs, -1, torch.argsort(ranks, dim=-1))
    needed = torch.sum(torch.cumsum(ordered, dim=-1) - ordered < mass, dim=-1, keepdim=True)
    live = torch.sum(candidate_mask, dim=-1, keepdim=True)
    count = torch.where(live > 0, torch.minimum(torch.clamp(needed, min=1), torch.ceil(fraction * live.float())), 0)
    return (ranks < count) & candidate_mask


def priority(scores, candidate_mask) -> torch.Tensor:
    return scores.shape[-1] - rank(scores, candidate_mask)


def fit_capacity(kept_mask, priority, capacity: int):
    """`lightvla.fit_capacity`: `capacity` patch indices in their order, which slots hold a kept one,
    and how many kept ones did not fit (the highest priority wins; ties: the earlier patch)."""
    n = kept_mask.shape[-1]
    if not 0 < capacity <= n:
        raise ValueError(f"capacity must be in 1..{n}, got {capacity}")
    ranked = torch.where(kept_mask, priority + 1, 0)
    chosen = torch.argsort(-ranked, dim=-1, stable=True)[:, :capacity]
    indices = torch.sort(chosen, dim=-1).values
    slot_mask = torch.gather(kept_mask, -1, indices)
    overflow = torch.sum(kept_mask, dim=-1) - torch.sum(slot_mask, dim=-1)
    return indices, slot_mask, overflow


def saliency(gradient, patches, kind: str = "gradient") -> torch.Tensor:
    """`[b, n]`: what the head learns to reproduce (`relevance.saliency`)."""
    gradient = gradient.float()
    if kind == "gradient":
        return torch.linalg.vector_norm(gradient, dim=-1)
    patches = patches.float()
    return (gradient * (patches - patches.mean(dim=0, keepdim=True))).sum(-1).abs()


def distillation_loss(scores, saliency, candidate_mask) -> torch.Tensor:
    """`[b]`: cross-entropy from the normalised saliency to the head's softmax (`relevance.distillation_loss`)."""
    weights = torch.where(candidate_mask, saliency, 0.0)
    target = weights / torch.clamp(torch.sum(weights, dim=-1, keepdim=True), min=1e-12)
    log_q = torch.log_softmax(torch.where(candidate_mask, scores, _NEG), dim=-1)
    return -torch.sum(torch.where(candidate_mask, target * log_q, 0.0), dim=-1)


def merge_unkept(image_tokens, candidate_mask, kept_mask, per_camera: int, member: torch.Tensor):
    """`merge.merge_unkept` with the regions as `member [p, r]` (patch in region): the unkept live
    patches of each region averaged into the slot of the first of them, which joins the kept set."""
    b, n, d = image_tokens.shape
    cameras = n // per_camera
    tokens = image_tokens.reshape(b, cameras, per_camera, d)
    unkept = (candidate_mask & ~kept_mask).reshape(b, cameras, per_camera)
    in_region = unkept[..., None] & member  # [b, c, p, r]
    count = torch.sum(in_region, dim=2)  # [b, c, r]
    total = torch.einsum("bcpr,bcpd->bcrd", in_region.float(), tokens.float())
    mean = (total / torch.clamp(count, min=1)[..., None]).to(tokens.dtype)
    first_index = torch.argmax(in_region.int(), dim=2)  # the first maximal value: the first unkept patch
    slots = torch.arange(per_camera, device=tokens.device)[:, None]
    first = (slots == first_index[:, :, None, :]) & (count[:, :, None, :] > 0)
    merged = torch.any(first, dim=-1)
    region_mean = torch.einsum("bcpr,bcrd->bcpd", first.to(mean.dtype), mean)
    tokens = torch.where(merged[..., None], region_mean, tokens)
    merged = merged.reshape(b, n)
    return tokens.reshape(b, n, d), kept_mask | merged, merged
