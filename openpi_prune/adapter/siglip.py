"""Pruning inside SigLIP (`siglip_layer`): the patches are scored after an early encoder layer, and
the layers after it run on the kept patches only.

`embed_prefix` runs twice, each time as OpenPI wrote it; what differs is SigLIP's encoder
(`wrappers.wrap_siglip_encoder` hands it to `encoder_part`), told by the call's `Split`:
1. *early*: each camera's encoder stops after `layer` blocks, and hands on its hidden state through
   the encoder's final norm and SigLIP's head (so the early tokens are as wide as the prompt's); the
   pruner scores and selects on these, one share per camera (`pipeline._each_camera`).
2. *late*: each camera's encoder starts again from its hidden state, gathers the patches its slots
   name and runs the remaining blocks on them only; the kept tokens of the result replace the early
   ones in the pruned prefix. (Its stem and the prompt's embedding are computed again and unused,
   which the compiler drops.)
A full-length training pass (during the keep ramp, or with `compact_training` off) runs the late
pass on every patch (the pruned ones hidden afterwards, as without `siglip_layer`), so the head learns
to read the early tokens; after the ramp it runs on the kept ones, as at inference. Masked mode runs
it on the patches the compact prefix would hold (`Pruned.encoder_source`), so that both modes give
the same tokens. The upstream blocks have no attention mask, so a padding slot, if any, is seen by
the kept patches in the late pass.
"""

import dataclasses

import jax
import jax.numpy as jnp

from openpi_prune import call, settings
from openpi_prune.adapter.patches import Drifted
from openpi_prune.errors import PruneInputError


@dataclasses.dataclass
class Split:
    layer: int
    hidden: list = dataclasses.field(default_factory=list)  # each camera's state after `layer` blocks
    slots: list | None = None  # late pass: each camera's patch indices [b, s]
    camera: int = 0  # late pass: the camera the next encoder call is for


def embed_prefix(wrapped, observation, prune):
    """`embed_prefix` with the pruning inside SigLIP; `prune(tokens, mask, ar_mask)` is the
    pipeline on the early tokens, returning the pruned prefix with each slot's source."""
    split = Split(settings.active().siglip_layer)
    with call.scope(siglip=split):
        early = wrapped(observation)
    cameras = len(split.hidden)
    problem = _problem(early) or (
        None
        if 0 < cameras == len(observation.images)
        else f"ran SigLIP's encoder {cameras} time(s) for {len(observation.images)} camera(s)"
    )
    if problem:  # OpenPI's own result goes with it, for the guard to hand back when not strict
        raise Drifted(problem, wrapped(observation))
    pruned = prune(*early)
    b, per_camera = early[0].shape[0], split.hidden[0].shape[1]
    image_slots = pruned.slot_source.shape[1] - observation.tokenized_prompt.shape[1]
    encoded = pruned.slot_source[:, :image_slots] if pruned.encoder_source is None else pruned.encoder_source
    sources = encoded.reshape(b, cameras, encoded.shape[1] // cameras)
    local = sources - per_camera * jnp.arange(cameras)[None, :, None]
    late_split = dataclasses.replace(split, slots=[local[:, i] for i in range(cameras)])
    with call.scope(siglip=late_split):
        late = wrapped(observation)
    kept = jnp.take_along_axis(late[0], pruned.slot_source[:, :image_slots, None], axis=1)
    tokens = pruned.tokens.at[:, :image_slots].set(kept.astype(pruned.tokens.dtype))
    return tokens, pruned.input_mask, pruned.ar_mask


def _problem(result) -> str | None:
    if isinstance(result, tuple) and len(result) == 3 and getattr(result[0], "ndim", None) == 3:
        return None
    return "returned something other than (tokens [b,s,d], input_mask, ar_mask)"


def encoder_part(instance, split: Split, x, deterministic=True):
    """SigLIP's `Encoder.__call__` (`instance`, bound) inside a split `embed_prefix`: its early or
    late part, with OpenPI's own blocks and parameters."""
    from flax import linen as nn
    from openpi.models import siglip

    if not 0 <= split.layer <= instance.depth:
        raise PruneInputError(
            f"siglip_layer={split.layer}, but this model's SigLIP has {instance.depth} layers: choose 0.."
            f"{instance.depth} (the patches are dropped after that many), or unset it to prune after SigLIP."
        )
    params = instance.variables["params"]
    block = siglip.Encoder1DBlock(
        mlp_dim=instance.mlp_dim,
        num_heads=instance.num_heads,
        dropout=instance.dropout,
        dtype_mm=instance.dtype_mm,
        parent=None,  # a stand-alone block run on OpenPI's parameters, not a new submodule
    )

    def blocks(h, first, last):
        def step(h, layer_params):
            return block.apply({"params": layer_params}, h, deterministic)[0], None

        return jax.lax.scan(step, h, jax.tree.map(lambda p: p[first:last], params["encoderblock"]))[0]

    norm = nn.LayerNorm(dtype=instance.dtype_mm, parent=None)
    if split.slots is None:
        hidden = blocks(x, 0, split.layer)
        split.hidden.append(hidden)
        return norm.apply({"params": params["encoder_norm"]}, hidden), {}
    hidden, indices = split.hidden[split.camera], split.slots[split.camera]
    split.camera += 1
    kept = blocks(jnp.take_along_axis(hidden, indices[..., None], axis=1), split.layer, instance.depth)
    rows = jnp.arange(hidden.shape[0])[:, None]
    late = jnp.zeros_like(hidden).at[rows, indices].set(kept.astype(hidden.dtype))
    return norm.apply({"params": params["encoder_norm"]}, late), {}
