"""`openpi-prune lab`: which pruning method keeps the right tokens on a model that has learned?

1. Train an unpruned pi0.5 on the lab's scenes (or reuse the checkpoint of an earlier run), and
   measure it: the lab proves nothing unless it clearly beats predicting the mean action.
2. Fine-tune every variant from that checkpoint, as users fine-tune from a released pi0.5, with
   LightVLA's training rule and noise schedule, pruning gradually (`Schedule.keep_ramp`).
3. Per variant: validation MSE against the unpruned model, kept tokens per live camera, recall of
   the target's patches, the training telemetry; and the kept count once the model's embeddings get
   a shared direction or a few massive dimensions.
Writes `results.md`, `results.json`, `kept_patches.png` and `training.png` to the output folder,
and each fine-tuned variant's params under `finetuned/<variant>/params`.
"""

import dataclasses
import json
import pathlib
import re
import time
import warnings

from flax import nnx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

import openpi_prune
from openpi_prune import errors
from openpi_prune.tools import small
from openpi_prune.tools.lab import scenes, train

console = Console(width=max(Console().width, 120))

# name -> settings (None: unpruned). Inference in masked mode: the kept count is the method's own,
# not cut by a capacity (compact mode keeps the same set when it fits).
VARIANTS = {
    "unpruned": None,
    # The reference: fine-tuned like every variant, with nothing pruned.
    "unpruned, fine-tuned": dict(method="keep_all", scoring="lightvla"),
    "relevance + robust": dict(method="relevance", scoring="robust"),
    # The default's training rule taken apart: which patches training keeps, and gradual pruning.
    "relevance, saliency picks": dict(method="relevance", scoring="robust", train_picks="saliency"),
    "relevance, pruned from the first step": dict(method="relevance", scoring="robust", train_picks="head"),
    "relevance, saliency picks, pruned from the first step": dict(
        method="relevance", scoring="robust", train_picks="saliency"
    ),
    "relevance + robust, 30 %": dict(method="relevance", scoring="robust", keep_fraction=0.3),
    "language_only (verbatim LightVLA)": dict(method="language_only", scoring="lightvla"),
    "scheme_b": dict(method="scheme_b", scoring="lightvla"),
    "scheme_a": dict(method="scheme_a", scoring="lightvla"),
    "action_queries + robust": dict(method="action_queries", scoring="robust"),
    "scheme_b + robust": dict(method="scheme_b", scoring="robust"),
    "language_only + robust": dict(method="language_only", scoring="robust"),
    "language_only + centred": dict(method="language_only", scoring="centred"),
    # What OpenPI's own numbering of a pruned prefix costs: the same method, tokens renumbered.
    "relevance, renumbered positions": dict(method="relevance", scoring="robust", keep_positions=False),
}
# Variants fine-tuned without gradual pruning (`Schedule.keep_ramp`).
AT_ONCE = {"relevance, pruned from the first step", "relevance, saliency picks, pruned from the first step"}
STRESSES = {
    "shared direction": lambda m: small.add_shared_component(m, scale=2.0),
    "outlier dimensions": lambda m: small.add_outlier_dimensions(m),
}


@dataclasses.dataclass(frozen=True)
class LabPlan:
    baseline: train.Schedule = train.Schedule(steps=2000, lr=1e-3, single_object=0.25)
    finetune: train.Schedule = train.Schedule(
        steps=600, lr=3e-4, batch_size=16, warmup=15, seed=100_000, keep_ramp=0.25
    )
    validation: int = 64
    spec: scenes.SceneSpec = scenes.SceneSpec()


QUICK = LabPlan(
    baseline=train.Schedule(steps=3, lr=1e-3, batch_size=4, single_object=0.34, warmup=1),
    finetune=train.Schedule(steps=2, lr=3e-4, batch_size=4, warmup=1, seed=100_000, keep_ramp=0.25),
    validation=4,
)


def progress_bars() -> Progress:
    """The lab's progress display (the lab, the trial and the Meta-World suite)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def _settings(changes: dict) -> openpi_prune.PruneSettings:
    # Telemetry is collected inside the jitted functions; no host callback needed.
    return openpi_prune.PruneSettings(mode="masked", telemetry=False, warn_below=0, **changes)


def baseline(plan: LabPlan, folder: pathlib.Path, progress: Progress, retrain: bool = False):
    """The unpruned model: trained now, or restored from `folder` when an earlier run left it there."""
    path = folder / "params"
    history_path = folder / "history.json"
    openpi_prune.disable()
    if path.exists() and not retrain:
        console.print(f"reusing the trained baseline in {path} (--retrain to train it anew)")
        return train.load(plan.spec, train.restore_params(path, plan.spec)), json.loads(history_path.read_text())
    model = train.create(plan.spec)
    val = train.validation(plan.spec, plan.validation)
    check = _check(plan, val, train.mean_action_mse(plan.spec, val), "baseline")
    history = train.train(model, plan.spec, plan.baseline, progress, "baseline (unpruned)", check)
    train.save_params(train.params_of(model), path)
    history_path.write_text(json.dumps(history))
    return model, history


def _check(plan: LabPlan, val, mean_mse: float, name: str):
    """Validation MSE every tenth of a training run, printed (a log shows the curve) and kept."""

    def check(model) -> dict:
        ratio = train.evaluate(model, plan.spec, val, mean_mse).mse_ratio
        console.print(f"{name}: validation MSE / predict-the-mean {ratio:.4f}")
        return {"val_mse_vs_mean": ratio}

    return check


def prepare(out: str, only: list[str] | None, variants) -> pathlib.Path:
    """A lab run's output folder (made), once `only` names none but `variants`; the warnings every
    run expects are silenced: each variant is traced anew, and fine-tuning starts the pruner's
    parameters."""
    unknown = set(only or ()) - set(variants)
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(sorted(unknown))}; known: {', '.join(variants)}")
    out_dir = pathlib.Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    warnings.simplefilter("ignore", errors.TracedBeforeChangeWarning)
    warnings.simplefilter("ignore", errors.UntrainedParametersWarning)
    return out_dir


def baseline_folder(out_dir: pathlib.Path, baseline_dir: str | None) -> pathlib.Path:
    """Where a run's unpruned policy is kept: `baseline_dir` (another plan's, to fine-tune from it
    alike), else `out_dir/baseline`."""
    return pathlib.Path(baseline_dir) if baseline_dir else out_dir / "baseline"


def run(
    out: str = "lab-results",
    quick: bool = False,
    retrain: bool = False,
    only: list[str] | None = None,
    finetune_steps: int | None = None,
    baseline_steps: int | None = None,
    batch_size: int | None = None,
    baseline_dir: str | None = None,
    validation: int | None = None,
    seed: int | None = None,
) -> dict:
    plan = QUICK if quick else LabPlan()
    if validation is not None:
        plan = dataclasses.replace(plan, validation=validation)
    if seed is not None:  # another draw of fine-tuning batches and noise, for a run to repeat
        plan = dataclasses.replace(plan, finetune=dataclasses.replace(plan.finetune, seed=plan.finetune.seed + seed))
    for stage, steps in (("baseline", baseline_steps), ("finetune", finetune_steps)):
        schedule = getattr(plan, stage)
        schedule = schedule if steps is None else dataclasses.replace(schedule, steps=steps)
        schedule = schedule if batch_size is None else dataclasses.replace(schedule, batch_size=batch_size)
        plan = dataclasses.replace(plan, **{stage: schedule})
    out_dir = prepare(out, only, VARIANTS)
    spec = plan.spec
    val = train.validation(spec, plan.validation)
    mean_mse = train.mean_action_mse(spec, val)
    results, histories, kept_masks = {}, {}, {}
    started = time.time()
    with progress_bars() as progress:
        base_model, base_history = baseline(plan, baseline_folder(out_dir, baseline_dir), progress, retrain)
        base_params = train.params_of(base_model)
        results["unpruned"] = train.evaluate(base_model, spec, val, mean_mse).summary()
        histories["unpruned"] = base_history
        console.print(
            f"baseline: validation MSE {results['unpruned']['val_mse']:.4f}, "
            f"{results['unpruned']['mse_vs_mean']:.3f} x predicting the mean"
        )
        for name, changes in VARIANTS.items():
            if changes is None or (only and name not in only):
                continue
            settings = _settings(changes)
            openpi_prune.enable(settings)
            model = train.load(spec, base_params)  # fresh pruner parameters, the baseline's rest
            schedule = dataclasses.replace(plan.finetune, keep_ramp=0.0) if name in AT_ONCE else plan.finetune
            histories[name] = train.train(model, spec, schedule, progress, name, _check(plan, val, mean_mse, name))
            # Kept as OpenPI keeps params, so that a later run can evaluate it again.
            train.save_params(train.params_of(model), out_dir / "finetuned" / slug(name) / "params")
            evaluation = train.evaluate(model, spec, val, mean_mse)
            # Only against the reference of this run: without it the cell stays empty, never filled
            # from the un-fine-tuned checkpoint.
            reference = results.get("unpruned, fine-tuned")
            row = evaluation.summary() | {
                "mse_vs_unpruned": None if reference is None else evaluation.mse / reference["val_mse"]
            }
            if changes["method"] == "keep_all":
                results[name] = row
                openpi_prune.disable()
                _write(out_dir, plan, results, histories, started)
                continue
            kept_masks[name] = evaluation.kept_mask
            for stress, apply in STRESSES.items():
                stressed = nnx.clone(model)
                apply(stressed)
                row[f"kept_{stress.replace(' ', '_')}"] = float(
                    train.evaluate(stressed, spec, val, mean_mse).kept_per_camera.mean()
                )
            results[name] = row
            openpi_prune.disable()
            _write(out_dir, plan, results, histories, started)  # a long run leaves what it has so far
    report = _write(out_dir, plan, results, histories, started)
    _print(results, spec)
    from openpi_prune.tools.lab import pictures

    pictures.kept_patches(val, kept_masks, spec, out_dir / "kept_patches.png")
    pictures.training(histories, out_dir / "training.png")
    console.print(f"wrote {out_dir}/results.md, results.json, kept_patches.png, training.png")
    return report


def write_comparison(
    out_dir: pathlib.Path,
    report: dict,
    preamble: list[str],
    headers,
    cells,
    title: str,
    stem: str = "steps",
    label=lambda key: f"{key} steps",
) -> None:
    """A comparison of suites that differ in one thing (the fine-tuning length; `stem="seeds"`: the
    fine-tunes' seed): `<stem>.json` (the report), `<stem>.md` (the commit and folders it summarises,
    each with the `label` of its `report["folders"]` key, the preamble's lines, then a table with a row of
    `cells(row)` per row of the report) and the same table printed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1))
    source = ", ".join(f"`{folder}` ({label(key)})" for key, folder in report["folders"].items())
    lines = [f"Summarised by `{report['summarised_by']}` from {source}. " + preamble[0], *preamble[1:]]
    lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cells(row)) + " |" for row in report["rows"]]
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    table = Table(*headers, title=title)
    for row in report["rows"]:
        table.add_row(*cells(row))
    console.print(table)


def slug(name: str) -> str:
    """A variant's name as a file or folder name."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _write(out_dir: pathlib.Path, plan: LabPlan, results: dict, histories: dict, started: float) -> dict:
    report = {
        "plan": dataclasses.asdict(plan),
        "results": results,
        "histories": histories,
        "minutes": (time.time() - started) / 60,
    }
    (out_dir / "results.json").write_text(json.dumps(report, indent=1))
    (out_dir / "results.md").write_text(markdown_table(results, plan.spec))
    return report


COLUMNS = {
    "mse_vs_mean": "MSE / predict-mean",
    "mse_vs_unpruned": "MSE / unpruned fine-tuned in this run",
    "kept_mean": "kept per live camera (mean)",
    "kept_min": "min",
    "kept_max": "max",
    "kept_fraction": "kept share",
    "target_recall": "target recall",
    "query_spread": "query spread",
    "kept_shared_direction": "kept, shared direction",
    "kept_outlier_dimensions": "kept, outlier dims",
}


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.3g}"


def markdown_table(results: dict, spec: scenes.SceneSpec) -> str:
    head = f"| variant ({spec.grid**2} patches per camera) | " + " | ".join(COLUMNS.values()) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(_cell(row.get(k)) for k in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def _print(results: dict, spec: scenes.SceneSpec) -> None:
    table = Table("variant", *COLUMNS.values(), title=f"lab: {spec.grid**2} patches per camera, 2 live cameras")
    for name, row in results.items():
        table.add_row(name, *(_cell(row.get(k)) for k in COLUMNS))
    console.print(table)
