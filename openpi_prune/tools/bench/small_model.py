"""The small pi0.5 with every method: `sample_actions`, the training step and `Policy.infer`, each
variant beside upstream."""

import dataclasses
import statistics

import jax
import numpy as np
from flax import nnx
from rich.progress import Progress
from rich.table import Table

import openpi_prune
from openpi_prune import telemetry
from openpi_prune.pruner import methods
from openpi_prune.tools import small
from openpi_prune.tools.bench import timing
from openpi_prune.tools.bench.timing import console


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
    compiled, args = timing.compiled_sample(model, observation, num_steps)
    times = timing.timed(compiled, args, repeats)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    memory = compiled.memory_analysis()
    return (
        statistics.median(times),
        (cost or {}).get("flops"),
        getattr(memory, "temp_size_in_bytes", None),
    )


def run(
    *,
    siglip: str | None,
    paligemma: str,
    batch_size: int,
    num_steps: int,
    repeats: int,
    capacities,
    action_expert: str = "dummy",
) -> list[Row]:
    cfg = small.config(pi05=True, paligemma_variant=paligemma, action_expert_variant=action_expert, max_token_len=48)
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


# Each rule spelt out, so that a row means the same whatever the defaults; the default is
# compact after the ramp with the saliency every 4th step.
_FULL_LENGTH = dict(method="relevance", compact_training=False)
_COMPACT = dict(method="relevance", compact_training=True, keep_ramp_steps=1)
EARLIER = "relevance, saliency every step, full length"
DEFAULT = "relevance, compact after the ramp, saliency every 4th step (default)"
IN_RAMP = "  the same, during the ramp (full length)"
# (name, settings): after the ramp the model's step is past keep_ramp_steps.
TRAIN_VARIANTS = (
    ("upstream OpenPI", None),
    (EARLIER, dict(_FULL_LENGTH, saliency_every=1)),
    ("relevance, saliency every 4th step, full length", dict(_FULL_LENGTH, saliency_every=4)),
    ("relevance, compact after the ramp, saliency every step", dict(_COMPACT, saliency_every=1)),
    (DEFAULT, dict(_COMPACT, saliency_every=4)),
    (IN_RAMP, dict(_COMPACT, saliency_every=4, keep_ramp_steps=10**6)),
    # No ramp, so no `lax.cond` between the two lengths: what the condition itself costs.
    ("  the same, compact from the first step (no ramp)", dict(_COMPACT, saliency_every=4, keep_ramp_steps=0)),
    (
        "relevance, compact after the ramp, saliency of a quarter of each batch",
        dict(_COMPACT, saliency_share=0.25, saliency_every=1),
    ),
    ("scheme_b", dict(method="scheme_b")),
    ("language_only (verbatim LightVLA)", dict(method="language_only", scoring="lightvla")),
)
# The rows a larger model's bench needs (`--train-short`): upstream, the earlier rule, the default
# after and during the ramp (a whole fine-tune's average comes from the last two).
TRAIN_SHORT = tuple(row for row in TRAIN_VARIANTS if row[0] in ("upstream OpenPI", EARLIER, DEFAULT, IN_RAMP))
_CYCLE = 4  # steps timed together, so that "every 4th step" rows pay their share of saliency


class _Steps:
    """Consecutive training steps, each handing the next the model's step, as a train loop does."""

    def __init__(self, compiled, params, counter):
        self.compiled, self.params, self.counter = compiled, params, counter

    def __call__(self):
        (value, self.counter), grads = self.compiled(self.params, self.counter)
        return value, grads


def train_step_times(
    *,
    siglip: str | None,
    paligemma: str,
    action_expert: str = "dummy",
    batch_size: int,
    repeats: int,
    variants: tuple = TRAIN_VARIANTS,
) -> list[tuple[str, float]]:
    """Mean time of a jitted training step (OpenPI's `compute_loss(train=True)` and its gradient) per
    variant, over whole cycles of consecutive steps that carry the model's step (after one warm-up
    step), telemetry off, on one model that has every method's parameters."""
    import jax.numpy as jnp

    from openpi_prune.adapter import training

    cfg = small.config(pi05=True, paligemma_variant=paligemma, action_expert_variant=action_expert, max_token_len=48)
    model = _model_with_every_method(cfg, siglip)
    observation = small.observation(cfg, batch_size=batch_size, prompt_tokens=16)
    actions = small.actions(cfg, batch_size=batch_size)
    graphdef, params, counter, rest = nnx.split(model, nnx.Param, training.TrainingStep, ...)
    steps = _CYCLE * max(1, round(repeats / _CYCLE))
    times = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("timing training steps", total=len(variants))
        for name, settings in variants:
            progress.update(task, description=f"timing training steps: {name}")

            def step(params, counter):
                def loss(p):
                    m = nnx.merge(graphdef, p, counter, rest)
                    value = jnp.mean(m.compute_loss(jax.random.key(0), observation, actions, train=True))
                    return value, nnx.state(m, training.TrainingStep)

                return jax.value_and_grad(loss, has_aux=True)(params)

            context = openpi_prune.disabled() if settings is None else openpi_prune.enabled(telemetry=False, **settings)
            with context:
                compiled = jax.jit(step).lower(params, counter).compile()
            samples = timing.timed(_Steps(compiled, params, counter), (), steps)
            times.append((name, statistics.mean(samples)))
            progress.advance(task)
    return times


SERVING_VARIANTS = (
    ("upstream OpenPI", None),
    ("relevance, telemetry off", dict(method="relevance", telemetry=False)),
    ("relevance, telemetry on (default)", dict(method="relevance")),
)


def serving_times(
    *, siglip: str | None, paligemma: str, num_steps: int, repeats: int, action_expert: str = "dummy"
) -> list[tuple[str, float, dict | None]]:
    """Median wall time of OpenPI's `Policy.infer` (one observation, as a robot server calls it) per
    variant, and the pruning figures its last response carried: with telemetry on, each call also
    brings the pruner's report back with its actions and hands it to the recorder and the hooks."""
    from openpi.policies import policy as _policy

    cfg = small.config(pi05=True, paligemma_variant=paligemma, action_expert_variant=action_expert, max_token_len=48)
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
                samples = timing.timed(policy.infer, (example,), repeats)  # the warm-up call compiles
                figures = policy.infer(example).get("pruning")
            times.append((name, statistics.median(samples), figures))
            progress.advance(task)
    return times


def show_train(times: list[tuple[str, float]], title: str, ramp_share: float = 0.25) -> None:
    table = Table("variant", "train step ms", "x upstream", title=title)
    for name, ms in times:
        table.add_row(name, f"{ms:.1f}", f"{ms / times[0][1]:.2f}")
    console.print(table)
    by_name = dict(times)
    after, during = by_name[DEFAULT], by_name[IN_RAMP]
    whole = ramp_share * during + (1 - ramp_share) * after
    console.print(
        f"a whole fine-tune with the default (compact after the ramp, saliency every 4th step), the ramp over its first "
        f"{ramp_share:.0%}: {whole / times[0][1]:.2f}x upstream's training time"
    )


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
