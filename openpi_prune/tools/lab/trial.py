"""`openpi-prune trial`: pruned against unpruned as a sceptic would have it compared.

1. One unpruned pi0.5 trained on the train split (kept as `baseline/params.npz`, the parameters
   it trains: a later run, or a later session, resumes from it; trials that differ only in their
   fine-tuning share it through `--baseline-dir`).
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
import json
import pathlib
import time

import numpy as np
from rich.progress import Progress

import openpi_prune
from openpi_prune.adapter import checkpoints
from openpi_prune.tools.lab import checkpoint, named, scenes, train, trial_report
from openpi_prune.tools.lab.run import baseline_folder, console, prepare, progress_bars, slug
from openpi_prune.tools.lab.trial_plan import (
    EXAMPLES,
    FAMILIES,
    QUICK,
    SWAP_SEED,
    VARIANTS,
    TrialPlan,
    check_same,
    fingerprint,
    settings_for,
)
from openpi_prune.tools.lab.trial_report import print_report, summarise


def baseline(plan: TrialPlan, folder: pathlib.Path, progress: Progress, code: str, print_: str) -> dict:
    """The unpruned baseline in `folder`, trained there first if it is not; `print_` is its own
    fingerprint (the plan without the fine-tuning)."""
    path = folder / "params.npz"
    if path.exists():
        check_same(path, json.loads((folder / "history.json").read_text()).get("fingerprint"), print_)
        console.print(f"reusing the baseline in {path}")
        return checkpoint.load_trained(path, plan.spec)
    openpi_prune.disable()
    model = train.create(plan.spec)
    val = train.validation(plan.spec, min(plan.validation, 64))
    mean_mse = train.mean_action_mse(plan.spec, val)

    def check(m) -> dict:
        ratio = train.evaluate(m, plan.spec, val, mean_mse).mse_ratio
        console.print(f"baseline: validation MSE / predict-the-mean {ratio:.4f}")  # a log shows the curve
        return {"val_mse_vs_mean": ratio}

    # Saved as it goes, under its fingerprint: a later run resumes only a state made for this plan.
    resume = folder / f"training-state-{print_}.npz"
    history = train.train(model, plan.spec, plan.baseline, progress, "baseline (unpruned)", check, resume=resume)
    checkpoint.save_trained(model, path, checkpoint.frozen(plan.spec))
    resume.unlink()
    (folder / "history.json").write_text(
        json.dumps(
            {"commit": code, "fingerprint": print_, "schedule": dataclasses.asdict(plan.baseline), "history": history}
        )
    )
    return checkpoint.load_trained(path, plan.spec)


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
        kept, target = as_they_are(report), test.target_mask
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


def as_they_are(report: dict) -> np.ndarray:
    """The patches a report kept as they are: a merged slot holds a region's mean, not its patch."""
    kept = report["kept_mask"]
    return kept & ~report["merged_mask"] if "merged_mask" in report else kept


def prompt_swap(model, plan: TrialPlan, test: scenes.Batch, kept: np.ndarray) -> dict:
    """The share of distractor patches kept, and after naming two other objects of the same images,
    the share of the newly named patches kept, and the swapped prompt's MSE."""
    distractors = test.distractor_mask
    swapped = named.rename(test, plan.spec, SWAP_SEED)
    actions, report = train.sample(model, swapped, noise_seed=train.TEST_SEED)
    newly = swapped.target_mask & ~test.target_mask
    return {
        "distractors_kept": _round((kept & distractors).sum(-1) / np.maximum(distractors.sum(-1), 1)),
        "swap_coverage": _round((as_they_are(report) & newly).sum(-1) / np.maximum(newly.sum(-1), 1)),
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


def saliency_agreement(model, val: scenes.Batch, chunk: int = 64, draws: int = 1) -> np.ndarray:
    """How far the head reproduces what it learns from, per scene: the share of the patches it keeps
    (the compact path, as served; a merged region's mean is not one) that are also among the model's
    own most salient ones, as many (the saliency of the unpruned loss, as a training step computes it,
    without image augmentation, averaged over `draws` noise draws: one draw is what one training step
    sees, more are what the head learns in expectation)."""
    import jax
    from flax import nnx

    from openpi_prune.adapter import prefix

    report = train.sample(model, val, num_steps=1)[1]
    kept = report["kept_mask"] & ~report.get("merged_mask", np.zeros_like(report["kept_mask"]))
    graphdef, state = nnx.split(model)

    @jax.jit
    def saliency_of(state, observation, actions, key):
        m = nnx.merge(graphdef, state)
        return prefix.saliency(lambda: m.compute_loss(key, observation, actions, train=False))

    parts = []
    for start in range(0, len(val.actions), chunk):
        observation = jax.tree.map(lambda x, s=start: x[s : s + chunk], val.observation())
        actions = val.actions[start : start + chunk]
        draw = [np.asarray(saliency_of(state, observation, actions, jax.random.key(d))) for d in range(draws)]
        parts.append(np.mean(draw, axis=0))
    saliency = np.concatenate(parts)
    counts = kept.sum(axis=1)
    ranks = np.argsort(np.argsort(-saliency, axis=1), axis=1)  # 0: the most salient patch
    top = ranks < counts[:, None]
    return (top & kept).sum(axis=1) / np.maximum(counts, 1)


def run_one(
    plan: TrialPlan, seed: int, name: str, base_params: dict, val, test, progress, code: str, resume: pathlib.Path
) -> dict:
    """Fine-tune one variant from the baseline and measure it. Its training state is saved to `resume`
    as it goes, so that a run cut short (a session's end) goes on from its last save."""
    settings = settings_for(VARIANTS[name])
    openpi_prune.enable(settings)
    try:
        config = train.model_config(plan.spec)
        fresh = checkpoints.fresh_parameters(config, seed=seed)  # the pruner's own, drawn per seed
        model = train.load(plan.spec, {**base_params, **fresh})
        started, resumed = time.time(), resume.exists()
        history = train.train(
            model, plan.spec, plan.finetune_for(seed), progress, f"seed {seed}: {name}", resume=resume
        )
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
        if settings.method == "relevance":
            result["saliency_agreement"] = float(np.mean(saliency_agreement(model, val)))
    finally:
        openpi_prune.disable()
    return {
        "variant": name,
        "seed": seed,
        "commit": code,
        "settings": dataclasses.asdict(settings),
        "finetune": dataclasses.asdict(plan.finetune_for(seed)),
        "finetune_minutes": minutes,  # of the last piece, when it was resumed
        "finetune_resumed": resumed,
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
    baseline_dir: str | None = None,
    compare_steps: list[str] | None = None,
) -> dict:
    if compare_steps:
        return trial_report.compare_steps([pathlib.Path(f) for f in compare_steps], pathlib.Path(out))
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
    code = checkpoint.commit()  # the code this process runs, whatever is committed while it does
    print_ = fingerprint(plan, val, test, baseline_layouts)
    if not report_only:
        with progress_bars() as progress:
            folder = baseline_folder(out_dir, baseline_dir)
            base_params = baseline(plan, folder, progress, code, fingerprint(plan, val, test, baseline_layouts, True))
            for seed in plan.seeds:
                for name in VARIANTS:
                    path = out_dir / "runs" / f"seed-{seed}" / f"{slug(name)}.json"
                    if (only and name not in only) or path.exists():
                        continue
                    # The state is named by the plan's fingerprint: a later run resumes only its own.
                    state = path.with_name(f"{slug(name)}.training-state-{print_}.npz")
                    row = run_one(plan, seed, name, base_params, val, test, progress, code, state)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(row | {"fingerprint": print_}))
                    state.unlink(missing_ok=True)
                    console.print(f"seed {seed}, {name}: test MSE {np.mean(row['test_mse']):.5f} -> {path}")
    report = summarise(out_dir, plan, val, test, splits, print_)
    print_report(report)
    return report
