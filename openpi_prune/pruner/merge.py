"""What a camera's pruned patches held, kept as one token: their mean, in the place of the first of
them. The kept patches say where the named things are; the merged token keeps the rest of the scene
as a whole (its layout, the light), which a model trained on every patch attends to and which no
single patch holds.

Pure `jax.numpy`, nothing of OpenPI. Shapes: `b` batch, `n` patches (cameras in order, `p` each), `d` width.
"""

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float


def merge_unkept(
    image_tokens: Float[Array, "b n d"],
    candidate_mask: Bool[Array, "b n"],
    kept_mask: Bool[Array, "b n"],
    per_camera: int,
) -> tuple[Float[Array, "b n d"], Bool[Array, "b n"], Bool[Array, "b n"]]:
    """Each camera's live, unkept patches averaged into the slot of the first of them, which joins
    the kept set. Returns the tokens, the kept set with the merged slots, and the merged slots (none
    for a camera that keeps every live patch or has none)."""
    b, n, d = image_tokens.shape
    cameras = n // per_camera
    tokens = image_tokens.reshape(b, cameras, per_camera, d)
    unkept = (candidate_mask & ~kept_mask).reshape(b, cameras, per_camera)
    count = jnp.sum(unkept, axis=-1)
    total = jnp.sum(jnp.where(unkept[..., None], tokens.astype(jnp.float32), 0.0), axis=2)
    mean = (total / jnp.maximum(count, 1)[..., None]).astype(tokens.dtype)
    merged = (jnp.arange(per_camera) == jnp.argmax(unkept, axis=-1)[..., None]) & (count[..., None] > 0)
    tokens = jnp.where(merged[..., None], mean[:, :, None, :], tokens)
    merged = merged.reshape(b, n)
    return tokens.reshape(b, n, d), kept_mask | merged, merged
