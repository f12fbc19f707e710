"""`diagnose`'s report: the tables and the picture of the kept patches."""

import math
import pathlib

import numpy as np
from rich.table import Table

from openpi_prune.tools.diagnose.measures import TOP_DIMS
from openpi_prune.tools.diagnose.running import VERBATIM, Row

# ----------------------------------------------------------------------------------------------------------------------
# Output


def _fmt(value, spec=".3g"):
    return "-" if value is None else format(value, spec)


def _verdict(row: Row) -> str:
    colour = {"collapsed": "red", "healthy": "green", "reference": "dim", "error": "red"}[row.verdict]
    return f"[{colour}]{row.verdict}[/]"


def rows_table(rows: list[Row], cameras: list[str], min_kept: float, min_spread: float) -> Table:
    table = Table(
        "method",
        "scoring",
        f"kept per live camera\n({' / '.join(cameras)})",
        "query spread",
        "top-1 vote share",
        "score gap",
        "verdict",
        "notes",
        title=f"pruner on your weights (collapsed: < {min_kept:g} kept per live camera or query spread < {min_spread:g})",
    )
    for row in rows:
        notes = []
        if row.fresh:
            notes.append(f"untrained {', '.join(row.fresh)}")
        if row.error:
            notes.append(f"[red]{row.error}[/]")
        if (row.method, row.scoring) == VERBATIM:
            notes.append("verbatim LightVLA")
        kept = "-" if row.kept_per_camera is None else " / ".join(str(k) for k in row.kept_per_camera)
        table.add_row(
            row.method,
            row.scoring,
            kept,
            _fmt(row.query_spread),
            _fmt(row.top1_vote_share, ".2f"),
            _fmt(row.score_gap),
            _verdict(row),
            "; ".join(notes),
        )
    return table


def geometry_table(geo: dict) -> Table:
    table = Table(
        "raw embeddings",
        "tokens",
        "width",
        "energy in the shared direction",
        f"energy in the top {TOP_DIMS} dims",
        f"top {TOP_DIMS} dims, after centring",
        "isotropic reference",
        title="geometry of the tokens the pruner scores (before any scoring)",
    )
    for what, g in geo.items():
        table.add_row(
            what,
            str(g["tokens"]),
            str(g["width"]),
            f"{g['shared']:.1%}",
            f"{g['top_dims']:.1%}",
            f"{g['top_dims_centred']:.1%}",
            f"{g['isotropic']:.2%}",
        )
    return table


def picture(observation, shown: list[tuple[str, Row]], path: pathlib.Path) -> pathlib.Path:
    """Kept patches (bright) on each live camera, one row per `shown` entry."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cameras = list(observation.images)
    live = [c for c, name in enumerate(cameras) if bool(np.asarray(observation.image_masks[name])[0])]
    fig, axes = plt.subplots(
        len(shown), len(live), figsize=(3.4 * len(live), 3.7 * len(shown)), squeeze=False, layout="constrained"
    )
    for r, (title, row) in enumerate(shown):
        per_camera = row.kept_mask.shape[-1] // len(cameras)
        grid = math.isqrt(per_camera)
        for ax, c in zip(axes[r], live, strict=True):
            image = (np.asarray(observation.images[cameras[c]][0], np.float32) + 1) / 2
            kept = row.kept_mask[c * per_camera : (c + 1) * per_camera]
            if grid * grid == per_camera:
                cell = image.shape[0] // grid
                shade = np.kron(kept.reshape(grid, grid), np.ones((cell, cell)))
                shade = np.pad(shade, ((0, image.shape[0] - shade.shape[0]), (0, image.shape[1] - shade.shape[1])))
                image = image * (0.25 + 0.75 * shade)[..., None]
            ax.imshow(np.clip(image, 0, 1))
            ax.set_title(f"{title}\n{cameras[c]}: {int(kept.sum())} of {per_camera} kept", fontsize=8)
            ax.axis("off")
    fig.suptitle("image tokens the pruner kept (bright)", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
