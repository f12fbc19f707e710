"""`openpi-prune bench`: upstream OpenPI and pruned variants side by side, in one process.

Each variant compiles `sample_actions` the way OpenPI's `Policy` does (`nnx_utils.module_jit`: the
model's state passed in, not baked in), on the same real model and input, once; it is warmed up,
then timed over `repeats` calls. XLA's cost and memory analysis of that same executable give FLOPs
and temporary memory.
"""

import dataclasses
import platform
import statistics
import time
import warnings

import jax
import numpy as np
from flax import nnx
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import openpi_prune
from openpi_prune import methods, patch, small, telemetry

console = Console(width=max(Console().width, 110))


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    prefix: int
    kept: float
    latency_ms: float
    flops: float | None
    temp_bytes: float | None


def _variants(capacities):
    yield "upstream OpenPI", None
    yield "keep_all (masked)", dict(method="keep_all", mode="masked")
    yield "relevance compact (default)", dict(method="relevance")
    yield "relevance compact, telemetry off", dict(method="relevance", telemetry=False)
    yield "relevance masked", dict(method="relevance", mode="masked")
    for capacity in capacities:
        yield f"scheme_b compact {capacity}", dict(method="scheme_b", mode="compact", capacity=capacity)


def _model_with_every_method(cfg, siglip):
    """One real model carrying Scheme B's projector and the relevance head, so that every variant
    runs on the same weights."""
    with openpi_prune.enabled(method="scheme_b"):
        model = small.create(cfg, siglip=siglip)
    with openpi_prune.enabled(method="relevance"):
        head = small.create(cfg, siglip=siglip)
    for name in (methods.RELEVANCE_QUERY, methods.RELEVANCE_KEY):
        setattr(model, name, nnx.Param(getattr(head, name).value))
    return model


def _prefix(model, observation, cfg) -> tuple[int, float]:
    """Positions of the prefix PaliGemma runs, and image tokens kept (batch mean), with the settings
    in force (read from the pruner's telemetry values, whether or not it reports them)."""
    b = observation.state.shape[0]
    noise = jax.numpy.zeros((b, cfg.action_horizon, cfg.action_dim))
    with telemetry.collect() as reports, openpi_prune.noisy_actions(noise, jax.numpy.ones(b)):
        tokens, _, _ = model.embed_prefix(observation)
    return tokens.shape[1], float(np.mean(reports[0]["kept"]))


def _measure(model, observation, num_steps, repeats):
    # What `nnx_utils.module_jit` (and so `Policy`) compiles: the model's state is an argument, not
    # a constant. Compiled once, ahead of time, so that the executable timed is the one analysed.
    # The observation goes in as leaves: its type check rejects jax's placeholders in lowering.
    graphdef, state = nnx.split(model)
    leaves, tree = jax.tree.flatten(observation)
    rng = jax.random.key(0)

    def sample(state, leaves):
        return nnx.merge(graphdef, state).sample_actions(rng, tree.unflatten(leaves), num_steps=num_steps)

    compiled = jax.jit(sample).lower(state, leaves).compile()
    jax.block_until_ready(compiled(state, leaves))  # warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(state, leaves))
        times.append(time.perf_counter() - start)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    memory = compiled.memory_analysis()
    return (
        statistics.median(times) * 1e3,
        (cost or {}).get("flops"),
        getattr(memory, "temp_size_in_bytes", None),
    )


def run(*, siglip: str | None, paligemma: str, batch_size: int, num_steps: int, repeats: int, capacities) -> list[Row]:
    cfg = small.config(pi05=True, paligemma_variant=paligemma, max_token_len=48)
    model = _model_with_every_method(cfg, siglip)
    observation = small.observation(cfg, batch_size=batch_size, prompt_tokens=16)
    rows = []
    variants = list(_variants(capacities))
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("compiling and timing", total=len(variants))
        for name, settings in variants:
            progress.update(task, description=f"compiling and timing: {name}")
            telemetry.clear()
            if settings is None:
                with openpi_prune.disabled():
                    latency, flops, temp = _measure(model, observation, num_steps, repeats)
                prefix, kept = 768 + cfg.max_token_len, 768.0
            else:
                with openpi_prune.enabled(warn_below=0, **settings):
                    latency, flops, temp = _measure(model, observation, num_steps, repeats)
                    prefix, kept = _prefix(model, observation, cfg)
            rows.append(Row(name, prefix, kept, latency, flops, temp))
            progress.advance(task)
    return rows


TRAIN_VARIANTS = (
    ("upstream OpenPI", None),
    ("relevance (default)", dict(method="relevance")),
    ("scheme_b", dict(method="scheme_b")),
    ("language_only (verbatim LightVLA)", dict(method="language_only", scoring="lightvla")),
)


def train_step_times(*, siglip: str | None, paligemma: str, batch_size: int, repeats: int) -> list[tuple[str, float]]:
    """Median time of one jitted training step (OpenPI's `compute_loss(train=True)` and its gradient)
    per variant, telemetry off, on one model that has every method's parameters."""
    import jax.numpy as jnp

    cfg = small.config(pi05=True, paligemma_variant=paligemma, max_token_len=48)
    model = _model_with_every_method(cfg, siglip)
    observation = small.observation(cfg, batch_size=batch_size, prompt_tokens=16)
    actions = small.actions(cfg, batch_size=batch_size)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    times = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("timing training steps", total=len(TRAIN_VARIANTS))
        for name, settings in TRAIN_VARIANTS:

            def step(params):
                def loss(p):
                    m = nnx.merge(graphdef, p, rest)
                    return jnp.mean(m.compute_loss(jax.random.key(0), observation, actions, train=True))

                return jax.value_and_grad(loss)(params)

            context = openpi_prune.disabled() if settings is None else openpi_prune.enabled(telemetry=False, **settings)
            with context:
                compiled = jax.jit(step).lower(params).compile()
            jax.block_until_ready(compiled(params))
            samples = []
            for _ in range(repeats):
                start = time.perf_counter()
                jax.block_until_ready(compiled(params))
                samples.append(time.perf_counter() - start)
            times.append((name, statistics.median(samples) * 1e3))
            progress.advance(task)
    return times


SERVING_VARIANTS = (
    ("upstream OpenPI", None),
    ("relevance, telemetry off", dict(method="relevance", telemetry=False)),
    ("relevance, telemetry on (default)", dict(method="relevance")),
)


def serving_times(*, siglip: str | None, paligemma: str, num_steps: int, repeats: int) -> list[tuple[str, float]]:
    """Median wall time of OpenPI's `Policy.infer` (one observation, as a robot server calls it) per
    variant: with telemetry on, each call also waits for the pruner's report on the host."""
    from openpi.policies import policy as _policy

    cfg = small.config(pi05=True, paligemma_variant=paligemma, max_token_len=48)
    model = _model_with_every_method(cfg, siglip)
    observation = small.observation(cfg, batch_size=1, prompt_tokens=16)
    example = jax.tree.map(lambda x: np.asarray(x[0]), observation.to_dict())
    times = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("serving", total=len(SERVING_VARIANTS))
        for name, settings in SERVING_VARIANTS:
            progress.update(task, description=f"serving: {name}")
            context = openpi_prune.disabled() if settings is None else openpi_prune.enabled(warn_below=0, **settings)
            with context:
                policy = _policy.Policy(model, sample_kwargs={"num_steps": num_steps})
                policy.infer(example)  # compiles
                samples = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    policy.infer(example)
                    samples.append(time.perf_counter() - start)
            times.append((name, statistics.median(samples) * 1e3))
            progress.advance(task)
    return times


def show_train(times: list[tuple[str, float]], title: str) -> None:
    table = Table("variant", "train step ms", "x upstream", title=title)
    for name, ms in times:
        table.add_row(name, f"{ms:.1f}", f"{ms / times[0][1]:.2f}")
    console.print(table)


def show(rows: list[Row], title: str) -> None:
    base = rows[0]
    table = Table(
        "variant",
        "prefix",
        "kept",
        "latency ms",
        "x upstream",
        "GFLOP",
        "x upstream",
        "temp MiB",
        "x upstream",
        title=title,
    )

    def ratio(value, reference):
        return f"{value / reference:.2f}" if value and reference else "-"

    for row in rows:
        table.add_row(
            row.name,
            str(row.prefix),
            f"{row.kept:.0f}",
            f"{row.latency_ms:.1f}",
            ratio(row.latency_ms, base.latency_ms),
            f"{row.flops / 1e9:.2f}" if row.flops else "-",
            ratio(row.flops, base.flops),
            f"{row.temp_bytes / 2**20:.0f}" if row.temp_bytes else "-",
            ratio(row.temp_bytes, base.temp_bytes),
        )
    console.print(table)


def main(args) -> int:
    siglip = None if args.siglip == "So400m/14" else args.siglip
    # Each variant is compiled anew on purpose; being told so after every switch is noise here.
    warnings.simplefilter("ignore", patch.TracedBeforeChangeWarning)
    rows = run(
        siglip=siglip,
        paligemma=args.paligemma,
        batch_size=args.batch_size,
        num_steps=args.num_steps,
        repeats=args.repeats,
        capacities=args.capacity,
    )
    machine = (
        f"{platform.processor() or platform.machine()}, {jax.devices()[0].device_kind}, {jax.device_count()} device(s)"
    )
    show(
        rows,
        f"pi0.5 sample_actions ({args.paligemma} Gemma, SigLIP {args.siglip}, batch {args.batch_size}, "
        f"{args.num_steps} steps, median of {args.repeats}) on {machine}",
    )
    if args.serving:
        times = serving_times(siglip=siglip, paligemma=args.paligemma, num_steps=args.num_steps, repeats=args.repeats)
        table = Table(
            "variant",
            "Policy.infer ms",
            "x upstream",
            title=(
                f"OpenPI Policy.infer, one observation ({args.paligemma} Gemma, SigLIP {args.siglip}, "
                f"{args.num_steps} steps, median of {args.repeats}) on {machine}"
            ),
        )
        for name, ms in times:
            table.add_row(name, f"{ms:.1f}", f"{ms / times[0][1]:.2f}")
        console.print(table)
        off, on = times[1][1], times[2][1]
        console.print(f"telemetry costs {on - off:.1f} ms a call here ({(on - off) / on:.0%} of the pruned call)")
    if args.train:
        times = train_step_times(
            siglip=siglip, paligemma=args.paligemma, batch_size=max(args.batch_size, 4), repeats=args.repeats
        )
        show_train(
            times,
            f"pi0.5 training step, loss and gradient ({args.paligemma} Gemma, SigLIP {args.siglip}, batch "
            f"{max(args.batch_size, 4)}, image augmentation on, median of {args.repeats}) on {machine}",
        )
    return 0
