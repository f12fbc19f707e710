"""The main job: prune a real pi0.5 (OpenPI's own `Pi0`, small embedded variant) on rendered scenes.

Prints what was patched, the prefix OpenPI builds with and without pruning, and the telemetry of
the default method (its relevance head untrained: random weights) and of verbatim LightVLA, on
healthy weights and on weights whose embeddings share one direction (where verbatim LightVLA
collapses). Writes a picture of the kept patches over
the scenes: three coloured blocks, the prompt naming one of them (its patches outlined).
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
from openpi_prune import errors, telemetry
from openpi_prune import settings as _settings
from openpi_prune.adapter import install
from openpi_prune.tools import small
from openpi_prune.tools.lab import pictures, scenes

console = Console(width=max(Console().width, 130))
VERBATIM = dict(method="language_only", scoring="lightvla")  # LightVLA's released recipe
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
# The lab's scenes at SigLIP mu/14: 16 x 16 patches a camera, each block 4 x 4 of them.
SPEC = scenes.SceneSpec(patch=14, block=4, max_token_len=48)


def _prefix_length(model, observation, noise) -> tuple[int, int]:
    with openpi_prune.noisy_actions(noise, np.ones(noise.shape[0], np.float32)):
        tokens, mask, _ = model.embed_prefix(observation)
    return tokens.shape[1], int(mask.sum())


def run(out: str = "openpi-prune-demo", seed: int = 0) -> int:
    warnings.simplefilter("ignore", errors.TracedBeforeChangeWarning)  # each method is traced anew
    env = os.environ.get(_settings.ENV_VAR, "").strip()
    default = _settings.parse(env) if env else _settings.PruneSettings()
    # Create the models with every method's parameters the demo runs (the default's may be a plugin's).
    methods = {"default": default.replace(warn_below=0), "verbatim LightVLA": default.replace(warn_below=0, **VERBATIM)}
    openpi_prune.enable(methods["default"])
    console.print(f"[bold]openpi-prune[/] enabled with {default}")
    table = Table("patched in OpenPI", "by openpi-prune")
    for name, in_place in install.installed().items():
        table.add_row(name, "yes" if in_place else "no")
    console.print(table)

    cfg = small.config(pi05=True, max_token_len=SPEC.max_token_len)
    rows, kept = [], {}
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("creating real pi0.5 models (dummy Gemma, SigLIP mu/14)", total=2)
        healthy = small.create(cfg, seed=seed)
        progress.advance(task)
        collapsed = small.create(cfg, seed=seed)
        small.add_shared_component(collapsed, scale=2.0, seed=seed)
        progress.advance(task)
        console.print(
            f"pi0.5 with {small.parameter_count(healthy) / 1e6:.1f}M parameters (random weights), "
            "3 cameras x 256 image tokens, the third camera masked as in LIBERO"
        )
        batch = scenes.render(seed, 1, SPEC)
        observation = batch.observation()
        noise = jax.random.normal(jax.random.key(seed), (1, cfg.action_horizon, cfg.action_dim))
        with openpi_prune.disabled():
            upstream = healthy.embed_prefix(observation)
        pruned_len, pruned_live = _prefix_length(healthy, observation, noise)
        console.print(
            f"prefix: upstream OpenPI {upstream[0].shape[1]} positions ({int(upstream[1].sum())} live); "
            f"pruned ({default.mode}) {pruned_len} positions ({pruned_live} live)"
        )

        task = progress.add_task("sampling actions with each method", total=2 * len(methods))
        for weights, model in (("healthy", healthy), ("shared direction", collapsed)):
            for label, settings in methods.items():
                with openpi_prune.enabled(settings):
                    model.sample_actions(jax.random.key(seed), observation, noise=noise, num_steps=2)
                    jax.effects_barrier()
                report = telemetry.recent()[-1]
                rows.append((weights, label, settings, report))
                kept[f"{label}\n({weights})"] = report.kept_mask
                progress.advance(task)

    result = Table(
        "weights",
        "",
        "method",
        "scoring",
        *SHOWN.values(),
        title=f"telemetry ({default.mode} mode, capacity {rows[0][3].capacity})",
    )
    for weights, label, settings, report in rows:
        summary = report.summary()
        result.add_row(weights, label, settings.method, settings.scoring, *(f"{summary[k]:.3g}" for k in SHOWN))
    console.print(result)
    out_dir = pathlib.Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "kept_patches.png"
    pictures.kept_patches(batch, {k: np.asarray(v) for k, v in kept.items()}, SPEC, path, scenes_shown=1)
    console.print(f"kept patches over the scene: {path}")
    openpi_prune.disable()
    return 0
