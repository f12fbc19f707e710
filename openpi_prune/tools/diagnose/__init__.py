"""`openpi-prune diagnose`: why the pruner collapses on your pi0 / pi0.5 checkpoint, and what does not.

Loads an OpenPI checkpoint the way OpenPI serves it (`restore_params`, then the config's
`model.load`) once per registered pruning method, runs `sample_actions` with every scoring on one
observation (image files and a prompt, or one sample from the config's own data loader), and prints
what the pruner kept and why: kept tokens per live camera, query spread, top-1 vote share, score gap,
and a verdict. A second table measures the geometry of the raw embeddings that explains a collapse:
how much of the tokens' energy lies in their shared (mean) direction, and how much in a few
dimensions ("massive activations"). Writes `kept_patches.png` (verbatim LightVLA, and the best method
that did not collapse) and `diagnosis.json` to `--out`.
"""

import argparse
import json
import pathlib

import numpy as np
from rich.console import Console
from rich.progress import Progress

from openpi_prune.tools.diagnose.inputs import (
    DiagnoseError,
    camera_keys,
    find_config,
    image_paths,
    observation_from_data,
    observation_from_images,
    resolve_params_dir,
)
from openpi_prune.tools.diagnose.measures import hints
from openpi_prune.tools.diagnose.report import geometry_table, picture, rows_table
from openpi_prune.tools.diagnose.running import VERBATIM, best_healthy, console, diagnose

# ----------------------------------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("config", help="OpenPI TrainConfig name, e.g. pi05_libero")
    parser.add_argument(
        "checkpoint", help="checkpoint folder as OpenPI writes it (<dir>/params), a params folder, or a run's folder"
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--images", metavar="FOLDER", help="one image per camera, named by camera key (base_0_rgb.png)")
    source.add_argument("--image", action="append", metavar="KEY=PATH", help="one camera's image (repeatable)")
    source.add_argument("--data", action="store_true", help="one sample from OpenPI's data loader for CONFIG")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", metavar="TEXT", help="task prompt, tokenized by OpenPI's PaliGemma tokenizer")
    prompt.add_argument("--prompt-tokens", metavar="IDS", help="prompt token ids, comma-separated (offline)")
    parser.add_argument("--out", default="openpi-prune-diagnose", help="folder for the picture and diagnosis.json")
    parser.add_argument("--siglip", default=None, metavar="VARIANT", help="SigLIP variant (default: the config's own)")
    parser.add_argument("--min-kept", type=float, default=8.0, help="collapsed below this mean kept per live camera")
    parser.add_argument("--min-spread", type=float, default=0.05, help="collapsed below this query spread")
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float32", "checkpoint"),
        default="bfloat16",
        help="parameter dtype to restore (OpenPI serves in bfloat16; default %(default)s)",
    )
    parser.add_argument("--methods", metavar="A,B", help="only these methods (default: every registered one)")
    parser.add_argument("--scorings", metavar="A,B", help="only these scorings (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise sample_actions starts from")
    return parser


def _subset(text: str | None, known: list[str], what: str) -> list[str] | None:
    if not text:
        return None
    chosen = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [c for c in chosen if c not in known]
    if unknown:
        raise DiagnoseError(f"unknown {what} {', '.join(unknown)}; known: {', '.join(known)}")
    return chosen


def _restore(params_dir: pathlib.Path, dtype: str) -> dict:
    import jax.numpy as jnp
    from openpi.models import model as _model

    try:
        return _model.restore_params(params_dir, dtype=None if dtype == "checkpoint" else jnp.dtype(dtype))
    except Exception as error:  # noqa: BLE001
        raise DiagnoseError(
            f"could not restore the parameters in {params_dir}: {type(error).__name__}: {error}"
        ) from None


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except DiagnoseError as error:
        Console(stderr=True, width=console.width).print(f"[red]error:[/] {error}", highlight=False)
        return 1


def _run(args: argparse.Namespace) -> int:
    from openpi.models import pi0_config

    from openpi_prune import settings
    from openpi_prune.pruner import plugins

    methods = _subset(args.methods, list(plugins.known_methods()), "method(s)")
    scorings = _subset(args.scorings, list(settings.SCORINGS), "scoring(s)")
    train_config = find_config(args.config)
    if not isinstance(train_config.model, pi0_config.Pi0Config):
        raise DiagnoseError(
            f"config {args.config!r} has a {type(train_config.model).__name__}; openpi-prune prunes pi0 / pi0.5 "
            "(Pi0Config) models"
        )
    params_dir = resolve_params_dir(args.checkpoint)
    checkpoint_dir = params_dir.parent
    model_config = train_config.model
    if args.data:
        if args.prompt is not None or args.prompt_tokens is not None:
            raise DiagnoseError("--data takes the prompt from the data loader; drop --prompt / --prompt-tokens")
        observation = observation_from_data(train_config, checkpoint_dir, args.config)
    elif args.images is not None or args.image:
        paths = image_paths(camera_keys(model_config), args.images, args.image)
        observation = observation_from_images(model_config, paths, args.prompt, args.prompt_tokens)
    else:
        raise DiagnoseError("give an observation: --images FOLDER, --image KEY=PATH (repeatable) or --data")

    cameras = list(observation.images)
    live_cameras = [k for k in cameras if bool(np.asarray(observation.image_masks[k])[0])]
    live_tokens = int(np.asarray(observation.tokenized_prompt_mask)[0].sum())
    console.print(
        f"[bold]{args.config}[/] ({'pi0.5' if model_config.pi05 else 'pi0'}, PaliGemma {model_config.paligemma_variant},"
        f" action expert {model_config.action_expert_variant}, SigLIP {args.siglip or 'as OpenPI builds it'}) "
        f"from {params_dir}"
    )
    masked = [k for k in cameras if k not in live_cameras]
    console.print(
        f"live cameras: {', '.join(live_cameras)}; masked: {', '.join(masked) or 'none'}; "
        f"prompt: {live_tokens} live tokens"
    )

    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"restoring {params_dir} ({args.dtype})", total=None)
        params = _restore(params_dir, args.dtype)
        progress.remove_task(task)
        rows, geo = diagnose(
            train_config,
            params,
            observation,
            siglip=args.siglip,
            methods=methods,
            scorings=scorings,
            min_kept=args.min_kept,
            min_spread=args.min_spread,
            seed=args.seed,
            progress=progress,
        )

    console.print(rows_table(rows, live_cameras, args.min_kept, args.min_spread))
    fresh = sorted({name for row in rows for name in row.fresh})
    if fresh:
        console.print(
            f"untrained: the checkpoint has no {', '.join(fresh)} (it was trained without those methods), so their "
            "rows prune with freshly initialised values, as OpenPI's loader gives them with openpi-prune enabled. "
            "Fine-tune with the method enabled to train them.",
            highlight=False,
        )
    if geo:
        console.print(geometry_table(geo))
        for hint in hints(geo):
            console.print(f"- {hint}", highlight=False)
    verbatim = next((r for r in rows if (r.method, r.scoring) == VERBATIM and r.kept_mask is not None), None)
    best = best_healthy(rows)
    if verbatim is not None and verbatim.verdict == "collapsed":
        console.print(
            f"verbatim LightVLA collapsed: {verbatim.mean_kept:.1f} kept per live camera, query spread "
            f"{verbatim.query_spread:.3f}, the top patch gets {verbatim.top1_vote_share:.0%} of the votes."
        )
    if best is not None:
        console.print(
            f"best method that did not collapse: [bold]{best.method}[/] with scoring [bold]{best.scoring}[/] "
            f"(query spread {best.query_spread:.3f}, {best.mean_kept:.1f} kept per live camera); enable it with "
            f"openpi_prune.enable(method={best.method!r}, scoring={best.scoring!r})"
        )
    else:
        console.print("[red]every method collapsed (or failed) on these weights and this observation[/]")

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shown = [(f"verbatim LightVLA ({VERBATIM[0]}, {VERBATIM[1]})", verbatim)] if verbatim is not None else []
    if best is not None:
        shown.append((f"best healthy: {best.method}, {best.scoring}", best))
    image_path = picture(observation, shown, out / "kept_patches.png") if shown else None
    if image_path is not None:
        console.print(f"kept patches per camera: {image_path}")
    report = {
        "config": args.config,
        "params": str(params_dir),
        "cameras": cameras,
        "live_cameras": live_cameras,
        "live_prompt_tokens": live_tokens,
        "thresholds": {"min_kept_per_live_camera": args.min_kept, "min_query_spread": args.min_spread},
        "rows": [r.as_dict() for r in rows],
        "geometry": geo,
        "best": None if best is None else {"method": best.method, "scoring": best.scoring},
        "picture": None if image_path is None else str(image_path),
    }
    (out / "diagnosis.json").write_text(json.dumps(report, indent=2))
    console.print(f"report: {out / 'diagnosis.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="openpi-prune diagnose", description=__doc__))
    return run(parser.parse_args(argv))
