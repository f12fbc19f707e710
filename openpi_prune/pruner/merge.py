"""What a camera's pruned patches held, kept as a few tokens: the camera's patch grid is cut into
`regions` equal squares, and the unkept patches of each are averaged into the slot of the first of
them. The kept patches say where the named things are; the merged tokens keep the rest of the scene
in outline (its layout, the light), which a model trained on every patch attends to and which no
single patch holds.

Pure `jax.numpy`, nothing of OpenPI. Shapes: `b` batch, `n` patches (cameras in order, `p` each, a
square grid), `d` width, `r` regions per camera.
"""

import math

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from openpi_prune.errors import PruneInputError


def region_of_patch(per_camera: int, regions: int) -> np.ndarray:
    """Each patch's region (row-major squares of the camera's square grid): an int array [p]."""
    side, cut = math.isqrt(per_camera), math.isqrt(regions)
    if side * side != per_camera or cut * cut != regions or side % cut:
        raise PruneInputError(
            f"merge_unkept={regions}: {regions} regions do not tile a camera of {per_camera} patches: both must "
            "be squares, and the grid's side a multiple of the regions' (e.g. 1, 4 or 16 regions for 8 x 8 "
            "patches). Choose another merge_unkept."
        )
    row, column = np.divmod(np.arange(per_camera), side)
    return (row // (side // cut)) * cut + column // (side // cut)


def membership(per_camera: int, regions: int) -> np.ndarray:
    """`[p, r]`: whether patch p lies in region r."""
    return region_of_patch(per_camera, regions)[:, None] == np.arange(regions)


def merge_unkept(
    image_tokens: Float[Array, "b n d"],
    candidate_mask: Bool[Array, "b n"],
    kept_mask: Bool[Array, "b n"],
    per_camera: int,
    regions: int = 1,
) -> tuple[Float[Array, "b n d"], Bool[Array, "b n"], Bool[Array, "b n"]]:
    """The live, unkept patches of each camera's region averaged into the slot of the first of them,
    which joins the kept set. Returns the tokens, the kept set with the merged slots, and the merged
    slots (none for a region whose live patches are all kept, or that has none)."""
    b, n, d = image_tokens.shape
    cameras = n // per_camera
    member = jnp.asarray(membership(per_camera, regions))
    tokens = image_tokens.reshape(b, cameras, per_camera, d)
    unkept = (candidate_mask & ~kept_mask).reshape(b, cameras, per_camera)
    in_region = unkept[..., None] & member  # [b, c, p, r]
    count = jnp.sum(in_region, axis=2)  # [b, c, r]
    total = jnp.einsum("bcpr,bcpd->bcrd", in_region.astype(jnp.float32), tokens.astype(jnp.float32))
    mean = (total / jnp.maximum(count, 1)[..., None]).astype(tokens.dtype)
    # The slot of each region's first unkept patch holds its mean.
    first_index = jnp.argmax(in_region, axis=2)  # [b, c, r]: the first unkept patch of each region
    first = (jnp.arange(per_camera)[:, None] == first_index[:, :, None, :]) & (count[:, :, None, :] > 0)
    merged = jnp.any(first, axis=-1)  # [b, c, p]: a patch is in one region only
    region_mean = jnp.einsum("bcpr,bcrd->bcpd", first.astype(mean.dtype), mean)
    tokens = jnp.where(merged[..., None], region_mean, tokens)
    merged = merged.reshape(b, n)
    return tokens.reshape(b, n, d), kept_mask | merged, merged
