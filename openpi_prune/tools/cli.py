"""`openpi-prune doctor` (is OpenPI patchable, what is patched, which plugins) and `openpi-prune demo`."""

import argparse
import importlib.metadata
import importlib.util
import os
import sys

try:
    from rich.console import Console
    from rich.table import Table
except ImportError as error:  # a base install: the plugin without its tools
    raise SystemExit(
        f"openpi-prune's commands need its tools extra ({error.name} is missing): pip install 'openpi-prune[tools]'"
    ) from error

console = Console(width=max(Console().width, 120))


def _openpi_location() -> tuple[str, str]:
    spec = importlib.util.find_spec("openpi")
    if spec is None:
        return "not installed", "-"
    dists = importlib.metadata.packages_distributions().get("openpi", [])
    versions = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in dists) or "unknown distribution"
    return versions, str(spec.submodule_search_locations[0] if spec.submodule_search_locations else spec.origin)


def doctor(_args) -> int:
    import openpi_prune
    from openpi_prune import settings
    from openpi_prune.adapter import install, pytorch
    from openpi_prune.adapter.table import CORE, PYTORCH
    from openpi_prune.pruner import plugins

    dist, where = _openpi_location()
    console.print(f"[bold]OpenPI[/]: {dist} at {where}")
    console.print(f"[bold]openpi-prune[/]: {importlib.metadata.version('openpi-prune')} at {os.path.dirname(__file__)}")
    env = os.environ.get(settings.ENV_VAR)
    console.print(f"[bold]{settings.ENV_VAR}[/]: {env!r}" if env is not None else f"[bold]{settings.ENV_VAR}[/]: unset")
    if dist == "not installed":
        console.print("[red]OpenPI is not importable here: nothing can be patched.[/]")
        return 1
    install.import_openpi()
    problems = install.check_openpi()
    targets = Table("target", "compatible", "patched")
    patched = install.installed()
    for target in CORE + PYTORCH:
        bad = [p for p in problems if p.startswith(target.qualname)]
        # The PyTorch rows are patched as a group (per-instance ones on each model built after).
        done = pytorch.ACTIVE if target in PYTORCH else patched.get(target.qualname)
        targets.add_row(
            target.qualname,
            "yes" if not bad else "[red]no[/]: " + "; ".join(bad),
            ("yes, on each model built" if target.per_instance else "yes") if done else "no",
        )
    console.print(targets)
    console.print(f"settings in force: {openpi_prune.current_settings() or 'disabled'}")
    table = Table("plugin", "distribution", "methods")
    manager = plugins.get_manager()
    methods = plugins.known_methods(manager)
    for name, dist_name in plugins.plugin_distributions(manager):
        table.add_row(name, dist_name, ", ".join(m for m, p in methods.items() if p == name))
    console.print(table)
    blocked = [name for name in os.environ.get(plugins.BLOCK_VAR, "").split(",") if name]
    if blocked or os.environ.get(plugins.ALLOW_VAR):
        console.print(
            f"{plugins.ALLOW_VAR}={os.environ.get(plugins.ALLOW_VAR, '')!r} {plugins.BLOCK_VAR}={','.join(blocked)!r}"
        )
    return 1 if problems else 0


def demo(args) -> int:
    from openpi_prune.tools import demo as _demo

    return _demo.run(out=args.out, seed=args.seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="openpi-prune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("doctor", help="which OpenPI, whether its targets match, what is patched, which plugins")
    run = sub.add_parser("demo", help="prune a real (small) pi0.5 and show what was kept")
    run.add_argument("--out", default="openpi-prune-demo", help="folder for the pictures (default: %(default)s)")
    run.add_argument("--seed", type=int, default=0)
    bench = sub.add_parser(
        "bench",
        help="time pruned pi0.5 against upstream OpenPI in one run: at full size (default) or --small",
    )
    bench.add_argument(
        "--small",
        action="store_true",
        help="the small pi0.5 (dummy Gemma, SigLIP mu/14) with every method; --serving and --train need it",
    )
    bench.add_argument("--paligemma", help="PaliGemma's Gemma variant (default gemma_2b; --small: dummy)")
    bench.add_argument(
        "--action-expert",
        help="the action expert's Gemma variant (default gemma_300m; --small: dummy, used by --train)",
    )
    bench.add_argument("--siglip", help="SigLIP variant (default OpenPI's own So400m/14; --small: mu/14)")
    bench.add_argument(
        "--siglip-layers",
        type=int,
        nargs="*",
        help="also rows pruned inside SigLIP after each of these layers, 0 before its first (default 9 4 0; "
        "the flag alone: none)",
    )
    bench.add_argument("--dtype", default="bfloat16", help="parameter and compute dtype (default %(default)s)")
    bench.add_argument("--batch-size", type=int, nargs="+", default=[1], help="batch sizes (default 1)")
    bench.add_argument("--out", help="also write the full-size table to OUT/bench.md and OUT/bench.json")
    bench.add_argument("--prompt-tokens", type=int, default=24, help="live prompt tokens of 200 (default 24)")
    bench.add_argument("--num-steps", type=int, default=10, help="denoising steps (OpenPI's default: 10)")
    bench.add_argument("--repeats", type=int, help="timed calls per variant (default 3; --small: 10)")
    bench.add_argument("--capacity", type=int, nargs="+", default=[192, 96], help="--small: compact capacities")
    bench.add_argument("--train", action="store_true", help="--small: also time a training step of each method")
    bench.add_argument(
        "--train-short",
        action="store_true",
        help="--small: --train with upstream, the earlier rule and the default only (for --paligemma gemma_300m)",
    )
    bench.add_argument("--serving", action="store_true", help="--small: also time Policy.infer, telemetry off and on")
    bench.add_argument(
        "--pytorch",
        action="store_true",
        help="--small: also time OpenPI's PyTorch model (PI0Pytorch), upstream and pruned",
    )
    bench.add_argument(
        "--pytorch-compile",
        default="default",
        choices=("default", "max-autotune", "none"),
        help="--pytorch: torch.compile's mode (OpenPI's own: max-autotune), or none for eager (default %(default)s)",
    )
    lab = sub.add_parser("lab", help="train a small pi0.5 on rendered scenes and compare pruning methods")
    lab.add_argument("--out", default="lab-results", help="folder for the table, pictures and checkpoint")
    lab.add_argument("--quick", action="store_true", help="a few steps of each stage: checks the pipeline only")
    lab.add_argument("--retrain", action="store_true", help="train the baseline even if --out has one")
    lab.add_argument("--only", nargs="+", metavar="VARIANT", help="fine-tune only these variants")
    lab.add_argument("--finetune-steps", type=int, help="fine-tuning steps per variant (default 600)")
    lab.add_argument("--baseline-steps", type=int, help="training steps of the unpruned baseline (default 2000)")
    lab.add_argument("--batch-size", type=int, help="training batch size (default 32)")
    lab.add_argument("--baseline-dir", help="where the baseline checkpoint is kept (default: OUT/baseline)")
    lab.add_argument("--validation", type=int, help="validation scenes (default 64)")
    lab.add_argument("--seed", type=int, help="offset of the fine-tuning batches and noise, to repeat a run")
    from openpi_prune.tools import diagnose as _diagnose

    trial = sub.add_parser(
        "trial", help="pruned against an unpruned reference fine-tuned alike: seeds, test split, baselines"
    )
    trial.add_argument(
        "--out", default="trial-results", help="folder for runs, tables and the baseline (default: %(default)s)"
    )
    trial.add_argument("--family", default="blocks", help="scene family: blocks or named (default: %(default)s)")
    trial.add_argument("--quick", action="store_true", help="a few steps and scenes: checks the pipeline only")
    trial.add_argument("--seeds", type=int, nargs="+", help="fine-tuning seeds to run (default 0 1 2)")
    trial.add_argument("--only", nargs="+", metavar="VARIANT", help="run only these variants")
    trial.add_argument("--finetune-steps", type=int, help="fine-tuning steps per variant (default 600; another --out)")
    trial.add_argument("--baseline-steps", type=int, help="training steps of the unpruned baseline (default 2000)")
    trial.add_argument(
        "--baseline-dir", help="the baseline checkpoint to fine-tune from, or train (default: OUT/baseline)"
    )
    trial.add_argument("--report-only", action="store_true", help="summarise the runs in --out, run nothing")
    trial.add_argument(
        "--compare-steps",
        nargs="+",
        metavar="DIR",
        help="trials that differ only in their fine-tuning steps: their ratios side by side, written to --out",
    )
    suite = sub.add_parser(
        "metaworld", help="closed-loop success on Meta-World: pruned against unpruned, through OpenPI's server"
    )
    suite.add_argument(
        "--out", default="metaworld-results", help="folder for the checkpoints and tables (default: %(default)s)"
    )
    suite.add_argument(
        "--quick", action="store_true", help="one task, two episodes, a few steps: checks the pipeline only"
    )
    suite.add_argument("--only", nargs="+", metavar="VARIANT", help="run only these variants")
    suite.add_argument("--episodes", type=int, help="held-out episodes per task (default 50)")
    suite.add_argument("--baseline-steps", type=int, help="training steps of the unpruned policy (default 6000)")
    suite.add_argument("--finetune-steps", type=int, help="fine-tuning steps per variant (default 1000; another --out)")
    suite.add_argument(
        "--finetune-seed",
        type=int,
        help="seed of the fine-tunes' batches and noise draws (default 100000; another --out): a second fine-tune of each variant",
    )
    suite.add_argument(
        "--train-scenes",
        type=int,
        metavar="N",
        help="expert episodes per task (reset seeds 0..N-1) that the policy and the fine-tunes train on "
        "(default 30; another --out)",
    )
    suite.add_argument("--baseline-dir", help="the unpruned policy to fine-tune from, or train (default: OUT/baseline)")
    suite.add_argument(
        "--finetune-from",
        metavar="NPZ",
        help="fine-tune each variant from these unpruned weights (a run's finetuned/reference-unpruned.npz) "
        "instead of the trained policy: pruning a policy already fine-tuned (another --out)",
    )
    suite.add_argument(
        "--teacher",
        metavar="NPZ",
        help="fine-tune on the actions these unpruned weights (a run's finetuned/reference-unpruned.npz) sample "
        "from each step's noise, instead of the expert's: the pruned policy distilled from an unpruned one "
        "(another --out)",
    )
    suite.add_argument(
        "--siglip-depth",
        type=int,
        metavar="N",
        help="SigLIP's layers in the policy (the lab's mu/28 has 1, full pi0.5's So400m 27): another policy, "
        "its own --out and --baseline-dir; --action-mse on its folder takes it too",
    )
    suite.add_argument(
        "--reference-dir",
        metavar="DIR",
        help="where this --out has no reference of its own: pair each variant with DIR's (its closed-loop "
        "reference run, on the same scenes) in the table",
    )
    suite.add_argument(
        "--action-mse",
        action="store_true",
        help="instead of the closed loop: each variant's action MSE on validation reset seeds, the default's at --shares",
    )
    suite.add_argument(
        "--shares",
        nargs="+",
        type=float,
        help="--action-mse: kept shares for the default's weights (default 0.1 0.2 0.3 0.5 1)",
    )
    suite.add_argument(
        "--shares-of",
        nargs="+",
        metavar="VARIANT",
        help="--action-mse: the fine-tuned variants whose weights run at each of --shares (default: the default)",
    )
    suite.add_argument(
        "--validation-episodes",
        type=int,
        default=3,
        help="--action-mse: expert episodes per task (default %(default)s)",
    )
    suite.add_argument(
        "--episodes-dir",
        help="where the expert episodes are rendered and kept (default: in ~/.cache/openpi-prune, outside the checkout)",
    )
    suite.add_argument(
        "--compare-steps",
        nargs="+",
        metavar="DIR",
        help="suites that differ only in their fine-tuning steps: success side by side, written to --out",
    )
    suite.add_argument(
        "--compare-seeds",
        nargs="+",
        metavar="DIR",
        help="suites that differ only in their fine-tunes' seed (--finetune-seed): each fine-tune's gap to the "
        "reference and their mean, written to --out",
    )
    suite.add_argument(
        "--scene-map",
        action="store_true",
        help="where each task's object was in the scenes each finished run of --out failed, beside the "
        "training scenes: scene-map.png and .json in --out",
    )
    _diagnose.add_arguments(
        sub.add_parser("diagnose", help="why the pruner collapses on a checkpoint: every method and scoring, judged")
    )
    args = parser.parse_args(argv)
    return {
        "doctor": doctor,
        "demo": demo,
        "bench": _bench,
        "lab": _lab,
        "trial": _trial,
        "metaworld": _metaworld,
        "diagnose": _diagnose.run,
    }[args.command](args)


def _options(args, function) -> dict:
    """The parsed options `function` takes, by name: a new option of a command reaches its run."""
    import inspect

    return {name: getattr(args, name) for name in inspect.signature(function).parameters if hasattr(args, name)}


def _lab(args) -> int:
    from openpi_prune.tools.lab import run

    run.run(**_options(args, run.run))
    return 0


def _trial(args) -> int:
    from openpi_prune.tools.lab import trial

    trial.run(**_options(args, trial.run))
    return 0


def _metaworld(args) -> int:
    from openpi_prune.tools.lab import metaworld, metaworld_report, metaworld_trial

    try:
        if (args.shares or args.shares_of) and not args.action_mse:
            raise metaworld.SuiteError("--shares and --shares-of apply to --action-mse only")
        for summary in ("compare_steps", "compare_seeds"):
            if getattr(args, summary) and (args.action_mse or args.only or args.quick or args.scene_map):
                flag = "--" + summary.replace("_", "-")
                raise metaworld.SuiteError(f"{flag} summarises finished runs: it takes --out only")
        if args.compare_steps and args.compare_seeds:
            raise metaworld.SuiteError("--compare-steps and --compare-seeds: one comparison a run")
        if args.scene_map and (args.action_mse or args.only):
            raise metaworld.SuiteError("--scene-map draws finished runs: it takes --out and --reference-dir only")
        command = (
            metaworld_report.scene_map
            if args.scene_map
            else metaworld_report.compare_steps
            if args.compare_steps
            else metaworld_report.compare_seeds
            if args.compare_seeds
            else metaworld_trial.action_mse
            if args.action_mse
            else metaworld_trial.run
        )
        command(**_options(args, command))
    except metaworld.SuiteError as error:
        print(f"openpi-prune metaworld: {error}", file=sys.stderr)
        return 2
    return 0


def _bench(args) -> int:
    from openpi_prune.tools import bench

    return bench.main(args)


if __name__ == "__main__":
    sys.exit(main())
