"""At the size users run: OpenPI's pi05_libero model, LIBERO-shaped input, upstream beside the
pruned default and its variants."""

import dataclasses
import json
import pathlib
import statistics

import jax
import numpy as np
from flax import nnx
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import openpi_prune
from openpi_prune import telemetry
from openpi_prune.tools import flops, small
from openpi_prune.tools.bench import timing
from openpi_prune.tools.bench.timing import console

# --- At the size users run: OpenPI's pi05_libero model, LIBERO-shaped input --------------------

LIBERO_MASKED_CAMERA = "right_wrist_0_rgb"  # OpenPI's LIBERO inputs mask it for pi0.5
DROPPED = dict(method="relevance", telemetry=False, drop_cameras=(LIBERO_MASKED_CAMERA,))
SIZE_VARIANTS = (
    ("upstream OpenPI", None),
    ("relevance (defaults)", dict(method="relevance")),
    ("relevance, telemetry off", dict(method="relevance", telemetry=False)),
    ("relevance, LIBERO's unused camera dropped, telemetry off", DROPPED),
)
SIGLIP_LAYERS = (9, 4, 0)  # of So400m's 27: a third, a seventh, none (SigLIP on the kept patches alone)


def size_variants(siglip_layers=SIGLIP_LAYERS) -> tuple:
    """The rows: upstream, the defaults, and the dropped-camera row pruned inside SigLIP after each
    of `siglip_layers`."""
    inside = tuple(
        (
            f"same, pruned inside SigLIP after layer {layer}" if layer else "same, pruned before SigLIP",
            DROPPED | dict(siglip_layer=layer),
        )
        for layer in siglip_layers
    )
    return SIZE_VARIANTS + inside


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
    prefix_ms: float  # embed_prefix (SigLIP and the pruner) and PaliGemma over the prefix, fastest
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


def _prefix_pass(model, observation):
    """The prefix pass as `sample_actions` runs it (returning the pruner's telemetry values and the
    live positions), compiled, and its arguments."""
    import jax.numpy as jnp

    from openpi_prune.adapter import prefix

    graphdef, state = nnx.split(model)
    leaves, tree = jax.tree.flatten(observation)

    def prefix_pass(state, leaves):
        with telemetry.collect() as reports:
            kv_cache, mask = prefix.prefix_pass(nnx.merge(graphdef, state), tree.unflatten(leaves))
        return kv_cache, (reports[0] if reports else {}), jnp.sum(mask, axis=1)

    return jax.jit(prefix_pass).lower(state, leaves).compile(), (state, leaves)


def _prefix_parts(model, observation):
    """Compiled functions of the model's state and the observation: the prefix pass, and the pruner
    alone."""
    from openpi.models import model as _model

    from openpi_prune.adapter import prefix

    graphdef, state = nnx.split(model)
    # The pruner's input: upstream's prefix of the cameras the settings embed.
    obs = prefix.observation_for_prefix(_model.preprocess_observation(None, observation, train=False))
    with openpi_prune.disabled():
        unpruned = jax.jit(lambda state, obs: nnx.merge(graphdef, state).embed_prefix(obs))(state, obs)

    def pruner(state, tokens, mask):
        return prefix.prune(nnx.merge(graphdef, state), obs, tokens, mask, unpruned[2])

    return (
        *_prefix_pass(model, observation),
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
    siglip_layers=SIGLIP_LAYERS,
) -> list[SizeRow]:
    from openpi_prune.adapter import prefix

    model_config = libero_config(paligemma, action_expert, dtype)
    rows = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("building the model", total=None)
        model = model_at_size(model_config, siglip, dtype)
        variants = size_variants(siglip_layers)
        progress.update(task, total=len(batch_sizes) * len(variants), completed=0)
        for batch in batch_sizes:
            observation = libero_observation(model_config, batch, prompt_tokens)
            for name, settings in variants:
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
                    compiled, args = timing.compiled_sample(model, obs, num_steps)
                    times = timing.timed(compiled, args, repeats)
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
                        prefix_pass, pass_args = _prefix_pass(model, obs)
                        prefix_ms = min(timing.timed(prefix_pass, pass_args, repeats))
                        pruner_flops, pruner_ms = 0.0, None
                        del prefix_pass
                    else:
                        prefix_pass, pass_args, pruner, pruner_args = _prefix_parts(model, obs)
                        _, values, live_positions = prefix_pass(*pass_args)
                        prefix_ms = min(timing.timed(prefix_pass, pass_args, repeats))
                        pruner_ms = min(timing.timed(pruner, pruner_args, max(repeats, 5)))
                        cost = pruner.cost_analysis()
                        pruner_flops = float(((cost[0] if isinstance(cost, list) else cost) or {}).get("flops", 0.0))
                        prefix_len = int(values["prefix_length"][0])
                        live, kept = float(np.mean(live_positions)), float(np.mean(values["kept"]))
                        cameras = len(prefix.observation_for_prefix(obs).images)
                        del prefix_pass, pruner
                    layer = None if settings is None else settings.get("siglip_layer")
                    # Pruned inside SigLIP: each camera's later blocks run on its share of the slots.
                    siglip_kept = (prefix_len - obs.tokenized_prompt.shape[1]) // cameras if layer is not None else 0
                    parts = flops.sample_actions(
                        model_config,
                        batch=batch,
                        cameras=cameras,
                        prefix=prefix_len,
                        num_steps=num_steps,
                        siglip_variant=siglip or "So400m/14",
                        siglip_layer=layer,
                        siglip_kept=siglip_kept,
                    )
                    progress.console.print(
                        f"batch {batch}, {name}: prefix {prefix_len}, median {statistics.median(times):.0f} ms"
                        + f", prefix pass {prefix_ms:.0f} ms"
                        + (f", pruner {pruner_ms:.1f} ms" if pruner_ms else "")
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
    "ms after the prefix pass (floor)",
    "temp GiB",
    "pruner, % of prefix time",
)


def _size_cells(rows: list[SizeRow]) -> list[list[str]]:
    base, cells = {}, []
    for row in rows:
        reference = base.setdefault(row.batch, row)
        parts = " / ".join(f"{v / 1e12:.2f}" for v in (row.flops.siglip, row.flops.prefix_llm, row.flops.denoise))
        share = f"{row.pruner_ms / row.prefix_ms:.1%} ({row.pruner_ms:.1f} ms)" if row.pruner_ms else "-"
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
                # What pruning cannot shorten: mostly the denoising steps (fastest call minus fastest prefix pass).
                f"{row.min_ms - row.prefix_ms:.0f}",
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
