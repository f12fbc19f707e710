"""`openpi-prune trial`: pruned against unpruned as a sceptic would have it compared.

1. One unpruned pi0.5 trained on the train split (kept as `baseline/params.npz`, the parameters
   it trains: a later run, or a later session, resumes from it).
2. For every seed (fine-tuning batches, flow-matching noise, fresh pruner parameters) and every
   variant: fine-tune from that checkpoint alike, the unpruned reference included, then evaluate in
   compact mode (the shipped path) on the validation split (what choices are made on) and on the test
   split (what is reported, several noise draws), whose layouts no training step drew (checked).
   Each (seed, variant) is written to `runs/seed-<k>/<variant>.json` with the commit that made it;
   a run that finds it there skips it, so the trial goes on in pieces.
3. `results.md`, `results.json`, `ratios.png` and `kept_patches.png`: each variant's test MSE as a
   ratio to the reference's, paired by seed, scene and noise draw, with a 95 % bootstrap interval
   over seeds and scenes; kept share, recall and precision of the named objects' patches.

Two scene families: `blocks` (`scenes`: three blocks, one named by its colour) and `named` (`named`:
seven objects, two named by colour and shape, more than the budget holds, with distractors that
share a named colour or shape). On `named` it also reports the share of distractor patches kept and
a prompt swap: the same images with two other objects named, and how much of the newly named
object's patches the kept set then covers.
"""

import dataclasses
import hashlib
import json
import pathlib
import subprocess
import time

import numpy as np
from flax import traverse_util
from rich.progress import Progress
from rich.table import Table

import openpi_prune
from openpi_prune.adapter import checkpoints
from openpi_prune.tools.lab import named, scenes, train
from openpi_prune.tools.lab.run import console, prepare, progress_bars, slug

REFERENCE = "reference (unpruned)"
# name -> settings changes (compact mode, the shipped default, unless a variant says otherwise).
VARIANTS = {
    REFERENCE: dict(method="keep_all", scoring="lightvla"),
    "default (relevance)": dict(method="relevance"),
    "distinct (prompt-blind)": dict(method="distinct"),
    "random share": dict(method="random"),
    "verbatim LightVLA": dict(method="language_only", scoring="lightvla"),
    # The kept count follows the scene (the head's softmax mass), at most 30 % of the live patches;
    # after fine-tuning, keep_mass is set on the validation split to keep the default's share.
    "adaptive budget (relevance)": dict(method="relevance", keep_mass=0.8, keep_fraction=0.3),
}
BOOTSTRAP = 2000
EXAMPLES = 4  # test scenes whose kept patches each run keeps, for the picture


@dataclasses.dataclass(frozen=True)
class TrialPlan:
    baseline: train.Schedule = train.Schedule(steps=2000, lr=1e-3, single_object=0.25)
    finetune: train.Schedule = train.Schedule(
        steps=600, lr=3e-4, batch_size=16, warmup=15, seed=100_000, keep_ramp=0.25
    )
    seeds: tuple[int, ...] = (0, 1, 2)
    validation: int = 256
    test: int = 1024
    noise_draws: int = 3
    spec: scenes.SceneSpec | named.NamedSpec = scenes.SceneSpec()

    def finetune_for(self, seed: int) -> train.Schedule:
        """Seed `seed`'s fine-tuning: its own batches (and, through them, its own noise)."""
        return dataclasses.replace(self.finetune, seed=self.finetune.seed + 10_000 * seed)


QUICK = TrialPlan(
    baseline=train.Schedule(steps=3, lr=1e-3, batch_size=4, single_object=0.34, warmup=1),
    finetune=train.Schedule(steps=2, lr=3e-4, batch_size=4, warmup=1, seed=100_000, keep_ramp=0.25),
    seeds=(0, 1),
    validation=8,
    test=12,
    noise_draws=2,
)
FAMILIES = {"blocks": scenes.SceneSpec(), "named": named.NamedSpec()}
SWAP_SEED = 3_000_000


def settings_for(changes: dict) -> openpi_prune.PruneSettings:
    # Telemetry is collected inside the jitted functions; no host callback needed.
    return openpi_prune.PruneSettings(telemetry=False, warn_below=0, **changes)


def commit() -> str:
    """The commit of the code that runs (with `+dirty` when it has uncommitted changes)."""
    root = pathlib.Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "openpi_prune"], cwd=root, capture_output=True, text=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


# --- the baseline checkpoint: only what training changes, so that it is small enough to keep -------


def save_trained(model, path: pathlib.Path, frozen: dict) -> None:
    """The parameters that differ from a fresh model's `frozen` ones (the prompt's embedding table
    stays as created), as one `.npz`."""
    flat = traverse_util.flatten_dict(train.params_of(model), sep="/")
    kept = {k: np.asarray(v) for k, v in flat.items() if k not in frozen}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **kept)


def load_trained(path: pathlib.Path, spec: scenes.SceneSpec) -> dict:
    """Full params: a fresh model's (seeded as the baseline was), the saved ones written over them."""
    with openpi_prune.disabled():
        params = traverse_util.flatten_dict(train.params_of(train.create(spec)), sep="/")
    with np.load(path) as saved:
        unknown = set(saved.files) - set(params)
        if unknown:
            raise SystemExit(f"{path} holds parameters this model lacks ({', '.join(sorted(unknown)[:3])}, ...)")
        params.update({k: saved[k] for k in saved.files})
    return traverse_util.unflatten_dict(params, sep="/")


def _frozen(spec: scenes.SceneSpec) -> set[str]:
    with openpi_prune.disabled():
        flat = traverse_util.flatten_dict(train.params_of(train.create(spec)), sep="/")
    return {k for k in flat if "input_embedding" in k}


def fingerprint(plan: TrialPlan, val: scenes.Batch, test: scenes.Batch, training: set) -> str:
    """A hash of what a run's figures rest on besides its code: the plan (but which seeds this piece
    runs), the held-out scenes and every training layout. A piece resumes only runs that share it."""
    digest = hashlib.blake2b(digest_size=12)
    digest.update(repr(dataclasses.replace(plan, seeds=())).encode())
    for batch in (val, test):
        digest.update(repr(batch.layouts).encode())
        for array in (batch.actions, batch.tokens, *batch.images.values()):
            digest.update(np.ascontiguousarray(array).tobytes())
    digest.update(repr(sorted(training)).encode())
    return digest.hexdigest()


def _check_same(path: pathlib.Path, found: str | None, expected: str) -> None:
    if found != expected:
        raise SystemExit(
            f"{path} was made for another plan or other scenes (fingerprint {found}, this run's {expected}): "
            "its figures cannot be paired with this run's. Choose another --out, or move it away."
        )


def baseline(plan: TrialPlan, out: pathlib.Path, progress: Progress, code: str, print_: str) -> dict:
    path = out / "baseline" / "params.npz"
    if path.exists():
        _check_same(path, json.loads((out / "baseline" / "history.json").read_text()).get("fingerprint"), print_)
        console.print(f"reusing the baseline in {path}")
        return load_trained(path, plan.spec)
    openpi_prune.disable()
    model = train.create(plan.spec)
    val = train.validation(plan.spec, min(plan.validation, 64))
    mean_mse = train.mean_action_mse(plan.spec, val)

    def check(m) -> dict:
        ratio = train.evaluate(m, plan.spec, val, mean_mse).mse_ratio
        console.print(f"baseline: validation MSE / predict-the-mean {ratio:.4f}")  # a log shows the curve
        return {"val_mse_vs_mean": ratio}

    history = train.train(model, plan.spec, plan.baseline, progress, "baseline (unpruned)", check)
    save_trained(model, path, _frozen(plan.spec))
    (out / "baseline" / "history.json").write_text(
        json.dumps(
            {"commit": code, "fingerprint": print_, "schedule": dataclasses.asdict(plan.baseline), "history": history}
        )
    )
    return load_trained(path, plan.spec)


# --- one (seed, variant) ---------------------------------------------------------------------------


def _per_scene(actions: np.ndarray, truth: np.ndarray) -> np.ndarray:
    return np.mean((actions - truth) ** 2, axis=(1, 2))


def _round(values: np.ndarray) -> list:
    return [float(f"{v:.5g}") for v in np.asarray(values, np.float64).ravel()]


def measure(model, plan: TrialPlan, val: scenes.Batch, test: scenes.Batch) -> dict:
    """Per-scene MSE on the validation split (one draw) and the test split (`noise_draws`), and, with
    pruning on, what was kept of the test scenes (first draw)."""
    result = {"validation_mse": _round(_per_scene(train.sample(model, val)[0], val.actions))}
    draws, report = [], {}
    for draw in range(plan.noise_draws):
        actions, drawn_report = train.sample(model, test, noise_seed=train.TEST_SEED + 7919 * draw)
        draws.append(_round(_per_scene(actions, test.actions)))
        report = report or drawn_report
    result["test_mse"] = draws
    if openpi_prune.is_enabled() and report:
        live = [i for i, camera in enumerate(test.images) if camera != scenes.MASKED_CAMERA]
        kept, target = report["kept_mask"], test.target_mask
        on_target = (kept & target).sum(-1)
        result |= {
            "kept_per_camera": report["kept_per_camera"][:, live].tolist(),
            "recall": _round(on_target / np.maximum(target.sum(-1), 1)),
            "precision": _round(on_target / np.maximum(kept.sum(-1), 1)),
            "kept_mask_examples": kept[:EXAMPLES].tolist(),  # drawn in kept_patches.png
        }
        if test.distractor_mask is not None:
            result |= prompt_swap(model, plan, test, kept)
    return result


def prompt_swap(model, plan: TrialPlan, test: scenes.Batch, kept: np.ndarray) -> dict:
    """The share of distractor patches kept, and after naming two other objects of the same images,
    the share of the newly named patches kept, and the swapped prompt's MSE."""
    distractors = test.distractor_mask
    swapped = named.rename(test, plan.spec, SWAP_SEED)
    actions, report = train.sample(model, swapped, noise_seed=train.TEST_SEED)
    newly = swapped.target_mask & ~test.target_mask
    return {
        "distractors_kept": _round((kept & distractors).sum(-1) / np.maximum(distractors.sum(-1), 1)),
        "swap_coverage": _round((report["kept_mask"] & newly).sum(-1) / np.maximum(newly.sum(-1), 1)),
        "swap_mse": _round(_per_scene(actions, swapped.actions)),
    }


def masked_against_compact(model, test: scenes.Batch, scenes_to_check: int = 64) -> float:
    """Largest difference between the actions of compact mode (in force) and masked mode, same
    weights and noise: they must agree on a trained checkpoint, not only on random weights."""
    subset = test.head(scenes_to_check)
    compact = train.sample(model, subset)[0]
    with openpi_prune.enabled(dataclasses.replace(openpi_prune.current_settings(), mode="masked")):
        masked = train.sample(model, subset)[0]
    return float(np.max(np.abs(compact - masked)))


def run_one(plan: TrialPlan, seed: int, name: str, base_params: dict, val, test, progress, code: str) -> dict:
    settings = settings_for(VARIANTS[name])
    openpi_prune.enable(settings)
    try:
        config = train.model_config(plan.spec)
        fresh = checkpoints.fresh_parameters(config, seed=seed)  # the pruner's own, drawn per seed
        model = train.load(plan.spec, {**base_params, **fresh})
        started = time.time()
        history = train.train(model, plan.spec, plan.finetune_for(seed), progress, f"seed {seed}: {name}")
        minutes = (time.time() - started) / 60
        calibration = {}
        if settings.keep_mass:
            settings = settings.replace(
                keep_mass=calibrate_mass(model, val, openpi_prune.PruneSettings().keep_fraction)
            )
            openpi_prune.enable(settings)
            calibration = {
                "keep_mass_trained": VARIANTS[name]["keep_mass"],
                "keep_mass_chosen_on_validation": settings.keep_mass,
            }
        result = measure(model, plan, val, test) | calibration
        if settings.method != "keep_all":
            result["masked_vs_compact_max_abs"] = masked_against_compact(model, test)
    finally:
        openpi_prune.disable()
    return {
        "variant": name,
        "seed": seed,
        "commit": code,
        "settings": dataclasses.asdict(settings),
        "finetune": dataclasses.asdict(plan.finetune_for(seed)),
        "finetune_minutes": minutes,
        # Every tenth step's loss: the curve, without thousands of numbers.
        "loss": [h["loss"] for h in history[:: max(len(history) // 10, 1)]],
    } | result


def calibrate_mass(model, val: scenes.Batch, share: float, steps: int = 12) -> float:
    """The `keep_mass` at which the model in force keeps `share` of the validation scenes' live
    patches on average (bisection: the kept count only grows with the mass)."""
    per_camera = val.target_mask.shape[1] // len(val.images)
    live_patches = per_camera * sum(int(mask.sum()) for mask in val.image_masks.values())
    settings = openpi_prune.current_settings()
    low, high = 0.0, 1.0
    for _ in range(steps):
        middle = (low + high) / 2
        with openpi_prune.enabled(settings.replace(keep_mass=middle)):
            kept = train.sample(model, val, num_steps=1)[1]["kept_mask"].sum()
        low, high = (middle, high) if kept / live_patches < share else (low, middle)
    return (low + high) / 2


# --- the whole trial -------------------------------------------------------------------------------


def check_splits(plan: TrialPlan, val: scenes.Batch, test: scenes.Batch, seen: set) -> dict:
    """How many validation and test layouts the trial's training runs (`seen`) drew: must be none."""
    check = {
        "training_layouts": len(seen),
        "test_layouts": len(set(test.layouts)),
        "validation_layouts": len(set(val.layouts)),
        "test_layouts_in_training": len(set(test.layouts) & seen),
        "validation_layouts_in_training": len(set(val.layouts) & seen),
        "test_layouts_in_validation": len(set(test.layouts) & set(val.layouts)),
    }
    if check["test_layouts_in_training"] or check["validation_layouts_in_training"]:
        raise RuntimeError(f"held-out layouts occur in training: {check}")
    return check


def run(
    out: str = "trial-results",
    family: str = "blocks",
    quick: bool = False,
    seeds: list[int] | None = None,
    only: list[str] | None = None,
    report_only: bool = False,
    finetune_steps: int | None = None,
    baseline_steps: int | None = None,
) -> dict:
    if family not in FAMILIES:
        raise SystemExit(f"unknown scene family {family!r}; known: {', '.join(FAMILIES)}")
    plan = dataclasses.replace(QUICK if quick else TrialPlan(), spec=FAMILIES[family])
    if seeds is not None:
        plan = dataclasses.replace(plan, seeds=tuple(seeds))
    # Another plan: its runs go to another --out (the fingerprint says so).
    if finetune_steps is not None:
        plan = dataclasses.replace(plan, finetune=dataclasses.replace(plan.finetune, steps=finetune_steps))
    if baseline_steps is not None:
        plan = dataclasses.replace(plan, baseline=dataclasses.replace(plan.baseline, steps=baseline_steps))
    out_dir = prepare(out, only, VARIANTS)
    val = train.validation(plan.spec, plan.validation)
    test = train.test(plan.spec, plan.test)
    baseline_layouts = train.training_layouts(plan.baseline, plan.spec)
    seen = set(baseline_layouts)
    # Every seed of this piece and of the pieces before it (their runs are summarised with it).
    earlier = {int(folder.name.removeprefix("seed-")) for folder in out_dir.glob("runs/seed-*")}
    for seed in sorted(set(plan.seeds) | earlier):
        seen |= train.training_layouts(plan.finetune_for(seed), plan.spec)
    splits = check_splits(plan, val, test, seen)
    code = commit()  # the code this process runs, whatever is committed while it does
    print_ = fingerprint(plan, val, test, baseline_layouts)
    if not report_only:
        with progress_bars() as progress:
            base_params = baseline(plan, out_dir, progress, code, print_)
            for seed in plan.seeds:
                for name in VARIANTS:
                    path = out_dir / "runs" / f"seed-{seed}" / f"{slug(name)}.json"
                    if (only and name not in only) or path.exists():
                        continue
                    row = run_one(plan, seed, name, base_params, val, test, progress, code) | {"fingerprint": print_}
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(row))
                    console.print(f"seed {seed}, {name}: test MSE {np.mean(row['test_mse']):.5f} -> {path}")
    report = summarise(out_dir, plan, val, test, splits, print_)
    _print(report)
    return report


def load_runs(out_dir: pathlib.Path, print_: str) -> dict[str, dict[int, dict]]:
    runs: dict[str, dict[int, dict]] = {}
    for path in sorted(out_dir.glob("runs/seed-*/*.json")):
        row = json.loads(path.read_text())
        _check_same(path, row.get("fingerprint"), print_)
        runs.setdefault(row["variant"], {})[row["seed"]] = row
    return runs


def paired_ratio(
    variant: dict[int, np.ndarray], reference: dict[int, np.ndarray], rng: np.random.Generator
) -> dict | None:
    """Mean MSE of `variant` over that of `reference` on the same seeds, scenes and noise draws, with
    a 95 % interval: bootstrap over seeds, then over scenes within each drawn seed, paired."""
    seeds = sorted(set(variant) & set(reference))
    if not seeds:
        return None
    # [seeds, scenes]: each scene's MSE averaged over the noise draws.
    v = np.stack([np.mean(variant[s], axis=0) for s in seeds])
    r = np.stack([np.mean(reference[s], axis=0) for s in seeds])
    ratios = np.empty(BOOTSTRAP)
    n_seeds, n_scenes = v.shape
    for i in range(BOOTSTRAP):
        picked_seeds = rng.integers(0, n_seeds, n_seeds)
        picked_scenes = rng.integers(0, n_scenes, (n_seeds, n_scenes))
        ratios[i] = v[picked_seeds[:, None], picked_scenes].sum() / r[picked_seeds[:, None], picked_scenes].sum()
    low, high = np.percentile(ratios, [2.5, 97.5])
    return {"ratio": float(v.sum() / r.sum()), "low": float(low), "high": float(high), "seeds": seeds}


def summarise(out_dir: pathlib.Path, plan: TrialPlan, val, test, splits: dict, print_: str) -> dict:
    runs = load_runs(out_dir, print_)
    mean_action = train.mean_action(plan.spec)
    mean_test = float(np.mean((test.actions - mean_action) ** 2))
    mean_val = float(np.mean((val.actions - mean_action) ** 2))
    reference = runs.get(REFERENCE, {})
    rng = np.random.default_rng(0)
    rows = {}
    for name in VARIANTS:
        if name not in runs:
            continue
        by_seed = runs[name]
        row = {
            "seeds": sorted(by_seed),
            "test_mse_vs_mean": float(np.mean([np.mean(r["test_mse"]) for r in by_seed.values()]) / mean_test),
            "validation_mse_vs_mean": float(
                np.mean([np.mean(r["validation_mse"]) for r in by_seed.values()]) / mean_val
            ),
            "commits": sorted({r["commit"] for r in by_seed.values()}),
        }
        if name != REFERENCE:
            test_pair = paired_ratio(
                {s: np.asarray(r["test_mse"]) for s, r in by_seed.items()},
                {s: np.asarray(r["test_mse"]) for s, r in reference.items()},
                rng,
            )
            val_pair = paired_ratio(
                {s: np.asarray(r["validation_mse"])[None] for s, r in by_seed.items()},
                {s: np.asarray(r["validation_mse"])[None] for s, r in reference.items()},
                rng,
            )
            # No reference run for these seeds: said, never replaced by another figure.
            row["test_ratio"] = test_pair or "no reference run for these seeds"
            row["validation_ratio"] = val_pair or "no reference run for these seeds"
            kept = np.concatenate([np.asarray(r["kept_per_camera"]) for r in by_seed.values()])
            row |= {
                "kept_per_camera": float(kept.mean()),
                "kept_share": float(kept.mean() / plan.spec.grid**2),
                "recall": float(np.mean([np.mean(r["recall"]) for r in by_seed.values()])),
                "precision": float(np.mean([np.mean(r["precision"]) for r in by_seed.values()])),
                "masked_vs_compact_max_abs": max(r["masked_vs_compact_max_abs"] for r in by_seed.values()),
            }
            for key in ("distractors_kept", "swap_coverage"):
                if all(key in r for r in by_seed.values()):
                    row[key] = float(np.mean([np.mean(r[key]) for r in by_seed.values()]))
        rows[name] = row
    report = {
        "plan": dataclasses.asdict(plan),
        "splits": splits,
        "bootstrap": BOOTSTRAP,
        "summarised_by": commit(),
        "fingerprint": print_,
        "variants": rows,
    }
    (out_dir / "results.json").write_text(json.dumps(report, indent=1))
    (out_dir / "results.md").write_text(markdown(report))
    from openpi_prune.tools.lab import pictures

    if any(isinstance(r.get("test_ratio"), dict) for r in rows.values()):
        pictures.ratios(rows, out_dir / "ratios.png")
    # The lowest seed's kept patches of the first test scenes, per variant that recorded them.
    examples = {
        name: np.asarray(by_seed[min(by_seed)]["kept_mask_examples"])
        for name, by_seed in runs.items()
        if name != REFERENCE and "kept_mask_examples" in by_seed[min(by_seed)]
    }
    if examples:
        shown = test.head(EXAMPLES)
        captions = [named.caption(shown, i) for i in range(EXAMPLES)] if shown.named else None
        pictures.kept_patches(
            shown, examples, plan.spec, out_dir / "kept_patches.png", scenes_shown=2, captions=captions
        )
    return report


def _ratio_cell(pair) -> str:
    if not isinstance(pair, dict):
        return "no reference"
    return f"{pair['ratio']:.3f} [{pair['low']:.3f}, {pair['high']:.3f}]"


def _cells(name: str, row: dict) -> list[str]:
    def fmt(key, spec="{:.3g}"):
        return spec.format(row[key]) if key in row else "-"

    return [
        name,
        ", ".join(map(str, row["seeds"])),
        _ratio_cell(row.get("test_ratio")) if name != REFERENCE else "1",
        _ratio_cell(row.get("validation_ratio")) if name != REFERENCE else "1",
        fmt("test_mse_vs_mean", "{:.4f}"),
        fmt("kept_per_camera", "{:.1f}"),
        fmt("kept_share", "{:.0%}"),
        fmt("recall", "{:.0%}"),
        fmt("precision", "{:.0%}"),
        fmt("distractors_kept", "{:.0%}"),
        fmt("swap_coverage", "{:.0%}"),
        fmt("masked_vs_compact_max_abs", "{:.1e}"),
    ]


HEADERS = [
    "variant",
    "seeds",
    "test MSE / reference [95 %]",
    "validation MSE / reference [95 %]",
    "test MSE / predict-mean",
    "kept per live camera",
    "kept share",
    "recall",
    "precision",
    "distractors kept",
    "prompt swap: new object kept",
    "masked vs compact",
]


def markdown(report: dict) -> str:
    plan, splits = report["plan"], report["splits"]
    lines = [
        f"Summarised by `{report['summarised_by']}`; runs by {sorted({c for r in report['variants'].values() for c in r['commits']})}.",
        f"Test split: {plan['test']} scenes x {plan['noise_draws']} noise draws, {splits['test_layouts']} layouts, "
        f"{splits['test_layouts_in_training']} of them in training ({splits['training_layouts']} layouts drawn "
        f"there); validation: {plan['validation']} scenes, {splits['validation_layouts_in_training']} in training. "
        f"Intervals: bootstrap over seeds and scenes, {report['bootstrap']} resamples, paired with the reference.",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "---|" * len(HEADERS),
    ]
    lines += ["| " + " | ".join(_cells(name, row)) + " |" for name, row in report["variants"].items()]
    return "\n".join(lines) + "\n"


def _print(report: dict) -> None:
    table = Table(*HEADERS, title="trial: paired with the unpruned reference, test split")
    for name, row in report["variants"].items():
        table.add_row(*_cells(name, row))
    console.print(table)
