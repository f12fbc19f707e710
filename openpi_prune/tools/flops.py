"""Analytic FLOPs of a pi0 / pi0.5 `sample_actions` call, per part, counted layer by layer.

XLA's cost analysis counts a scanned loop body once, and OpenPI scans its Gemma and SigLIP layers,
so its totals are not the model's. These counts follow OpenPI's architecture instead: a
multiply-add is 2 FLOPs; attention is dense over every position of the prefix (masked ones too, as
OpenPI computes it); norms, activations and the softmax are left out (well under 1 %).
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Parts:
    siglip: float  # image encoder, every camera that is embedded
    prefix_llm: float  # PaliGemma over the prefix (fills the KV cache)
    denoise: float  # every denoising step of the action expert against the cache

    @property
    def total(self) -> float:
        return self.siglip + self.prefix_llm + self.denoise


def siglip_tokens(variant: str, image_size: int = 224) -> int:
    """Tokens a SigLIP `variant` makes of one image (OpenPI resizes every camera to 224 x 224)."""
    from openpi.models import siglip as _siglip

    return (image_size // _siglip.decode_variant(variant)["patch_size"][0]) ** 2


def siglip(
    variant: str, *, images: int, out_width: int, image_size: int = 224, layer: int | None = None, kept: int = 0
) -> float:
    """A SigLIP `variant` (e.g. "So400m/14") over `images` images, projected to `out_width`; with
    `layer` (pruning inside SigLIP), the blocks after it over `kept` tokens per image, and the head
    twice (on the early tokens the pruner scores, and on the late ones)."""
    from openpi.models import siglip as _siglip

    v = _siglip.decode_variant(variant)
    width, depth, mlp = v["width"], v["depth"], v["mlp_dim"]
    patch = v["patch_size"][0]
    tokens = siglip_tokens(variant, image_size)

    def block(t: int) -> float:
        return t * (8 * width * width + 4 * width * mlp) + 4 * t * t * width

    embed = tokens * 2 * (patch * patch * 3) * width
    head = tokens * 2 * width * out_width
    if layer is None:
        return images * (depth * block(tokens) + embed + head)
    return images * (layer * block(tokens) + (depth - layer) * block(kept) + embed + 2 * head)


def gemma_layers(config, *, tokens: int, keys: int) -> float:
    """All layers of one Gemma expert (`openpi.models.gemma.Config`) over `tokens` queries that
    attend to `keys` positions."""
    w, heads, kv, head_dim = config.width, config.num_heads, config.num_kv_heads, config.head_dim
    projections = 2 * w * (heads + 2 * kv) * head_dim + 2 * heads * head_dim * w
    mlp = 2 * 3 * w * config.mlp_dim  # gated: gate, up and down
    attention = 4 * keys * heads * head_dim  # scores and the weighted sum
    return config.depth * tokens * (projections + mlp + attention)


def sample_actions(
    model_config,
    *,
    batch: int,
    cameras: int,
    prefix: int,
    num_steps: int,
    siglip_variant: str = "So400m/14",
    siglip_layer: int | None = None,
    siglip_kept: int = 0,
) -> Parts:
    """`sample_actions` of a `Pi0Config` on `batch` samples: SigLIP over `cameras` cameras (with
    `siglip_layer`, its later blocks over `siglip_kept` tokens a camera), PaliGemma over `prefix`
    positions, `num_steps` denoising steps."""
    from openpi.models import gemma

    llm, expert = gemma.get_config(model_config.paligemma_variant), gemma.get_config(model_config.action_expert_variant)
    suffix = model_config.action_horizon + (0 if model_config.pi05 else 1)  # pi0 adds a state token
    w = expert.width
    step = gemma_layers(expert, tokens=suffix, keys=prefix + suffix)
    step += suffix * 2 * 2 * model_config.action_dim * w  # action in and out projections
    if model_config.pi05:
        # time MLP, and each layer's two adaptive norms (plus the final one): Dense(w -> 3w)
        step += 2 * 2 * w * w + (2 * expert.depth + 1) * 2 * w * 3 * w
    else:
        step += suffix * 2 * (2 * w * w + w * w)  # the action-time MLP
    return Parts(
        siglip=batch
        * siglip(siglip_variant, images=cameras, out_width=llm.width, layer=siglip_layer, kept=siglip_kept),
        prefix_llm=batch * gemma_layers(llm, tokens=prefix, keys=prefix),
        denoise=batch * num_steps * step,
    )
