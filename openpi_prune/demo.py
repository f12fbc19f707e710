"""The main job: prune a real pi0.5 (OpenPI's own `Pi0`, small embedded variant) and show the result.

Prints what was patched, the prefix OpenPI builds with and without pruning, the telemetry of each
built-in method (healthy weights, and weights sharing one direction, where the vote collapses), and
writes a picture of the kept patches per camera.
"""

import os
import pathlib
import warnings

import jax
import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import openpi_prune
from openpi_prune import patch, small, telemetry
from openpi_prune import settings as _settings

console = Console(width=max(Console().width, 110))
METHODS = ("scheme_b", "language_only", "keep_all")
# Telemetry field -> column title.
SHOWN = {
    "kept": "kept",
    "union_picks": "picks",
    "overflow": "overflow",
    "top1_vote_share": "top-1 share",
    "query_spread": "query spread",
    "score_gap": "score gap",
    "live_task_tokens": "task tokens",
}


def _prefix_length(model, observation, noise) -> tuple[int, int]:
    with openpi_prune.noisy_actions(noise, np.ones(noise.shape[0], np.float32)):
        tokens, mask, _ = model.embed_prefix(observation)
    return tokens.shape[1], int(mask.sum())


def run(out: str = "openpi-prune-demo", seed: int = 0) -> int:
    warnings.simplefilter("ignore", patch.TracedBeforeChangeWarning)  # each method is traced anew
    env = os.environ.get(_settings.ENV_VAR, "").strip()
    base = _settings.parse(env) if env else _settings.PruneSettings()
    openpi_prune.enable(base.replace(warn_below=0))
    console.print(f"[bold]openpi-prune[/] enabled with {base}")
    table = Table("patched in OpenPI", "by openpi-prune")
    for name, in_place in patch.installed().items():
        table.add_row(name, "yes" if in_place else "no")
    console.print(table)

    cfg = small.config(pi05=True, max_token_len=48)
    rows, pictures = [], []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("creating real pi0.5 models (dummy Gemma, SigLIP mu/14)", total=2)
        healthy = small.create(cfg, seed=seed)
        progress.advance(task)
        collapsed = small.create(cfg, seed=seed)
        small.add_shared_component(collapsed, scale=2.0, seed=seed)
        progress.advance(task)
        console.print(
            f"pi0.5 with {small.parameter_count(healthy) / 1e6:.1f}M parameters, 3 cameras x 256 image tokens"
        )

        observation = small.observation(cfg, batch_size=1, seed=seed, prompt_tokens=14)
        noise = jax.random.normal(jax.random.key(seed), (1, cfg.action_horizon, cfg.action_dim))
        with openpi_prune.disabled():
            upstream = healthy.embed_prefix(observation)
        pruned_len, pruned_live = _prefix_length(healthy, observation, noise)
        console.print(
            f"prefix: upstream OpenPI {upstream[0].shape[1]} positions ({int(upstream[1].sum())} live); "
            f"pruned ({base.mode}) {pruned_len} positions ({pruned_live} live)"
        )

        task = progress.add_task("sampling actions with each method", total=2 * len(METHODS))
        for weights, model in (("healthy", healthy), ("shared direction", collapsed)):
            for method in METHODS:
                with openpi_prune.enabled(base.replace(method=method, warn_below=0)):
                    model.sample_actions(jax.random.key(seed), observation, noise=noise, num_steps=2)
                    jax.effects_barrier()
                report = telemetry.recent()[-1]
                rows.append((weights, method, report))
                if method != "keep_all" and (weights == "healthy" or method == "scheme_b"):
                    pictures.append((f"{method} ({weights})", report))
                progress.advance(task)

    result = Table(
        "weights", "method", *SHOWN.values(), title=f"telemetry ({base.mode} mode, capacity {rows[0][2].capacity})"
    )
    for weights, method, report in rows:
        summary = report.summary()
        result.add_row(weights, method, *(f"{summary[k]:.3g}" for k in SHOWN))
    console.print(result)
    path = _picture(observation, pictures, pathlib.Path(out))
    console.print(f"kept patches per camera: {path}")
    openpi_prune.disable()
    return 0


def _picture(observation, reports, out: pathlib.Path) -> pathlib.Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cameras = list(observation.images)
    fig, axes = plt.subplots(
        len(reports), len(cameras), figsize=(3.2 * len(cameras), 3.4 * len(reports)), squeeze=False
    )
    for row, (method, report) in enumerate(reports):
        kept = report.kept_mask[0].reshape(len(cameras), 16, 16)
        for col, name in enumerate(cameras):
            image = (np.asarray(observation.images[name][0]) + 1) / 2
            shade = np.kron(kept[col], np.ones((14, 14)))[..., None]
            ax = axes[row, col]
            ax.imshow(image * (0.25 + 0.75 * shade))
            ax.set_title(f"{method}\n{name}: {int(kept[col].sum())} of 256 kept", fontsize=9)
            ax.axis("off")
    fig.suptitle("Image tokens the pruner kept (bright) on a real small pi0.5 with random weights", fontsize=10)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "kept_patches.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
