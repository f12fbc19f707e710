"""`openpi-prune bench`: upstream OpenPI and pruned variants side by side, in one process.

Each variant compiles `sample_actions` the way OpenPI's `Policy` does (`nnx_utils.module_jit`: the
model's state passed in, not baked in), on the same real model and input, once; it is warmed up,
then timed over `repeats` calls. XLA's cost and memory analysis of that same executable give FLOPs
and temporary memory.
"""

import dataclasses
import json
import pathlib
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
from openpi_prune import errors, telemetry
from openpi_prune.pruner import methods
from openpi_prune.tools import flops, small

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


def _timed(fn, args, repeats: int) -> list[float]:
    """Milliseconds of `repeats` calls of `fn(*args)`, after one call to warm up."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _compiled_sample(model, observation, num_steps):
    """`sample_actions` compiled as `nnx_utils.module_jit` (and so `Policy`) compiles it, with the
    settings in force, and its arguments. The model's state is an argument, not a constant; it is
    compiled ahead of time so that the executable timed is the one analysed. The observation goes
    in as leaves: its type check rejects jax's placeholders in lowering."""
    graphdef, state = nnx.split(model)
    leaves, tree = jax.tree.flatten(observation)

    def sample(state, leaves):
        return nnx.merge(graphdef, state).sample_actions(jax.random.key(0), tree.unflatten(leaves), num_steps=num_steps)

    return jax.jit(sample).lower(state, leaves).compile(), (state, leaves)


def _measure(model, observation, num_steps, repeats):
    compiled, args = _compiled_sample(model, observation, num_steps)
    times = _timed(compiled, args, repeats)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    memory = compiled.memory_analysis()
    return (
        statistics.median(times),
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
            times.append((name, statistics.median(_timed(compiled, (params,), repeats))))
            progress.advance(task)
    return times


SERVING_VARIANTS = (
    ("upstream OpenPI", None),
    ("relevance, telemetry off", dict(method="relevance", telemetry=False)),
    ("relevance, telemetry on (default)", dict(method="relevance")),
)


def serving_times(
    *, siglip: str | None, paligemma: str, num_steps: int, repeats: int
) -> list[tuple[str, float, dict | None]]:
    """Median wall time of OpenPI's `Policy.infer` (one observation, as a robot server calls it) per
    variant, and the pruning figures its last response carried: with telemetry on, each call also
    waits for the pruner's report on the host."""
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
                samples = _timed(policy.infer, (example,), repeats)  # the warm-up call compiles
                figures = policy.infer(example).get("pruning")
            times.append((name, statistics.median(samples), figures))
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


# --- At the size users run: OpenPI's pi05_libero model, LIBERO-shaped input --------------------

LIBERO_MASKED_CAMERA = "right_wrist_0_rgb"  # OpenPI's LIBERO inputs mask it for pi0.5
SIZE_VARIANTS = (
    ("upstream OpenPI", None),
    ("relevance (defaults)", dict(method="relevance")),
    ("relevance, telemetry off", dict(method="relevance", telemetry=False)),
    (
        "relevance, LIBERO's unused camera dropped, telemetry off",
        dict(method="relevance", telemetry=False, drop_cameras=(LIBERO_MASKED_CAMERA,)),
    ),
)


@dataclasses.dataclass(frozen=True)
class SizeRow:
    name: str
    batch: int
    prefix: int  # positions PaliGemma runs over
    live: float  # of them, positions any token attends to (batch mean)
    kept: float  # image tokens kept (batch mean)
    flops: flops.Parts
    pruner_flops: float  # XLA's count (no scanned layers inside)
    min_ms: float
    median_ms: float
    temp_bytes: float | None
    prefix_ms: float | None  # embed_prefix (SigLIP and the pruner) and PaliGemma over the prefix
    pruner_ms: float | None


def libero_config(paligemma: str, action_expert: str, dtype: str):
    """OpenPI's `pi05_libero` model with the given experts (OpenPI's own: gemma_2b, gemma_300m)."""
    from openpi.models import pi0_config

    return pi0_config.Pi0Config(
        pi05=True,
        action_horizon=10,
        discrete_state_input=False,
        paligemma_variant=paligemma,
        action_expert_variant=action_expert,
        dtype=dtype,
    )


def model_at_size(model_config, siglip: str | None, dtype: str):
    """A real `Pi0` of `model_config` with the relevance head, its parameters drawn directly in
    `dtype` (as OpenPI serves a checkpoint: every parameter cast to it), without ever holding a
    float32 copy: a full pi0.5 is 3.4B parameters. Random weights: the timings do not depend on them."""
    import jax.numpy as jnp
    import ml_dtypes
    from flax import traverse_util

    with openpi_prune.enabled(method="relevance"), small.siglip_variant(siglip):
        abstract = nnx.eval_shape(model_config.create, jax.random.key(0))
    graphdef, state = nnx.split(abstract)
    flat = traverse_util.flatten_dict(state.to_pure_dict())
    target = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    # One pool of normal values, each leaf a scaled window onto it: fast, and every leaf finite.
    pool = np.random.default_rng(0).standard_normal(1 << 22, dtype=np.float32)
    params = {}
    for index, (path, leaf) in enumerate(flat.items()):
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            params[path] = jnp.zeros(leaf.shape, leaf.dtype)
            continue
        scale = 1 / np.sqrt(leaf.shape[-2]) if len(leaf.shape) >= 2 else 0.1
        window = (pool * scale).astype(target)
        offset = (index * 7919) % (1 << 21)
        params[path] = jnp.asarray(np.resize(window[offset:], leaf.shape))
    state.replace_by_pure_dict(traverse_util.unflatten_dict(params))
    return nnx.merge(graphdef, state)


def libero_observation(model_config, batch_size: int, prompt_tokens: int):
    """Two live cameras and the masked right wrist, a `prompt_tokens`-token prompt padded to 200."""
    return small.observation(
        model_config,
        batch_size=batch_size,
        prompt_tokens=prompt_tokens,
        camera_masks={LIBERO_MASKED_CAMERA: [False] * batch_size},
    )


def _prefix_parts(model, observation):
    """Compiled functions of the model's state and the observation: the prefix pass as
    `sample_actions` runs it (returning the pruner's telemetry values), and the pruner alone."""
    import jax.numpy as jnp
    from openpi.models import model as _model

    from openpi_prune.adapter import prefix

    graphdef, state = nnx.split(model)
    leaves, tree = jax.tree.flatten(observation)

    def prefix_pass(state, leaves):
        with telemetry.collect() as reports:
            kv_cache, mask = prefix.prefix_pass(nnx.merge(graphdef, state), tree.unflatten(leaves))
        return kv_cache, (reports[0] if reports else {}), jnp.sum(mask, axis=1)

    # The pruner's input: upstream's prefix of the cameras the settings embed.
    obs = prefix.observation_for_prefix(_model.preprocess_observation(None, observation, train=False))
    with openpi_prune.disabled():
        unpruned = jax.jit(lambda state, obs: nnx.merge(graphdef, state).embed_prefix(obs))(state, obs)

    def pruner(state, tokens, mask):
        return prefix.prune(nnx.merge(graphdef, state), obs, tokens, mask, unpruned[2])

    return (
        jax.jit(prefix_pass).lower(state, leaves).compile(),
        (state, leaves),
        jax.jit(pruner).lower(state, unpruned[0], unpruned[1]).compile(),
        (state, unpruned[0], unpruned[1]),
    )


def run_at_size(
    *,
    paligemma: str,
    action_expert: str,
    siglip: str | None,
    dtype: str,
    batch_sizes,
    num_steps: int,
    repeats: int,
    prompt_tokens: int,
) -> list[SizeRow]:
    from openpi_prune.adapter import prefix

    model_config = libero_config(paligemma, action_expert, dtype)
    rows = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("building the model", total=None)
        model = model_at_size(model_config, siglip, dtype)
        progress.update(task, total=len(batch_sizes) * len(SIZE_VARIANTS), completed=0)
        for batch in batch_sizes:
            observation = libero_observation(model_config, batch, prompt_tokens)
            for name, settings in SIZE_VARIANTS:
                progress.update(task, description=f"batch {batch}: {name}")
                telemetry.clear()
                context = (
                    openpi_prune.disabled() if settings is None else openpi_prune.enabled(warn_below=0, **settings)
                )
                with context:
                    obs = (
                        observation
                        if settings is None
                        else prefix.bucket_prompt(observation, openpi_prune.current_settings().prompt_buckets)
                    )
                    compiled, args = _compiled_sample(model, obs, num_steps)
                    times = _timed(compiled, args, repeats)
                    temp = getattr(compiled.memory_analysis(), "temp_size_in_bytes", None)
                    del compiled
                    if settings is None:
                        # Upstream keeps every token of every live camera.
                        per_camera = flops.siglip_tokens(siglip or "So400m/14")
                        live_images = (
                            float(np.mean(sum(np.asarray(m, int) for m in obs.image_masks.values()))) * per_camera
                        )
                        prefix_len = len(obs.images) * per_camera + obs.tokenized_prompt.shape[1]
                        live = float(np.mean(np.sum(obs.tokenized_prompt_mask, axis=1))) + live_images
                        kept, cameras = live_images, len(obs.images)
                        pruner_flops, prefix_ms, pruner_ms = 0.0, None, None
                    else:
                        prefix_pass, pass_args, pruner, pruner_args = _prefix_parts(model, obs)
                        _, values, live_positions = prefix_pass(*pass_args)
                        prefix_ms = min(_timed(prefix_pass, pass_args, repeats))
                        pruner_ms = min(_timed(pruner, pruner_args, max(repeats, 5)))
                        cost = pruner.cost_analysis()
                        pruner_flops = float(((cost[0] if isinstance(cost, list) else cost) or {}).get("flops", 0.0))
                        prefix_len = int(values["prefix_length"][0])
                        live, kept = float(np.mean(live_positions)), float(np.mean(values["kept"]))
                        cameras = len(prefix.observation_for_prefix(obs).images)
                        del prefix_pass, pruner
                    parts = flops.sample_actions(
                        model_config,
                        batch=batch,
                        cameras=cameras,
                        prefix=prefix_len,
                        num_steps=num_steps,
                        siglip_variant=siglip or "So400m/14",
                    )
                    progress.console.print(
                        f"batch {batch}, {name}: prefix {prefix_len}, median {statistics.median(times):.0f} ms"
                        + (f", prefix pass {prefix_ms:.0f} ms, pruner {pruner_ms:.1f} ms" if prefix_ms else "")
                    )
                    rows.append(
                        SizeRow(
                            name,
                            batch,
                            prefix_len,
                            live,
                            kept,
                            parts,
                            pruner_flops,
                            min(times),
                            statistics.median(times),
                            temp,
                            prefix_ms,
                            pruner_ms,
                        )
                    )
                progress.advance(task)
    return rows


SIZE_COLUMNS = (
    "batch",
    "variant",
    "prefix (live)",
    "kept",
    "TFLOP SigLIP / prefix LLM / denoise",
    "TFLOP total",
    "x upstream",
    "ms min / median",
    "speed-up",
    "temp GiB",
    "pruner, % of prefix time",
)


def _size_cells(rows: list[SizeRow]) -> list[list[str]]:
    base, cells = {}, []
    for row in rows:
        reference = base.setdefault(row.batch, row)
        parts = " / ".join(f"{v / 1e12:.2f}" for v in (row.flops.siglip, row.flops.prefix_llm, row.flops.denoise))
        share = f"{row.pruner_ms / row.prefix_ms:.1%} ({row.pruner_ms:.1f} ms)" if row.prefix_ms else "-"
        total = row.flops.total + row.pruner_flops
        cells.append(
            [
                str(row.batch),
                row.name,
                f"{row.prefix} ({row.live:.0f})",
                f"{row.kept:.0f}",
                parts,
                f"{total / 1e12:.2f}",
                f"{total / reference.flops.total:.2f}",
                f"{row.min_ms:.0f} / {row.median_ms:.0f}",
                f"{reference.median_ms / row.median_ms:.2f}x",
                f"{row.temp_bytes / 2**30:.2f}" if row.temp_bytes else "-",
                share,
            ]
        )
    return cells


def show_at_size(rows: list[SizeRow], title: str, out: str | None = None) -> None:
    table = Table(*SIZE_COLUMNS, title=title)
    cells = _size_cells(rows)
    for line in cells:
        table.add_row(*line)
    Console(width=max(console.width, 200)).print(table)
    if out:
        folder = pathlib.Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        lines = [f"| {' | '.join(SIZE_COLUMNS)} |", "|" + "---|" * len(SIZE_COLUMNS)]
        lines += [f"| {' | '.join(line)} |" for line in cells]
        (folder / "bench.md").write_text(f"{title}\n\n" + "\n".join(lines) + "\n")
        records = [dataclasses.asdict(r) | {"flops": dataclasses.asdict(r.flops)} for r in rows]
        (folder / "bench.json").write_text(json.dumps({"title": title, "rows": records}, indent=1))
        console.print(f"wrote {folder}/bench.md and bench.json")


def main(args) -> int:
    # Each variant is compiled anew on purpose; being told so after every switch is noise here.
    warnings.simplefilter("ignore", errors.TracedBeforeChangeWarning)
    machine = (
        f"{platform.processor() or platform.machine()}, {jax.devices()[0].device_kind}, {jax.device_count()} device(s)"
    )
    ignored = (
        [f for f, given in (("--serving", args.serving), ("--train", args.train)) if given]
        if not args.small
        else [f for f, given in (("--action-expert", args.action_expert), ("--out", args.out)) if given]
    )
    if ignored:
        names = ", ".join(ignored)
        raise SystemExit(
            f"{names} times the small model only: add --small"
            if not args.small
            else f"{names} applies to the full-size bench only: drop --small, or drop {names}"
        )
    if not args.small:
        paligemma, expert = args.paligemma or "gemma_2b", args.action_expert or "gemma_300m"
        siglip = args.siglip or "So400m/14"
        rows = run_at_size(
            paligemma=paligemma,
            action_expert=expert,
            siglip=None if siglip == "So400m/14" else siglip,
            dtype=args.dtype,
            batch_sizes=args.batch_size,
            num_steps=args.num_steps,
            repeats=args.repeats or 3,
            prompt_tokens=args.prompt_tokens,
        )
        show_at_size(
            rows,
            f"pi0.5 sample_actions, OpenPI's pi05_libero model ({paligemma} + {expert}, SigLIP {siglip}, "
            f"{args.dtype}), LIBERO-shaped input (2 live cameras, right wrist masked, {args.prompt_tokens} of "
            f"200 prompt tokens live), {args.num_steps} steps, {args.repeats or 3} timed calls, on {machine}",
            args.out,
        )
        for batch in args.batch_size:
            same = {r.name: r.median_ms for r in rows if r.batch == batch}
            on, off = same["relevance (defaults)"], same["relevance, telemetry off"]
            console.print(f"batch {batch}: telemetry costs {on - off:.0f} ms a call ({(on - off) / on:.1%} of it)")
        return 0
    paligemma, siglip_name = args.paligemma or "dummy", args.siglip or "mu/14"
    siglip = None if siglip_name == "So400m/14" else siglip_name
    batch_size = args.batch_size[0]
    repeats = args.repeats or 10
    rows = run(
        siglip=siglip,
        paligemma=paligemma,
        batch_size=batch_size,
        num_steps=args.num_steps,
        repeats=repeats,
        capacities=args.capacity,
    )
    show(
        rows,
        f"pi0.5 sample_actions ({paligemma} Gemma, SigLIP {siglip_name}, batch {batch_size}, "
        f"{args.num_steps} steps, median of {repeats}) on {machine}",
    )
    if args.serving:
        times = serving_times(siglip=siglip, paligemma=paligemma, num_steps=args.num_steps, repeats=repeats)
        table = Table(
            "variant",
            "Policy.infer ms",
            "x upstream",
            "figures in the response",
            title=(
                f"OpenPI Policy.infer, one observation ({paligemma} Gemma, SigLIP {siglip_name}, "
                f"{args.num_steps} steps, median of {repeats}) on {machine}"
            ),
        )
        for name, ms, figures in times:
            kept = "none" if figures is None else f"kept {figures['kept']} of {figures['live_image_tokens']}"
            table.add_row(name, f"{ms:.1f}", f"{ms / times[0][1]:.2f}", kept)
        console.print(table)
        off, on = times[1][1], times[2][1]
        console.print(f"telemetry costs {on - off:.1f} ms a call here ({(on - off) / on:.0%} of the pruned call)")
    if args.train:
        times = train_step_times(siglip=siglip, paligemma=paligemma, batch_size=max(batch_size, 4), repeats=repeats)
        show_train(
            times,
            f"pi0.5 training step, loss and gradient ({paligemma} Gemma, SigLIP {siglip_name}, batch "
            f"{max(batch_size, 4)}, image augmentation on, median of {repeats}) on {machine}",
        )
    return 0
