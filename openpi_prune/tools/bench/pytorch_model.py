"""`openpi-prune bench --small --pytorch`: OpenPI's PyTorch pi0.5 (`PI0Pytorch`), upstream and
pruned, on the same weights and input, beside the JAX table of the same run.

Each variant's `sample_actions` runs as OpenPI's PyTorch policy runs it: compiled by `torch.compile`
(`--pytorch-compile`, default inductor; OpenPI's own mode is max-autotune, whose search takes long on
a CPU), or eager. Warmed up (the compile), then every call timed to its result (on a GPU, synchronised).
"""

import dataclasses
import statistics
import time
import warnings

from rich.progress import Progress
from rich.table import Table

import openpi_prune
from openpi_prune.errors import UntrainedParametersWarning
from openpi_prune.tools import small
from openpi_prune.tools.bench.timing import console

VARIANTS = (
    ("upstream PyTorch", None),
    ("keep_all (pipeline, nothing pruned)", dict(method="keep_all")),
    ("relevance (defaults)", {}),
    ("relevance, 10 % kept", dict(keep_fraction=0.1)),
)


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    prefix: int  # positions PaliGemma runs
    kept: float  # image tokens kept, mean over the batch
    times_ms: list[float]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)


def run(*, paligemma, action_expert, siglip, batch_size, num_steps, repeats, compile_mode) -> list[Row]:
    import torch
    from openpi.models_pytorch import pi0_pytorch

    from openpi_prune.adapter import pytorch

    cfg = small.config(pi05=True, paligemma_variant=paligemma, action_expert_variant=action_expert, max_token_len=48)
    with openpi_prune.disabled():
        upstream = small.create_pytorch(cfg, siglip=siglip)
    with openpi_prune.enabled():  # built patched (with the head); each variant's settings below
        twin = small.create_pytorch(cfg, siglip=siglip)
    with warnings.catch_warnings():  # a fresh head: timing only
        warnings.simplefilter("ignore", UntrainedParametersWarning)
        twin.load_state_dict(upstream.state_dict(), strict=False)
    obs = small.torch_observation(small.observation(cfg, batch_size=batch_size, prompt_tokens=16))
    noise = torch.randn(batch_size, cfg.action_horizon, cfg.action_dim, generator=torch.Generator().manual_seed(0))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    upstream, twin = upstream.to(device), twin.to(device)
    obs = type(obs)(**{f.name: _to(getattr(obs, f.name), device) for f in dataclasses.fields(obs)})
    noise = noise.to(device)

    def wait(x):
        if device == "cuda":
            torch.cuda.synchronize()
        return x

    rows = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("compiling and timing", total=len(VARIANTS))
        for name, settings in VARIANTS:
            progress.update(task, description=f"PyTorch, compiling and timing: {name}")
            torch._dynamo.reset()
            model = upstream if settings is None else twin
            sample = pi0_pytorch.PI0Pytorch.sample_actions.__get__(model)
            if compile_mode != "none":
                sample = torch.compile(sample, mode=None if compile_mode == "default" else compile_mode)
            block = openpi_prune.disabled() if settings is None else openpi_prune.enabled(warn_below=0, **settings)
            with block:
                wait(sample(device, obs, noise=noise, num_steps=num_steps))  # warm-up: the compile
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    wait(sample(device, obs, noise=noise, num_steps=num_steps))
                    times.append((time.perf_counter() - start) * 1e3)
                figures = None if settings is None else pytorch.take_figures(model)
            if figures is None:
                prefix, kept = 3 * 256 + cfg.max_token_len, 3 * 256.0
            else:
                prefix, kept = int(figures[1]["prefix_length"][0]), float(figures[1]["kept"].mean())
            rows.append(Row(name, prefix, kept, times))
            progress.advance(task)
    return rows


def _to(value, device):
    if isinstance(value, dict):
        return {k: v.to(device) for k, v in value.items()}
    return value.to(device) if value is not None else None


def show(rows: list[Row], title: str) -> None:
    table = Table("variant", "prefix", "kept", "ms min / median", "speed-up", title=title)
    base = rows[0].median_ms
    for row in rows:
        table.add_row(
            row.name,
            str(row.prefix),
            f"{row.kept:.0f}",
            f"{min(row.times_ms):.1f} / {row.median_ms:.1f}",
            f"{base / row.median_ms:.2f}x",
        )
    console.print(table)
