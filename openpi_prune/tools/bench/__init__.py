"""`openpi-prune bench`: upstream OpenPI and pruned variants side by side, in one process.

Each variant compiles `sample_actions` the way OpenPI's `Policy` does (`nnx_utils.module_jit`: the
model's state passed in, not baked in), on the same real model and input, once; it is warmed up,
then timed over `repeats` calls. XLA's cost and memory analysis of that same executable give FLOPs
and temporary memory.
"""

import platform
import warnings

import jax
from rich.table import Table

from openpi_prune import errors
from openpi_prune.tools.bench import at_size
from openpi_prune.tools.bench.at_size import run_at_size, show_at_size
from openpi_prune.tools.bench.small_model import (
    TRAIN_SHORT,
    TRAIN_VARIANTS,
    run,
    serving_times,
    show,
    show_train,
    train_step_times,
)
from openpi_prune.tools.bench.timing import console


def main(args) -> int:
    # Each variant is compiled anew on purpose; being told so after every switch is noise here.
    warnings.simplefilter("ignore", errors.TracedBeforeChangeWarning)
    machine = (
        f"{platform.processor() or platform.machine()}, {jax.devices()[0].device_kind}, {jax.device_count()} device(s)"
    )
    ignored = (
        [
            f
            for f, given in (
                ("--serving", args.serving),
                ("--train", args.train or args.train_short),
                ("--pytorch", args.pytorch),
            )
            if given
        ]
        if not args.small
        else [f for f, given in (("--out", args.out), ("--siglip-layers", args.siglip_layers is not None)) if given]
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
            siglip_layers=at_size.SIGLIP_LAYERS if args.siglip_layers is None else tuple(args.siglip_layers),
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
    expert = args.action_expert or "dummy"
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
        action_expert=expert,
    )
    show(
        rows,
        f"pi0.5 sample_actions ({paligemma} + {expert} Gemma, SigLIP {siglip_name}, batch {batch_size}, "
        f"{args.num_steps} steps, median of {repeats}) on {machine}",
    )
    if args.serving:
        times = serving_times(
            siglip=siglip, paligemma=paligemma, num_steps=args.num_steps, repeats=repeats, action_expert=expert
        )
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
    if args.pytorch:
        from openpi_prune.tools.bench import pytorch_model

        rows = pytorch_model.run(
            paligemma=paligemma,
            action_expert=expert,
            siglip=siglip,
            batch_size=batch_size,
            num_steps=args.num_steps,
            repeats=repeats,
            compile_mode=args.pytorch_compile,
        )
        compiled = "eager" if args.pytorch_compile == "none" else f"torch.compile mode {args.pytorch_compile}"
        pytorch_model.show(
            rows,
            f"PyTorch pi0.5 sample_actions, PI0Pytorch ({paligemma} + {expert} Gemma, SigLIP {siglip_name}, "
            f"float32, batch {batch_size}, {args.num_steps} steps, {compiled}, median of {repeats}) on {machine}",
        )
    if args.train or args.train_short:
        times = train_step_times(
            siglip=siglip,
            paligemma=paligemma,
            action_expert=expert,
            batch_size=max(batch_size, 4),
            repeats=repeats,
            variants=TRAIN_SHORT if args.train_short else TRAIN_VARIANTS,
        )
        show_train(
            times,
            f"pi0.5 training step, loss and gradient ({paligemma} + {expert} Gemma, SigLIP {siglip_name}, batch "
            f"{max(batch_size, 4)}, image augmentation on, mean of {repeats} consecutive steps) on {machine}",
        )
    return 0
