"""The second scene family: scenes where only the prompt says which patches matter.

Each scene holds more coloured objects than a 20 % budget can keep, of three shapes (a 2x2 block,
a 1x3 bar, a 1x1 dot, in patches; each patch shows its shape's mark) on a textured table. The prompt
names two of them, "put the red block on the blue bar", and the action chunk goes from the origin to
the first, then on to the second: the actions depend on the named objects only. Distractors share a
named object's colour (another shape) or its shape (another colour), so neither colour nor contrast
alone finds them. `rename` names two other objects of the same images: the kept set must follow it.

Same format, splits (by a hash of the layout) and cameras as `scenes`.
"""

import dataclasses

import numpy as np

from openpi_prune.tools.lab import scenes

COLOURS = {**scenes.COLOURS, "purple": (0.5, -0.8, 0.9)}
SHAPES = {"block": (2, 2), "bar": (1, 3), "dot": (1, 1)}  # rows x cols of patches (the base camera's)
# What each patch of a shape shows, as real objects show their edges and texture: a block fills it,
# a bar is split by a groove along its length, a dot is a small square in the middle. The shape can be
# told from one patch: SigLIP's single layer need not gather it from the patch's neighbours.
GROOVE, DOT = (3 / 8, 5 / 8), (1 / 4, 3 / 4)  # rows painted over, as fractions of a patch
WORDS = {
    **scenes.WORDS,
    "put": 2404,
    "on": 611,
    "purple": 2000 + 17 * 4,
    "bar": 2333,
    "dot": 12846,
}
# "put the <colour> <shape> on the <colour> <shape>"
PROMPT = ("put", "the", 0, 1, "on", "the", 2, 3)


@dataclasses.dataclass(frozen=True)
class NamedSpec:
    image_size: int = 224
    patch: int = 28
    objects: int = 7  # the two named and five distractors
    horizon: int = 8
    action_dim: int = 2
    max_token_len: int = 8
    texture: float = 0.15  # the table's patch-to-patch brightness spread
    # A full scene's objects cover at least this many patches a camera: more than 20 % of 64 keeps.
    object_patches: int = 16

    @property
    def grid(self) -> int:
        return self.image_size // self.patch


def mark(shape: str, patch: int) -> np.ndarray:
    """(patch, patch) bool: the pixels of one of `shape`'s patches that show its colour (base camera)."""
    painted = np.ones((patch, patch), bool)
    if shape == "bar":
        painted[int(GROOVE[0] * patch) : int(GROOVE[1] * patch)] = False
    elif shape == "dot":
        painted[:] = False
        lo, hi = int(DOT[0] * patch), int(DOT[1] * patch)
        painted[lo:hi, lo:hi] = True
    return painted


def _cells(shape: str, r: int, c: int) -> list[tuple[int, int]]:
    rows, cols = SHAPES[shape]
    return [(r + i, c + j) for i in range(rows) for j in range(cols)]


def _place(rng, spec: NamedSpec, shapes: list[str]) -> list[tuple[int, int]] | None:
    """Top-left cells of the objects, none overlapping or sharing an edge (None: start over)."""
    taken: set[tuple[int, int]] = set()
    places = []
    for shape in shapes:
        rows, cols = SHAPES[shape]
        for _ in range(50):
            r, c = int(rng.integers(0, spec.grid - rows + 1)), int(rng.integers(0, spec.grid - cols + 1))
            cells = _cells(shape, r, c)
            near = {(y + dy, x + dx) for y, x in cells for dy, dx in ((0, 0), (0, 1), (0, -1), (1, 0), (-1, 0))}
            if not near & taken:
                taken.update(cells)
                places.append((r, c))
                break
        else:
            return None
    return places


def _objects(rng, count: int) -> list[tuple[int, str]]:
    """`count` distinct (colour, shape) pairs, the first two named: one distractor of the first
    named colour (another shape) and one of the second named shape (another colour) when there is room."""
    colours, shapes = list(COLOURS), list(SHAPES)
    pairs = [(c, s) for c in range(len(colours)) for s in shapes]
    first, second = (pairs[i] for i in rng.choice(len(pairs), 2, replace=False))
    chosen = [first, second]
    wanted = [
        [p for p in pairs if p[0] == first[0] and p not in chosen],
        [p for p in pairs if p[1] == second[1] and p not in chosen],
    ]
    for options in wanted:
        options = [p for p in options if p not in chosen]
        if len(chosen) < count and options:
            chosen.append(options[int(rng.integers(len(options)))])
    rest = [p for p in pairs if p not in chosen]
    extra = rng.choice(len(rest), max(count - len(chosen), 0), replace=False)
    return chosen + [rest[i] for i in extra]


def _draw(rng, spec: NamedSpec, count: int, split: str | None):
    while True:
        objects = _objects(rng, count)
        area = sum(int(np.prod(SHAPES[shape])) for _, shape in objects)
        if count == spec.objects and area < spec.object_patches:
            continue
        places = _place(rng, spec, [s for _, s in objects])
        if places is None:
            continue
        layout = tuple(sorted((k, s, r, c) for (k, s), (r, c) in zip(objects, places, strict=True)))
        textures = [rng.normal(0.0, spec.texture, (spec.grid, spec.grid, 1)) for _ in scenes.TABLES]
        if split is None or scenes.split_of(layout) == split:
            return objects, places, textures, layout


def layouts(
    seed: int, batch_size: int, spec: NamedSpec = NamedSpec(), objects: int | None = None, split: str | None = "train"
) -> list[tuple]:
    rng = np.random.default_rng(seed)
    count = _count(spec, objects)
    return [_draw(rng, spec, count, split)[3] for _ in range(batch_size)]


def _count(spec: NamedSpec, objects: int | None) -> int:
    # A curriculum's fewer objects still include both named ones.
    return spec.objects if objects is None else max(objects, 2)


def _mask(spec: NamedSpec, shape: str, r: int, c: int) -> np.ndarray:
    """The object's patches on both live cameras and the masked one, in image order, flattened."""
    grid = spec.grid
    mask = np.zeros((3, grid, grid), bool)
    for y, x in _cells(shape, r, c):
        mask[0, y, x] = True
        mask[1, x, y] = True  # the wrist camera sees the table transposed
    return mask.reshape(-1)


def _centre(spec: NamedSpec, shape: str, r: int, c: int) -> np.ndarray:
    rows, cols = SHAPES[shape]
    return (np.array([c + cols / 2, r + rows / 2], np.float32)) / spec.grid * 2 - 1  # (x, y) in [-1, 1]


def _naming(spec: NamedSpec, layout: tuple, first: int, second: int):
    """Tokens, the named objects' patches and the action chunk when `layout[first]` is put on
    `layout[second]`."""
    colours = list(COLOURS)
    (k1, s1, r1, c1), (k2, s2, r2, c2) = layout[first], layout[second]
    names = [colours[k1], s1, colours[k2], s2]
    words = [WORDS[names[w]] if isinstance(w, int) else WORDS[w] for w in PROMPT]
    half = spec.horizon // 2
    a, b = _centre(spec, s1, r1, c1), _centre(spec, s2, r2, c2)
    reach = (np.arange(half, dtype=np.float32)[:, None] + 1) / half * a
    carry = a + (np.arange(spec.horizon - half, dtype=np.float32)[:, None] + 1) / (spec.horizon - half) * (b - a)
    actions = np.zeros((spec.horizon, spec.action_dim), np.float32)
    actions[:, :2] = np.concatenate([reach, carry])
    return words, _mask(spec, s1, r1, c1) | _mask(spec, s2, r2, c2), actions


def render(
    seed: int, batch_size: int, spec: NamedSpec = NamedSpec(), objects: int | None = None, split: str | None = "train"
) -> scenes.Batch:
    rng = np.random.default_rng(seed)
    count = _count(spec, objects)
    size, patch = spec.image_size, spec.patch
    cameras = [*scenes.TABLES, scenes.MASKED_CAMERA]
    images = {k: np.zeros((batch_size, size, size, 3), np.float32) for k in cameras}
    drawn, named = [], []
    for i in range(batch_size):
        objects_, places, textures, layout = _draw(rng, spec, count, split)
        for (camera, table), texture in zip(scenes.TABLES.items(), textures, strict=True):
            images[camera][i] = np.asarray(table, np.float32) + texture.repeat(patch, 0).repeat(patch, 1)
        for (colour, shape), (r, c) in zip(objects_, places, strict=True):
            rgb = np.asarray(COLOURS[list(COLOURS)[colour]], np.float32)
            painted = mark(shape, patch)
            for y, x in _cells(shape, r, c):
                base = images["base_0_rgb"][i, y * patch : (y + 1) * patch, x * patch : (x + 1) * patch]
                base[painted] = rgb
                wrist = images["left_wrist_0_rgb"][i, x * patch : (x + 1) * patch, y * patch : (y + 1) * patch]
                wrist[painted.T] = rgb
        drawn.append(layout)
        # The first two objects drawn are the named ones; the layout lists them sorted.
        named.append(tuple(layout.index((*objects_[k], *places[k])) for k in (0, 1)))
    return _batch(spec, images, drawn, named)


def _batch(spec: NamedSpec, images: dict, drawn: list, named: list) -> scenes.Batch:
    b = len(drawn)
    tokens = np.zeros((b, spec.max_token_len), np.int32)
    token_mask = np.zeros((b, spec.max_token_len), bool)
    target_mask = np.zeros((b, 3 * spec.grid**2), bool)
    object_mask = np.zeros((b, 3 * spec.grid**2), bool)
    actions = np.zeros((b, spec.horizon, spec.action_dim), np.float32)
    for i, (layout, (first, second)) in enumerate(zip(drawn, named, strict=True)):
        words, target_mask[i], actions[i] = _naming(spec, layout, first, second)
        tokens[i, : len(words)] = words
        token_mask[i, : len(words)] = True
        for _, shape, r, c in layout:
            object_mask[i] |= _mask(spec, shape, r, c)
    return scenes.Batch(
        images=images,
        image_masks={k: np.full(b, k != scenes.MASKED_CAMERA) for k in images},
        tokens=tokens,
        token_mask=token_mask,
        actions=actions,
        target_mask=target_mask,
        target=np.asarray([layout[f][0] for layout, (f, _) in zip(drawn, named, strict=True)], np.int32),
        layouts=tuple(drawn),
        named=tuple(named),
        distractor_mask=object_mask & ~target_mask,
    )


def rename(batch: scenes.Batch, spec: NamedSpec, seed: int) -> scenes.Batch:
    """The same images, the prompt naming two other objects of each scene (the first named object
    always a new one), with the actions and named patches that go with it."""
    rng = np.random.default_rng(seed)
    named = []
    for layout, (first, second) in zip(batch.layouts, batch.named, strict=True):
        new_first = int(rng.choice([k for k in range(len(layout)) if k not in (first, second)]))
        new_second = int(rng.choice([k for k in range(len(layout)) if k != new_first]))
        named.append((new_first, new_second))
    return _batch(spec, batch.images, list(batch.layouts), named)


def caption(batch: scenes.Batch, i: int) -> str:
    """What scene `i`'s prompt names, e.g. "red block -> blue bar"."""
    colours = list(COLOURS)
    first, second = (batch.layouts[i][k] for k in batch.named[i])
    return f"{colours[first[0]]} {first[1]} -> {colours[second[0]]} {second[1]}"
