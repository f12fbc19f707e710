"""Rendered scenes where the right tokens to keep are known: the lab's data, in OpenPI's format.

Each scene has a few coloured blocks on a table, seen by two cameras (a base view and a wrist view,
the scene transposed, on another table colour); OpenPI's third camera is present and masked, as in
LIBERO. The prompt names one block's colour, and the action chunk moves from the origin toward that
block, so the actions depend on the images through the target alone. Every block covers a whole
`block x block` group of patches, so the target's patches (`target_mask`) are exact.
Deterministic: the same seed gives the same scenes.

Splits: a scene's *layout* (each block's colour and place, whichever is named) falls in one split by
a hash of it, so a test scene's layout never occurs in training, whatever the seeds and step counts
(`layouts` lists a batch's without drawing it, so that this can be checked).
"""

import dataclasses
import hashlib

import numpy as np

COLOURS = {  # RGB in [-1, 1], as OpenPI feeds SigLIP
    "red": (0.9, -0.8, -0.8),
    "green": (-0.8, 0.9, -0.8),
    "blue": (-0.8, -0.8, 0.9),
    "yellow": (0.9, 0.9, -0.8),
}
TABLES = {"base_0_rgb": (-0.2, -0.25, -0.3), "left_wrist_0_rgb": (-0.45, -0.4, -0.35)}
MASKED_CAMERA = "right_wrist_0_rgb"
# Prompt: "pick up the <colour> block" as fixed ids in PaliGemma's vocabulary (no tokenizer download).
WORDS = {"pick": 5780, "up": 908, "the": 573, "block": 3963, **{c: 2000 + 17 * i for i, c in enumerate(COLOURS)}}
PROMPT = ("pick", "up", "the", None, "block")


# Tenths of the layout hash: 80 % train, 10 % validation, 10 % test.
SPLITS = {"train": range(8), "validation": (8,), "test": (9,)}


def split_of(layout: tuple) -> str:
    """The split a layout belongs to (a layout: sorted `(colour, row, col)` of every block)."""
    tenth = int.from_bytes(hashlib.blake2b(repr(layout).encode(), digest_size=8).digest(), "big") % 10
    return next(name for name, tenths in SPLITS.items() if tenth in tenths)


@dataclasses.dataclass(frozen=True)
class SceneSpec:
    image_size: int = 224
    patch: int = 28  # SigLIP's patch size: mu/28 gives 8 x 8 patches a camera
    block: int = 2  # a block covers block x block patches
    objects: int = 3  # blocks per scene, each its own colour; the target is one of them
    horizon: int = 8
    action_dim: int = 2
    max_token_len: int = 8

    @property
    def grid(self) -> int:
        return self.image_size // self.patch


@dataclasses.dataclass(frozen=True)
class Batch:
    images: dict[str, np.ndarray]  # [b, 224, 224, 3] float32 in [-1, 1]
    image_masks: dict[str, np.ndarray]  # [b] bool
    tokens: np.ndarray  # [b, max_token_len] int32
    token_mask: np.ndarray  # [b, max_token_len] bool
    actions: np.ndarray  # [b, horizon, action_dim] float32
    target_mask: np.ndarray  # [b, cameras * grid * grid] bool: the target's patches, cameras in image order
    target: np.ndarray  # [b] index into COLOURS
    layouts: tuple = ()  # per scene, the layout its split was drawn by
    named: tuple = ()  # `named` family: per scene, the indices into its layout of the two named objects
    distractor_mask: np.ndarray | None = None  # `named` family: [b, patches] of the objects not named

    def head(self, count: int) -> "Batch":
        """The first `count` scenes."""

        def first(value):
            if isinstance(value, dict):
                return {k: v[:count] for k, v in value.items()}
            return None if value is None else value[:count]

        return dataclasses.replace(self, **{f.name: first(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def observation(self):
        """OpenPI's `Observation` of this batch (state unused by pi0.5's prompt: zeros)."""
        import jax.numpy as jnp
        from openpi.models import model as _model

        b = self.actions.shape[0]
        return _model.Observation(
            images={k: jnp.asarray(v) for k, v in self.images.items()},
            image_masks={k: jnp.asarray(v) for k, v in self.image_masks.items()},
            state=jnp.zeros((b, self.actions.shape[-1]), jnp.float32),
            tokenized_prompt=jnp.asarray(self.tokens),
            tokenized_prompt_mask=jnp.asarray(self.token_mask),
        )


def _place(rng, spec: SceneSpec, count: int) -> list[tuple[int, int]]:
    """Top-left patch (row, col) of `count` blocks that do not touch."""
    free = spec.grid - spec.block + 1
    placed: list[tuple[int, int]] = []
    while len(placed) < count:
        r, c = (int(v) for v in rng.integers(0, free, 2))
        if all(abs(r - r2) > spec.block or abs(c - c2) > spec.block for r2, c2 in placed):
            placed.append((r, c))
    return placed


def _draw(rng, spec: SceneSpec, count: int, split: str | None):
    """One scene's blocks (colour indices, places; the first is named) and table textures, redrawn
    until the layout is in `split` (None: any)."""
    while True:
        colours = rng.choice(len(COLOURS), count, replace=False)
        places = _place(rng, spec, count)
        layout = tuple(sorted((int(k), r, c) for k, (r, c) in zip(colours, places, strict=True)))
        textures = [rng.normal(0.0, 0.05, (spec.grid, spec.grid, 1)) for _ in TABLES]
        if split is None or split_of(layout) == split:
            return colours, places, textures, layout


def layouts(
    seed: int, batch_size: int, spec: SceneSpec = SceneSpec(), objects: int | None = None, split: str | None = "train"
) -> list[tuple]:
    """The layouts `render` with these arguments draws, without drawing them."""
    rng = np.random.default_rng(seed)
    count = spec.objects if objects is None else objects
    return [_draw(rng, spec, count, split)[3] for _ in range(batch_size)]


def render(
    seed: int, batch_size: int, spec: SceneSpec = SceneSpec(), objects: int | None = None, split: str | None = "train"
) -> Batch:
    """`batch_size` scenes of `split` from `seed` (`objects` overrides the spec's count, for a curriculum)."""
    rng = np.random.default_rng(seed)
    count = spec.objects if objects is None else objects
    size, patch, grid = spec.image_size, spec.patch, spec.grid
    names = list(COLOURS)
    cameras = [*TABLES, MASKED_CAMERA]
    images = {k: np.zeros((batch_size, size, size, 3), np.float32) for k in cameras}
    target_mask = np.zeros((batch_size, len(cameras), grid, grid), bool)
    tokens = np.zeros((batch_size, spec.max_token_len), np.int32)
    token_mask = np.zeros((batch_size, spec.max_token_len), bool)
    actions = np.zeros((batch_size, spec.horizon, spec.action_dim), np.float32)
    target = np.zeros(batch_size, np.int32)
    drawn_layouts = []
    fractions = (np.arange(spec.horizon, dtype=np.float32) + 1) / spec.horizon
    for i in range(batch_size):
        colours, places, textures, layout = _draw(rng, spec, count, split)
        drawn_layouts.append(layout)
        for (camera, table), texture in zip(TABLES.items(), textures, strict=True):
            images[camera][i] = np.asarray(table, np.float32) + texture.repeat(patch, 0).repeat(patch, 1)
        for k, (colour, (r, c)) in enumerate(zip(colours, places, strict=True)):
            rgb = np.asarray(COLOURS[names[colour]], np.float32)
            span = spec.block * patch
            images["base_0_rgb"][i, r * patch : r * patch + span, c * patch : c * patch + span] = rgb
            # The wrist camera sees the table transposed.
            images["left_wrist_0_rgb"][i, c * patch : c * patch + span, r * patch : r * patch + span] = rgb
            if k == 0:
                target[i] = colour
                target_mask[i, 0, r : r + spec.block, c : c + spec.block] = True
                target_mask[i, 1, c : c + spec.block, r : r + spec.block] = True
                centre = (np.array([c, r], np.float32) + spec.block / 2) / grid * 2 - 1  # (x, y) in [-1, 1]
                actions[i, :, :2] = fractions[:, None] * centre
        words = [WORDS[w if w is not None else names[target[i]]] for w in PROMPT]
        tokens[i, : len(words)] = words
        token_mask[i, : len(words)] = True
    return Batch(
        images=images,
        image_masks={k: np.full(batch_size, k != MASKED_CAMERA) for k in cameras},
        tokens=tokens,
        token_mask=token_mask,
        actions=actions,
        target_mask=target_mask.reshape(batch_size, -1),
        target=target,
        layouts=tuple(drawn_layouts),
    )
