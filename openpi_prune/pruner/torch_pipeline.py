"""The prune pipeline on `torch` tensors, for OpenPI's PyTorch models: the steps of `pipeline` (clean
the image tokens, score, select, gather the kept ones into `capacity` slots, measure) for the methods
ported to torch. It knows nothing of OpenPI: the adapter hands it a prefix's image and prompt tokens.
"""

import dataclasses

import torch

from openpi_prune.errors import PruneInputError
from openpi_prune.pruner import merge, methods, pipeline, plugins
from openpi_prune.pruner import torch_ops as ops
from openpi_prune.settings import PruneSettings

# The methods with a torch version; each scores (or votes) and selects as its JAX twin does.
METHODS = ("relevance", "distinct", "keep_all", "language_only")


@dataclasses.dataclass(frozen=True)
class Training:
    """A training pass: the share kept at this step, the model's saliency (None on a step without
    it), and whether the kept patches are gathered into `capacity` slots (after the ramp) or the
    prefix keeps its length with the rest masked out (during it)."""

    keep_fraction: float
    saliency: torch.Tensor | None  # [b, n]
    compact: bool


@dataclasses.dataclass(frozen=True)
class Pruned:
    tokens: torch.Tensor  # [b, slots + t, d]
    pad_mask: torch.Tensor  # [b, slots + t]
    att_mask: torch.Tensor  # [b, slots + t]
    slot_source: torch.Tensor  # [b, slots + t]: the unpruned index of the token each slot holds
    values: dict  # the telemetry (`telemetry.Telemetry`'s keys)
    distill_loss: torch.Tensor | None = None  # [b]: the head's loss against the saliency, in training


def check_method(settings: PruneSettings) -> None:
    plugins.check_method(settings.method, plugins.get_manager())
    if settings.method not in METHODS:
        raise PruneInputError(
            f"method {settings.method!r} has no PyTorch version yet; OpenPI's PyTorch models can use "
            f"{', '.join(METHODS)}. Pick one of them, or use the JAX model for {settings.method}."
        )
    if settings.siglip_layer is not None:
        raise PruneInputError("siglip_layer is not available for OpenPI's PyTorch models yet; unset it.")


def prune(
    parameters: dict,
    image_tokens: torch.Tensor,
    text_tokens: torch.Tensor,
    candidate_mask: torch.Tensor,
    text_mask: torch.Tensor,
    att_mask: torch.Tensor,
    per_camera: int,
    settings: PruneSettings,
    training: Training | None = None,
) -> Pruned:
    """The pruned prefix (`parameters`: the method's `prune_*` tensors by name); in `training`, the
    share it names, chosen as `settings.train_picks` says, and the head's distillation loss."""
    b, n = candidate_mask.shape
    finite = torch.all(torch.isfinite(image_tokens), dim=-1)
    nonfinite = torch.sum(candidate_mask & ~finite, dim=-1)
    candidate_mask = candidate_mask & finite
    image_tokens = torch.where(finite[..., None], image_tokens, torch.zeros_like(image_tokens))
    scored_patches, scored_task = ops.prepare(image_tokens, candidate_mask, text_tokens, text_mask, settings.scoring)
    fraction = settings.keep_fraction if training is None else training.keep_fraction
    saliency = None if training is None else training.saliency
    scores, kept_mask, counts = _select(
        parameters, scored_patches, scored_task, candidate_mask, text_mask, settings, fraction, saliency
    )
    # No live task token: nothing to score against, every live patch is kept.
    kept_mask = torch.where(torch.any(text_mask, dim=-1)[:, None], kept_mask, True) & candidate_mask
    if settings.merge_unkept:
        member = torch.as_tensor(merge.membership(per_camera, settings.merge_unkept), device=image_tokens.device)
        image_tokens, kept_mask, merged_mask = ops.merge_unkept(
            image_tokens, candidate_mask, kept_mask, per_camera, member
        )
    t = text_tokens.shape[1]
    text_source = n + torch.arange(t, device=image_tokens.device).expand(b, t)
    if (settings.mode == "masked") if training is None else not training.compact:
        slots = n
        source = torch.arange(n, device=image_tokens.device).expand(b, n)
        image, image_mask, overflow = image_tokens, kept_mask, torch.zeros_like(nonfinite)
    else:
        slots = pipeline.compact_capacity(settings, n, n // per_camera, plugins.get_manager())
        source, image_mask, overflow = ops.fit_capacity(kept_mask, counts, slots)
        image = torch.gather(image_tokens, 1, source[..., None].expand(-1, -1, image_tokens.shape[-1]))
        kept_mask = torch.zeros_like(kept_mask).scatter(1, source, image_mask)
    distill_loss = None
    if saliency is not None and settings.method == "relevance":
        distill_loss = ops.distillation_loss(scores, saliency, candidate_mask)
    values = {
        "kept": torch.sum(kept_mask, dim=-1),
        "kept_per_camera": torch.sum(kept_mask.reshape(b, n // per_camera, per_camera), dim=-1),
        "candidates": torch.sum(candidate_mask, dim=-1),
        "overflow": overflow,
        "kept_mask": kept_mask,
        "nonfinite": nonfinite,
        "prefix_length": torch.full((b,), slots + t, device=image_tokens.device),
    }
    if distill_loss is not None:
        values["distill_loss"] = distill_loss.detach()
    if settings.merge_unkept:  # a slot compact mode dropped (overflow) holds nothing
        values["merged_mask"] = merged_mask & kept_mask
    return Pruned(
        tokens=torch.cat([image, text_tokens], dim=1),
        pad_mask=torch.cat([image_mask, text_mask], dim=1),
        att_mask=torch.cat([att_mask[:, :slots], att_mask[:, n:]], dim=1),
        slot_source=torch.cat([source, text_source], dim=1),
        values=values,
        distill_loss=distill_loss,
    )


def _select(parameters, patches, task_tokens, candidate_mask, task_mask, settings, fraction, saliency):
    """(scores, kept_mask, priority) of `settings.method`, keeping `fraction` of the patches; with
    `saliency` (training) and `train_picks=saliency`, the relevance head's share is the saliency's."""
    method = settings.method
    if method == "keep_all":
        return (
            None,
            candidate_mask,
            ops.priority(torch.zeros(candidate_mask.shape, device=patches.device), candidate_mask),
        )
    if method == "language_only":
        scores = ops.vote_scores(patches, task_tokens, task_mask)
        counts = ops.votes(scores, candidate_mask)
        return scores, counts > 0, counts
    if method == "relevance":
        query, key = parameters.get(methods.RELEVANCE_QUERY), parameters.get(methods.RELEVANCE_KEY)
        if query is None or key is None:
            raise PruneInputError(
                "relevance needs its learned head, and this PI0Pytorch has none: it was created before "
                "openpi-prune was enabled with method relevance. Enable it first, then create (or load) the model."
            )
        # The head learns from its own loss only: the model's embeddings are not bent to suit it.
        features = patches.detach()
        hidden_kernel = parameters.get(methods.RELEVANCE_HIDDEN_KERNEL)
        methods.check_relevance_hidden(0 if hidden_kernel is None else hidden_kernel.shape[-1], settings, "PI0Pytorch")
        if hidden_kernel is not None:
            hidden_bias = parameters[methods.RELEVANCE_HIDDEN_BIAS]
            features = ops.hidden_features(features, candidate_mask, hidden_kernel, hidden_bias)
        scores = ops.relevance_scores(features, task_tokens.detach(), task_mask, query, key)
    else:  # distinct: the patches least like the rest of their image
        scores = torch.linalg.vector_norm(patches.float(), dim=-1)
    chosen_by = scores.detach()
    if saliency is not None and settings.method == "relevance" and settings.train_picks == "saliency":
        chosen_by = torch.log(saliency + 1e-30)
    if settings.keep_mass:
        kept_mask = ops.keep_mass(chosen_by, candidate_mask, settings.keep_mass, fraction)
    else:
        kept_mask = ops.keep_top(chosen_by, candidate_mask, fraction)
    return scores, kept_mask, ops.priority(chosen_by, candidate_mask)
