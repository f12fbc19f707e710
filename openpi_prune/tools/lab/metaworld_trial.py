"""`openpi-prune metaworld`: closed-loop success on Meta-World, pruned against unpruned.

1. Expert episodes on the train reset seeds, cached (`metaworld.episode_cache`, or `episodes_dir`).
2. An unpruned pi0.5 trained on them, multi-task (the prompt picks the task), with OpenPI's
   `compute_loss` (`baseline/params.npz`, what it trains, small enough to commit).
3. Each variant fine-tuned alike from it (the unpruned reference, the default, verbatim LightVLA,
   a prompt-blind baseline), then run in closed loop on held-out reset seeds through OpenPI's
   `WebsocketPolicyServer` and `openpi-client`; the unpruned checkpoint also with blanked images,
   to show the policy needs them. One file per variant under `closed-loop/`, so a later run resumes.
4. `results.md`, `results.json`, `success.png`: success per task and variant with Wilson 95 %
   intervals, time per policy call, kept tokens per camera.
"""

import dataclasses
import json
import math
import pathlib
import time

import numpy as np
from rich.table import Table

import openpi_prune
from openpi_prune.adapter import prefix
from openpi_prune.tools.lab import checkpoint, metaworld, train, trial, trial_plan
from openpi_prune.tools.lab.run import baseline_folder, console, prepare, progress_bars, slug, write_comparison

# name -> settings changes, None: the baseline as trained (no fine-tuning, no pruning).
VARIANTS = {
    "unpruned checkpoint": None,
    "unpruned checkpoint, images blanked": None,
    trial_plan.REFERENCE: dict(method="keep_all", scoring="lightvla"),
    trial_plan.DEFAULT: dict(method="relevance"),
    # The default's head before its hidden layer: the control of the one now.
    "relevance, the bilinear head (relevance_hidden=0)": dict(method="relevance", **trial_plan.BILINEAR),
    # The widest share the goal allows (10-30 %): does more of the scene close the gap at 20 %?
    "relevance, 30 % kept": dict(method="relevance", **trial_plan.BILINEAR, keep_fraction=0.3),
    # As many tokens as the default (26 of the 128 live), 8 of them the means of the unkept patches of
    # each quarter of an image: better than the default at the same count on the blocks trial.
    "relevance, 14 % kept, merged by quarter (the default's count)": dict(
        method="relevance", keep_fraction=0.14, merge_unkept=4, **trial_plan.BILINEAR
    ),
    # As many tokens as the 30 % share (39 of 128), 8 of them quarter means: does merging add to a wider share?
    "relevance, 24 % kept, merged by quarter (the 30 % share's count)": dict(
        method="relevance", keep_fraction=0.24, merge_unkept=4, **trial_plan.BILINEAR
    ),
    # The same count spent mostly on a coarse view: 7 patches, and the means of the unkept ones of each
    # 2 x 2 block of patches (16 a camera). Is it the outline of the whole scene that the merge adds?
    "relevance, 5 % kept, merged by 2 x 2 patches (the 30 % share's count)": dict(
        method="relevance", keep_fraction=0.05, merge_unkept=16, **trial_plan.BILINEAR
    ),
    # SigLIP on each camera's kept patches alone (a share per camera): cheaper, and on the blocks trial
    # more accurate than pruning after it.
    "relevance, pruned before SigLIP (siglip_layer=0)": dict(method="relevance", siglip_layer=0, **trial_plan.BILINEAR),
    # The head follows the model's saliency loosely (its picks are about 60 % of the saliency's top);
    # the saliency of a quarter of each batch on every step gives it four times the updates of the
    # default's (every 4th step) at a lower cost.
    "relevance, saliency of a quarter of each batch": dict(
        method="relevance", saliency_every=1, saliency_share=0.25, **trial_plan.BILINEAR
    ),
    # The head's form: a hidden layer of 256 on each patch (beside its scene's mean patch) before the
    # bilinear score. More updates did not bring the bilinear head closer to the saliency (above); a
    # head that can weigh a patch's features together might.
    "relevance, a hidden layer of 256 in the head": dict(method="relevance", relevance_hidden=256),
    # The one change to the head that moved the closed loop was its form (bilinear -> hidden layer):
    # four times the width, to see whether that lever has more in it.
    "relevance, a hidden layer of 1024 in the head": dict(method="relevance", relevance_hidden=1024),
    # The hidden head with more of the scene: the widest share the goal allows, and the same count of
    # tokens with 8 of them quarter means, the two wider shares that came closest with the bilinear head.
    "relevance, a hidden layer of 256, 30 % kept": dict(method="relevance", relevance_hidden=256, keep_fraction=0.3),
    "relevance, a hidden layer of 256, 24 % kept, merged by quarter": dict(
        method="relevance", relevance_hidden=256, keep_fraction=0.24, merge_unkept=4
    ),
    # Each camera its own 20 % (13 patches each) instead of 20 % of both together: the default gives
    # the corner camera, which shows where the window is, 9 of its 64. Pruned after the lab SigLIP's
    # only layer, which is pruning after SigLIP, a share per camera.
    "relevance, each camera its own 20 % (siglip_layer=1, after the lab SigLIP's only layer)": dict(
        method="relevance", siglip_layer=1
    ),
    # The head learns from |gradient . (patch - the batch's mean patch)| instead of the gradient's norm:
    # the default's corner-camera picks at window-open's first call include floor and table, alike in
    # every scene, where the window and its handle move.
    "relevance, saliency of each patch's change from the batch mean (saliency=deviation)": dict(
        method="relevance", saliency="deviation"
    ),
    "verbatim LightVLA": dict(method="language_only", scoring="lightvla"),
    "distinct (prompt-blind)": dict(method="distinct"),
}
BLANKED = "unpruned checkpoint, images blanked"
# From this commit on, a reset seed fixes its scene in every process (MT1 is seeded when made): two runs
# of it or later meet the same 250 scenes, so that their episodes pair; earlier runs drew their own.
SEEDED_SINCE = "16152f4"
# Noise draws the saliency is averaged over where `--action-mse` compares each head with it.
SALIENCY_DRAWS = 4


@dataclasses.dataclass(frozen=True)
class SuitePlan:
    spec: metaworld.MetaWorldSpec = metaworld.MetaWorldSpec()
    baseline: train.Schedule = train.Schedule(steps=6000, lr=1e-3, batch_size=32, warmup=100)
    finetune: train.Schedule = train.Schedule(
        steps=1000, lr=3e-4, batch_size=16, warmup=15, seed=100_000, keep_ramp=0.25
    )
    episodes: int = 50  # held-out reset seeds per task
    # The unpruned weights each variant is fine-tuned from (`finetuned/*.npz` of another run, its
    # reference's): LightVLA's recipe, pruning a policy already fine-tuned. None: the trained policy.
    finetune_from: str | None = None
    # Unpruned weights (`finetuned/*.npz` of another run) whose sampled actions, from the noise each
    # fine-tuning step draws, replace the expert's as targets (`train.teacher_targets`). None: the expert's.
    teacher: str | None = None


def quick_plan(out: pathlib.Path) -> SuitePlan:
    return SuitePlan(
        spec=metaworld.MetaWorldSpec(
            episodes_dir=str(out / "episodes"),
            tasks=("button-press-topdown-v3",),
            train_seeds=2,
            max_steps=10,
            expert_steps=150,
        ),
        baseline=train.Schedule(steps=2, lr=1e-3, batch_size=4, warmup=1),
        finetune=train.Schedule(steps=2, lr=3e-4, batch_size=4, warmup=1, seed=100_000, keep_ramp=0.25),
        episodes=1,
    )


def wilson(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson's 95 % interval of a success rate."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def evaluate(
    model, plan: SuitePlan, name: str, progress, out_dir: pathlib.Path, weights: str, blank: bool = False
) -> dict:
    """Closed-loop episodes of every task on the held-out reset seeds, through OpenPI's server. Each
    episode is noted as it ends (`closed-loop/<variant>.partial.jsonl`) with the digest of the
    `weights` that ran it, so an interrupted run goes on from the next one, on the same weights. The
    first task's first episode is recorded: `animations/<variant>.gif`, and its first call
    (`animations/<variant>-first-call.npz`) for `first-calls.png`; each task's first episode that
    this process ran, a few of its calls, in `animations/<variant>-by-task.png`."""
    spec = plan.spec
    partial = out_dir / "closed-loop" / f"{slug(name)}.partial.jsonl"
    partial.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if partial.exists():
        done = {(e["task"], e["seed"]): e for e in map(json.loads, partial.read_text().splitlines())}
    # Episodes noted before the digest was recorded carry none.
    others = {e["weights"] for e in done.values() if e.get("weights")} - {weights}
    if others:
        raise SystemExit(
            f"{partial} holds episodes run by other weights ({', '.join(sorted(others))}) than {name}'s now "
            f"({weights}): its checkpoint was made again or changed. Move that file away to run this variant's "
            "episodes anew."
        )
    bar = progress.add_task(f"{name}: closed loop", total=len(spec.tasks) * plan.episodes)
    episodes, first_episodes = [], {}
    with metaworld.serve(metaworld.make_policy(model, spec)) as client:
        for task in spec.tasks:
            for k in range(plan.episodes):
                seed = metaworld.TEST_SEEDS + k
                if (task, seed) not in done:
                    result = metaworld.closed_loop(client, task, seed, spec, blank=blank, record=k == 0)
                    calls = result.pop("frames")
                    if k == 0:
                        first_episodes[task] = (seed, result["success"], calls)
                    if k == 0 and task == spec.tasks[0]:
                        _keep_recording(calls, out_dir / "animations", name, spec)
                    done[task, seed] = {"task": task, "seed": seed, "weights": weights} | result
                    with partial.open("a") as file:
                        file.write(json.dumps(done[task, seed]) + "\n")
                episodes.append(done[task, seed])
                wins = [e["success"] for e in episodes]
                progress.update(bar, advance=1, description=f"{name}: {task} success {np.mean(wins):.0%}")
    if first_episodes:
        from openpi_prune.tools.lab import pictures

        sheet = out_dir / "animations" / f"{slug(name)}-by-task.png"
        pictures.calls_by_task(first_episodes, spec.grid, sheet, name)
    return {"episodes": episodes}


def _keep_recording(calls: list, folder: pathlib.Path, name: str, spec) -> None:
    from openpi_prune.tools.lab import pictures

    folder.mkdir(parents=True, exist_ok=True)
    pictures.episode_animation(calls, spec.grid, folder / f"{slug(name)}.gif", name)
    images, kept, merged = calls[0]
    slots = {} if kept is None else {"kept_patches": kept, "merged_patches": merged}
    np.savez_compressed(folder / f"{slug(name)}-first-call.npz", **images, **slots)


def run(
    out: str = "metaworld-results",
    quick: bool = False,
    only: list[str] | None = None,
    episodes: int | None = None,
    baseline_steps: int | None = None,
    episodes_dir: str | None = None,
    finetune_steps: int | None = None,
    baseline_dir: str | None = None,
    finetune_seed: int | None = None,
    finetune_from: str | None = None,
    reference_dir: str | None = None,
    train_scenes: int | None = None,
    teacher: str | None = None,
    siglip_depth: int | None = None,
) -> dict:
    out_dir = prepare(out, only, VARIANTS)
    plan = _plan(out_dir, quick, episodes_dir, siglip_depth)
    if episodes is not None:
        plan = dataclasses.replace(plan, episodes=episodes)
    if baseline_steps is not None:
        plan = dataclasses.replace(plan, baseline=dataclasses.replace(plan.baseline, steps=baseline_steps))
    if finetune_steps is not None:  # another plan: its runs go to another --out
        plan = dataclasses.replace(plan, finetune=dataclasses.replace(plan.finetune, steps=finetune_steps))
    if finetune_seed is not None:  # as with the steps
        plan = dataclasses.replace(plan, finetune=dataclasses.replace(plan.finetune, seed=finetune_seed))
    if train_scenes is not None:  # as with the steps
        if train_scenes < 1:
            raise metaworld.SuiteError(
                f"--train-scenes must be at least 1 (expert episodes per task); got {train_scenes}"
            )
        plan = dataclasses.replace(plan, spec=dataclasses.replace(plan.spec, train_seeds=train_scenes))
    for flag, path in (("--finetune-from", finetune_from), ("--teacher", teacher)):
        if path is not None and not pathlib.Path(path).is_file():
            raise metaworld.SuiteError(
                f"{flag} {path}: no such file; name a fine-tuned unpruned variant's weights, "
                "e.g. OUT/finetuned/reference-unpruned.npz of a finished run"
            )
    if finetune_from is not None:  # as with the steps
        plan = dataclasses.replace(plan, finetune_from=str(finetune_from))
    if teacher is not None:  # as with the steps
        plan = dataclasses.replace(plan, teacher=str(teacher))
    _check_same_plan(out_dir, plan)
    metaworld.require_rendering()
    code = checkpoint.commit()
    base_path = baseline_folder(out_dir, baseline_dir) / "params.npz"
    with progress_bars() as progress:
        # Rendering them takes up to an hour on 2 cores: a run with only closed loops left goes without.
        if _left_to_train(out_dir, base_path, only):
            solved = metaworld.collect(plan.spec, progress)
            console.print(f"expert episodes solved, per task: {solved}")
        if not base_path.exists():
            openpi_prune.disable()
            model = train.create(plan.spec)
            # Hours on a small CPU: saved as it goes, so an interrupted run resumes from its last save.
            resume = base_path.with_name("training-state.npz")
            history = train.train(model, plan.spec, plan.baseline, progress, "baseline (unpruned)", resume=resume)
            checkpoint.save_trained(model, base_path, checkpoint.frozen(plan.spec))
            resume.unlink()
            base_path.with_name("history.json").write_text(
                json.dumps(
                    {
                        "commit": code,
                        "schedule": dataclasses.asdict(plan.baseline),
                        "siglip_depth": plan.spec.siglip_depth,
                        "loss": [h["loss"] for h in history],
                    }
                )
            )
        base_params = checkpoint.load_trained(base_path, plan.spec)
        start_params = (
            base_params
            if plan.finetune_from is None
            else _unpruned_weights(plan.finetune_from, plan.spec, "--finetune-from")
        )
        teacher = None
        if plan.teacher is not None:
            with openpi_prune.disabled():
                teacher = train.load(plan.spec, _unpruned_weights(plan.teacher, plan.spec, "--teacher"))
        for name, changes in VARIANTS.items():
            path = out_dir / "closed-loop" / f"{slug(name)}.json"
            if (only and name not in only) or path.exists():
                continue
            started = time.time()
            if changes is None:
                openpi_prune.disable()
                model = train.load(plan.spec, base_params)
                settings = None
            else:
                settings = trial_plan.settings_for(changes)
                openpi_prune.enable(settings)
                # What fine-tuning changed (2 MB), kept so that a resumed run, in a later session too,
                # serves the same weights without fine-tuning again.
                finetuned = out_dir / "finetuned" / f"{slug(name)}.npz"
                if finetuned.exists():
                    model = train.load(plan.spec, checkpoint.load_trained(finetuned, plan.spec, pruned=True))
                else:
                    model = train.load(plan.spec, start_params)
                    # Saved as it goes, so that a fine-tune longer than a session resumes; the
                    # validation action MSE every tenth of the steps is its learning curve.
                    state = finetuned.with_name(f"{slug(name)}.training-state.npz")
                    history = train.train(
                        model,
                        plan.spec,
                        plan.finetune,
                        progress,
                        f"fine-tune: {name}",
                        check=validation_check(plan.spec, progress),
                        resume=state,
                        teacher=teacher,
                    )
                    checkpoint.save_trained(model, finetuned, checkpoint.frozen(plan.spec))
                    finetuned.with_name(f"{slug(name)}.curve.json").write_text(json.dumps(learning_curve(history)))
                    state.unlink()
                # Served with telemetry on, so that each response carries what was kept.
                settings = settings.replace(telemetry=True)
                openpi_prune.enable(settings)
            weights = checkpoint.digest(train.params_of(model))
            # The closed loop needs no expert episodes (7.5 GB at 60 training scenes): let them go, so
            # that a second process can fine-tune beside it. A later fine-tune loads them again.
            metaworld.forget_episodes()
            try:
                row = evaluate(model, plan, name, progress, out_dir, weights, blank=name == BLANKED)
            finally:
                openpi_prune.disable()
            row |= {
                "variant": name,
                "commit": code,
                "baseline": checkpoint.digest(base_params),
                "finetuned_from": None if changes is None else checkpoint.digest(start_params),
                "weights": weights,
                "settings": None if settings is None else dataclasses.asdict(settings),
                "plan": dataclasses.asdict(plan),
                "minutes": (time.time() - started) / 60,
            }
            path.write_text(json.dumps(row))
            (out_dir / "closed-loop" / f"{slug(name)}.partial.jsonl").unlink()
    report = summarise(out_dir, plan, reference_dir)
    _print(report, plan)
    return report


def _unpruned_weights(path: str, spec: metaworld.MetaWorldSpec, flag: str) -> dict:
    """The unpruned weights at `path`, named by `flag`, refused where a pruner's own parameters are
    among them (a pruned variant's fine-tune is neither the policy LightVLA's recipe starts from nor
    an unpruned teacher)."""
    try:
        return checkpoint.load_trained(pathlib.Path(path), spec)
    except SystemExit as error:
        raise metaworld.SuiteError(
            f"{flag} {path}: {error}; name an unpruned variant's weights (finetuned/reference-unpruned.npz)"
        ) from None


def learning_curve(history: list[dict]) -> list[dict]:
    """A point per validation check: its figures, and each training metric averaged over the steps
    since the check before (one step's loss is noise). The pruner's own loss (`distill_loss`) is
    averaged over the steps whose saliency ran only: on the others (`saliency_every`) it is exactly 0,
    and a check that fell on one of them read 0 throughout."""
    curve, since = [], 0
    for k, step in enumerate(history):
        if "validation_action_mse" not in step:
            continue
        window = history[since : k + 1]
        point = {"step": k + 1, **step}
        for key in step.keys() - {"validation_action_mse"}:
            values = [h[key] for h in window if key in h and (key != "distill_loss" or h[key] != 0)]
            point[key] = float(np.mean(values)) if values else 0.0
        curve.append(point)
        since = k + 1
    return curve


def _left_to_train(out_dir: pathlib.Path, base_path: pathlib.Path, only: list[str] | None) -> bool:
    """Whether the policy or a variant still to run lacks its weights (the expert episodes are needed)."""
    if not base_path.exists():
        return True
    return any(
        changes is not None
        and not (only and name not in only)
        and not (out_dir / "closed-loop" / f"{slug(name)}.json").exists()
        and not (out_dir / "finetuned" / f"{slug(name)}.npz").exists()
        for name, changes in VARIANTS.items()
    )


def _plan(out_dir: pathlib.Path, quick: bool, episodes_dir: str | None, siglip_depth: int | None = None) -> SuitePlan:
    """The suite's plan, its expert episodes in `episodes_dir` or the user's cache (quick: in `out_dir`),
    its policy's SigLIP `siglip_depth` layers deep (None: mu/28's one)."""
    plan = quick_plan(out_dir) if quick else SuitePlan()
    if siglip_depth is not None:  # another policy: its own --baseline-dir and --out
        if siglip_depth < 1:
            raise metaworld.SuiteError(f"--siglip-depth must be at least 1 (SigLIP's layers); got {siglip_depth}")
        plan = dataclasses.replace(plan, spec=dataclasses.replace(plan.spec, siglip_depth=siglip_depth))
    folder = episodes_dir or (None if quick else metaworld.episode_cache(plan.spec))
    if folder is None:
        return plan
    return dataclasses.replace(plan, spec=dataclasses.replace(plan.spec, episodes_dir=str(folder)))


def _action_errors(model, batch, spec, noise_seed: int) -> np.ndarray:
    """Each step's sampled-action MSE against the expert's next actions."""
    predicted = train.sample(model, batch, noise_seed=noise_seed)[0][..., : spec.action_dim]
    return np.mean((predicted - batch.actions) ** 2, axis=(1, 2))


def validation_check(spec: metaworld.MetaWorldSpec, progress, episodes: int = 1):
    """`check(model)` for `train.train`: the sampled-action MSE on the expert's steps of `episodes`
    validation reset seeds per task (rendered first), one noise draw."""
    seeds = range(metaworld.VALIDATION_SEEDS, metaworld.VALIDATION_SEEDS + episodes)
    metaworld.collect(spec, progress, seeds=seeds)
    batch = metaworld.validation_batch(spec, seeds)

    def check(model) -> dict:
        return {"validation_action_mse": float(np.mean(_action_errors(model, batch, spec, train.VALIDATION_SEED)))}

    return check


def _check_same_plan(out_dir: pathlib.Path, plan: SuitePlan) -> None:
    """A folder's closed-loop runs share one plan: another (e.g. other fine-tuning steps) goes to another --out."""
    for path in sorted((out_dir / "closed-loop").glob("*.json")):
        earlier = json.loads(path.read_text()).get("plan", {})
        if earlier.get("finetune") is not None and earlier["finetune"] != dataclasses.asdict(plan.finetune):
            raise SystemExit(
                f"{path} was fine-tuned with {earlier['finetune']}, and this run's plan fine-tunes with "
                f"{dataclasses.asdict(plan.finetune)}: give this plan another --out."
            )
        scenes = earlier.get("spec", {}).get("train_seeds")
        if scenes is not None and scenes != plan.spec.train_seeds:
            raise SystemExit(
                f"{path} was trained on {scenes} expert episodes per task, and this run's plan on "
                f"{plan.spec.train_seeds}: give this plan another --out."
            )
        depth = earlier.get("spec", {}).get("siglip_depth")
        if depth != plan.spec.siglip_depth:
            raise SystemExit(
                f"{path} ran a policy whose SigLIP has {depth or 1} layer(s), and this run's plan "
                f"{plan.spec.siglip_depth or 1}: give this plan another --out (and --baseline-dir)."
            )
        if earlier.get("teacher") != plan.teacher:
            raise SystemExit(
                f"{path} was fine-tuned on {earlier.get('teacher') or 'the expert'}'s actions, and this run "
                f"on {plan.teacher or 'the expert'}'s: give this plan another --out."
            )
        if earlier.get("finetune_from") != plan.finetune_from:
            raise SystemExit(
                f"{path} was fine-tuned from {earlier.get('finetune_from') or 'the trained policy'}, and this run "
                f"fine-tunes from {plan.finetune_from or 'the trained policy'}: give this plan another --out."
            )


def action_mse(
    out: str = "metaworld-results",
    quick: bool = False,
    shares: list[float] | None = None,
    validation_episodes: int = 3,
    episodes_dir: str | None = None,
    noise_draws: int = 2,
    baseline_dir: str | None = None,
    shares_of: list[str] | None = None,
    siglip_depth: int | None = None,
) -> dict:
    """Sampled-action MSE against the expert on validation reset seeds (from `VALIDATION_SEEDS`: never
    trained on, never in the closed loop): the unpruned checkpoint, each fine-tuned variant in `out` as
    it runs, and the fine-tuned weights of `shares_of` (default: the default's) keeping each of
    `shares`. A pruned fine-tune that lost skill is as bad at every share, all patches included; one
    that lacks patches recovers as the share grows. `action-mse.md` and `.json` in `out`."""
    out_dir = prepare(out, shares_of, VARIANTS)  # as `run` does: the warnings of tracing each variant anew are expected
    missing = [name for name in shares_of or () if not (out_dir / "finetuned" / f"{slug(name)}.npz").exists()]
    shares_of = shares_of or [trial_plan.DEFAULT]
    if missing:
        raise metaworld.SuiteError(
            f"--shares-of {', '.join(missing)}: no fine-tuned weights in {out_dir / 'finetuned'}; "
            f"fine-tune it first (`openpi-prune metaworld --out {out} --only ...`)"
        )
    plan = _plan(out_dir, quick, episodes_dir, siglip_depth)
    spec, seeds = plan.spec, range(metaworld.VALIDATION_SEEDS, metaworld.VALIDATION_SEEDS + validation_episodes)
    shares = shares or ([0.2] if quick else [0.1, 0.2, 0.3, 0.5, 1.0])
    base_path = baseline_folder(out_dir, baseline_dir) / "params.npz"
    if not base_path.exists():
        raise SystemExit(f"no trained policy at {base_path}: run `openpi-prune metaworld --out {out}` first")
    # (row, settings changes or None for the checkpoint unpruned, weights: None for the checkpoint's)
    rows = [("unpruned checkpoint", None, None)]
    for name, changes in VARIANTS.items():
        finetuned = out_dir / "finetuned" / f"{slug(name)}.npz"
        if changes is not None and finetuned.exists():
            rows.append((name, changes, finetuned))
            if name in shares_of:  # the default's rows keep their name; another's name it
                whose = "" if name == trial_plan.DEFAULT else f" ({name})"
                rows += [
                    (f"  its weights, {share:.0%} kept{whose}", dict(changes, keep_fraction=share), finetuned)
                    for share in shares
                ]
    code = checkpoint.commit()
    with progress_bars() as progress:
        metaworld.collect(spec, progress, seeds=seeds)
        batch = metaworld.validation_batch(spec, seeds)
        tasks = np.asarray([task for task, _ in batch.layouts])
        bar = progress.add_task("action MSE", total=len(rows))
        table, agreement = {}, {}
        for row, changes, weights in rows:
            progress.update(bar, description=f"action MSE: {row.strip()}")
            with openpi_prune.disabled() if changes is None else openpi_prune.enabled(trial_plan.settings_for(changes)):
                params = checkpoint.load_trained(weights or base_path, spec, pruned=changes is not None)
                model = train.load(spec, params)
                draws = [_action_errors(model, batch, spec, 1_000 + 7_919 * d) for d in range(noise_draws)]
                errors = np.mean(draws, axis=0)
                # A fine-tuned variant whose pruner learns from the saliency (the share rows reuse its head).
                if row in VARIANTS and changes is not None and prefix.wants_saliency():
                    shares = trial.saliency_agreement(model, batch, draws=SALIENCY_DRAWS)
                    agreement[row] = {"all": float(shares.mean())} | {
                        task: float(shares[tasks == task].mean()) for task in spec.tasks
                    }
            table[row] = {"all": float(errors.mean())} | {
                task: float(errors[tasks == task].mean()) for task in spec.tasks
            }
            progress.advance(bar)
    report = {
        "commit": code,
        "validation_seeds": [seeds.start, seeds.stop],
        "steps": len(batch.actions),
        "noise_draws": noise_draws,
        "rows": table,
        "saliency_agreement": agreement,
        "saliency_draws": SALIENCY_DRAWS,
    }
    (out_dir / "action-mse.json").write_text(json.dumps(report, indent=1))
    reference = table.get(trial_plan.REFERENCE, {}).get("all")
    head = (
        "| weights, as they run | all | "
        + " | ".join(t.removesuffix("-v3") for t in spec.tasks)
        + " | all / reference's |"
    )
    lines = [
        f"Sampled-action MSE against the expert, every 3rd step of the successful expert episodes on validation reset "
        f"seeds {seeds.start}-{seeds.stop - 1} of each task ({len(batch.actions)} steps), {noise_draws} noise draws; "
        f"by `{code[:7]}`.",
        "",
        head,
        "|---" * (len(spec.tasks) + 3) + "|",
    ]
    for row, values in table.items():
        ratio = "-" if reference is None else f"{values['all'] / reference:.2f}"
        lines.append(
            f"| {row} | {values['all']:.4f} | " + " | ".join(f"{values[t]:.4f}" for t in spec.tasks) + f" | {ratio} |"
        )
    if agreement:
        lines += [
            "",
            f"The patches each fine-tuned head keeps (a merged region's mean is not one) that are among the model's "
            f"own most salient, as many, on the same steps; the saliency (the gradient of the unpruned loss at "
            f"each patch, what the head learns from) averaged over {SALIENCY_DRAWS} noise draws.",
            "",
            "| head | all | " + " | ".join(t.removesuffix("-v3") for t in spec.tasks) + " |",
            "|---" * (len(spec.tasks) + 2) + "|",
        ]
        for row, values in agreement.items():
            lines.append(
                f"| {row} | {values['all']:.0%} | " + " | ".join(f"{values[t]:.0%}" for t in spec.tasks) + " |"
            )
    (out_dir / "action-mse.md").write_text("\n".join(lines) + "\n")
    console.print("\n".join(lines))
    return report


def summarise(out_dir: pathlib.Path, plan: SuitePlan, reference_dir: str | None = None) -> dict:
    """The table of `out_dir`'s finished runs. A folder without a reference of its own pairs with
    `reference_dir`'s (another run's on the same scenes: a fine-tune from it, or of another head)."""
    rows, runs = {}, {}
    for name in VARIANTS:
        path = out_dir / "closed-loop" / f"{slug(name)}.json"
        if not path.exists():
            continue
        run = runs[name] = json.loads(path.read_text())
        per_task = {}
        for task in plan.spec.tasks:
            wins = [e["success"] for e in run["episodes"] if e["task"] == task]
            per_task[task] = {"success": float(np.mean(wins)) if wins else None, "episodes": len(wins)}
        wins = [e["success"] for e in run["episodes"]]
        calls = [s for e in run["episodes"] for s in e["call_seconds"][1:]]  # the first call compiles
        kept = [k for e in run["episodes"] for k in e["kept_per_camera"]]
        low, high = wilson(int(np.sum(wins)), len(wins))
        rows[name] = {
            "success": float(np.mean(wins)),
            "low": low,
            "high": high,
            "episodes": len(wins),
            "per_task": per_task,
            "call_ms_median": 1000 * float(np.median(calls)) if calls else None,
            # Live cameras only: the masked third keeps nothing.
            "kept_per_camera": np.asarray(kept)[:, :2].mean(0).tolist() if kept else None,
            "commit": run["commit"],
        }
    borrowed = None
    if reference_dir is not None and trial_plan.REFERENCE not in runs:
        runs[trial_plan.REFERENCE] = _reference_of(reference_dir)
        borrowed = {"folder": str(reference_dir), "commit": runs[trial_plan.REFERENCE]["commit"]}
    # Each variant paired scene by scene with the reference, and with the default.
    for against, key in ((trial_plan.REFERENCE, "paired_gap"), (trial_plan.DEFAULT, "paired_gap_to_default")):
        for name, row in rows.items():
            if against in runs and name not in (against, trial_plan.REFERENCE):
                row[key] = paired_gap(runs[against], runs[name])
    report = {"plan": dataclasses.asdict(plan), "variants": rows, "reference_from": borrowed}
    (out_dir / "results.json").write_text(json.dumps(report, indent=1))
    (out_dir / "results.md").write_text(markdown(report, plan))
    from openpi_prune.tools.lab import pictures

    if rows:
        pictures.success(rows, out_dir / "success.png")
        first = {}
        for name in rows:
            recorded = out_dir / "animations" / f"{slug(name)}-first-call.npz"
            if recorded.exists():
                with np.load(recorded) as call:
                    images = {camera: call[camera] for camera in metaworld.CAMERAS}
                    kept = call["kept_patches"] if "kept_patches" in call.files else None
                    # Recordings made before the merged slots were sent lack them: drawn as kept.
                    merged = call["merged_patches"] if "merged_patches" in call.files else np.zeros_like(kept)
                    first[name] = [(images, kept, None if kept is None else merged)]
        pictures.first_calls(first, plan.spec.grid, out_dir / "first-calls.png")
    curves = {
        name: json.loads(path.read_text())
        for name in VARIANTS
        if (path := out_dir / "finetuned" / f"{slug(name)}.curve.json").exists()
    }
    if curves:
        pictures.validation_curves(curves, out_dir / "validation-curves.png")
    return report


def _reference_of(reference_dir: str) -> dict:
    """The finished reference run of another folder (`--reference-dir`), on the same scenes."""
    path = pathlib.Path(reference_dir) / "closed-loop" / f"{slug(trial_plan.REFERENCE)}.json"
    if not path.exists():
        raise metaworld.SuiteError(f"--reference-dir {reference_dir}: no finished reference run at {path}")
    return json.loads(path.read_text())


def scene_map(
    out: str = "metaworld-results",
    reference_dir: str | None = None,
    quick: bool = False,
    episodes_dir: str | None = None,
) -> dict:
    """Where each task's object was in the scenes each finished run of `out` failed, beside the
    training scenes: `scene-map.png` (a row per task that any run failed, a panel per run) and
    `scene-map.json`. A policy that reads the object's place from too little falls back on the
    training scenes' usual place, and fails where they are few."""
    out_dir = pathlib.Path(out)
    plan = _plan(out_dir, quick, episodes_dir)
    runs, trained_on = {}, set()
    for name in VARIANTS:
        path = out_dir / "closed-loop" / f"{slug(name)}.json"
        if path.exists():
            run = json.loads(path.read_text())
            runs[name] = run["episodes"]
            trained_on.add(run.get("plan", {}).get("spec", {}).get("train_seeds", plan.spec.train_seeds))
    if len(trained_on) == 1:  # the training scenes the runs learnt from (--train-scenes)
        plan = dataclasses.replace(plan, spec=dataclasses.replace(plan.spec, train_seeds=trained_on.pop()))
    if reference_dir is not None and trial_plan.REFERENCE not in runs:
        runs = {trial_plan.REFERENCE: _reference_of(reference_dir)["episodes"], **runs}
    if not runs:
        raise metaworld.SuiteError(f"--scene-map: no finished closed-loop run in {out_dir / 'closed-loop'}")
    metaworld.require_rendering()
    tasks = [
        t for t in plan.spec.tasks if any(e["task"] == t and not e["success"] for eps in runs.values() for e in eps)
    ]
    report = {"tasks": {}}
    with progress_bars() as progress:
        seeds = {task: sorted({e["seed"] for eps in runs.values() for e in eps if e["task"] == task}) for task in tasks}
        bar = progress.add_task("object positions", total=sum(plan.spec.train_seeds + len(seeds[t]) for t in tasks))

        def place(task, seed):
            progress.advance(bar)
            return metaworld.object_position(task, seed, plan.spec).tolist()

        for task in tasks:
            report["tasks"][task] = {
                "train": [place(task, seed) for seed in range(plan.spec.train_seeds)],
                "test": {seed: place(task, seed) for seed in seeds[task]},
                "failed": {
                    name: sorted(e["seed"] for e in eps if e["task"] == task and not e["success"])
                    for name, eps in runs.items()
                },
            }
    (out_dir / "scene-map.json").write_text(json.dumps(report, indent=1))
    if tasks:
        from openpi_prune.tools.lab import pictures

        pictures.scene_map(report["tasks"], list(runs), out_dir / "scene-map.png")
    for task, found in report["tasks"].items():
        counts = "; ".join(f"{name}: {len(lost)}" for name, lost in found["failed"].items())
        console.print(f"{task}, scenes failed: {counts}")
    return report


def compare_steps(compare_steps: list[str], out: str) -> dict:
    """Suites that differ only in their fine-tuning steps, a folder each: every variant run at two or
    more lengths, its success at each (Wilson 95 %), its gap to the reference of the same length on
    the same scenes, and its gain over its own run at the length before (same scenes). Refuses runs
    of another policy or plan. `steps.md`, `steps.json` and `steps.png` in `out`."""
    lengths: dict[int, tuple[pathlib.Path, dict]] = {}
    plans = {}
    for folder in map(pathlib.Path, compare_steps):
        runs = {
            name: json.loads(path.read_text())
            for name in VARIANTS
            if (path := folder / "closed-loop" / f"{slug(name)}.json").exists()
        }
        if not runs:
            raise SystemExit(f"{folder / 'closed-loop'} holds no finished run: nothing to compare.")
        steps = {run["plan"]["finetune"]["steps"] for run in runs.values()}
        if len(steps) != 1 or (length := steps.pop()) in lengths:
            raise SystemExit(
                f"{folder}: its runs, with those of the other folders, must be one fine-tuning length a folder "
                "(the command gives each length its own --out)."
            )
        lengths[length] = (folder, runs)
        plans |= {(folder, name): _without_length(run) for name, run in runs.items()}
    # Runs made before each recorded the digest of the policy it started from are held to their plan alone.
    policies = {run["baseline"] for _, runs in lengths.values() for run in runs.values() if "baseline" in run}
    if len({json.dumps(p, sort_keys=True) for p in plans.values()}) != 1 or len(policies) > 1:
        raise SystemExit(
            f"the runs in {', '.join(compare_steps)} differ in more than their fine-tuning steps (the policy they "
            "start from, the tasks, the schedule): their success cannot be set side by side."
        )
    counts = sorted(lengths)
    rows = []
    for name in VARIANTS:
        ran = [s for s in counts if name in lengths[s][1]]
        if len(ran) < 2:
            continue
        for before, steps in zip([None, *ran], ran, strict=False):
            run = lengths[steps][1][name]
            wins = [e["success"] for e in run["episodes"]]
            low, high = wilson(int(np.sum(wins)), len(wins))
            reference = lengths[steps][1].get(trial_plan.REFERENCE)
            row = {
                "variant": name,
                "steps": steps,
                "folder": str(lengths[steps][0]),
                "commit": run["commit"],
                "success": float(np.mean(wins)),
                "low": low,
                "high": high,
                "episodes": len(wins),
                "seeded_scenes": checkpoint.descends_from(run["commit"], SEEDED_SINCE),
                "length_before": before,
            }
            # Absent: nothing to pair with; None: a pair of runs that met other scenes (`paired_gap`).
            if reference is not None and name != trial_plan.REFERENCE:
                row["gap_to_reference"] = paired_gap(reference, run)
            if before is not None:
                row["gain_over_length_before"] = paired_gap(run, lengths[before][1][name])
            rows.append(row)
    report = {
        "folders": {str(s): str(lengths[s][0]) for s in counts},
        "summarised_by": checkpoint.commit(),
        "rows": rows,
    }
    preamble = ["Success over each run's held-out episodes; gaps paired by scene, 95 % bootstrap over them.", ""]
    title = "Meta-World: the same variants fine-tuned for different lengths"
    write_comparison(pathlib.Path(out), report, preamble, STEP_HEADERS, _step_cells, title)
    from openpi_prune.tools.lab import pictures

    pictures.success_by_steps(rows, pathlib.Path(out) / "steps.png")
    return report


def _without_length(run: dict) -> dict:
    """What a run shares with the same suite fine-tuned for another length: its plan, less the steps,
    where its expert episodes were kept and how many held-out episodes it ran."""
    plan = json.loads(json.dumps(run["plan"]))
    del plan["finetune"]["steps"], plan["spec"]["episodes_dir"], plan["episodes"]
    return plan


STEP_HEADERS = (
    "variant",
    "fine-tuning steps",
    "success [Wilson 95 %]",
    "points below the reference of this length, same scenes [95 %] (solved by it only / by this only)",
    "points above its own run at the length before, same scenes [95 %] (solved by this only / by that only)",
    "commit",
)


def _step_cells(row: dict) -> list[str]:
    gain = _gap_cell(row, "gain_over_length_before")
    if row["length_before"] is not None:
        gain += f" (against {row['length_before']})"
    return [
        row["variant"],
        str(row["steps"]),
        f"{row['success']:.1%} [{row['low']:.1%}, {row['high']:.1%}] of {row['episodes']}",
        _gap_cell(row, "gap_to_reference"),
        gain,
        row["commit"][:7],
    ]


def paired_gap(reference: dict, run: dict) -> dict | None:
    """The reference's success minus the run's on the scenes both met, in points, with a 95 % bootstrap
    interval over those episodes, and how many each alone solved; None unless both met seeded scenes
    (and share some)."""
    if not all(checkpoint.descends_from(r["commit"], SEEDED_SINCE) for r in (reference, run)):
        return None
    solved = {(e["task"], e["seed"]): e["success"] for e in reference["episodes"]}
    pairs = np.asarray(
        [(solved[key], e["success"]) for e in run["episodes"] if (key := (e["task"], e["seed"])) in solved], float
    )
    return _points_below(pairs[:, 0] - pairs[:, 1]) if pairs.size else None


def _points_below(differences: np.ndarray) -> dict:
    """Per-scene success differences (one side's minus the other's, rates in [-1, 1]) as points, with a
    95 % bootstrap interval over the scenes and how many scenes lean each way."""
    differences = 100 * np.asarray(differences, float)
    points, low, high = _bootstrap_mean(differences)
    return {
        "points": points,
        "low": low,
        "high": high,
        "episodes": len(differences),
        "reference_only": int(np.sum(differences > 0)),
        "variant_only": int(np.sum(differences < 0)),
    }


def _bootstrap_mean(values: np.ndarray) -> tuple[float, float, float]:
    """The mean of per-scene values and its 95 % bootstrap interval over the scenes."""
    resampled = np.random.default_rng(0).choice(values, size=(trial_plan.BOOTSTRAP, len(values)))
    low, high = np.percentile(resampled.mean(axis=1), [2.5, 97.5])
    return float(values.mean()), float(low), float(high)


def compare_seeds(compare_seeds: list[str], out: str) -> dict:
    """Suites that differ only in their fine-tunes' seed, a folder each: how much of a gap is one
    fine-tune's draw. Runs are grouped by their pruning settings (a variant's name may have meant
    other settings when it ran); each group's runs are set against the reference's, its fine-tunes
    averaged scene by scene: a row per fine-tune, then, where a group has two or more, their mean,
    its interval a bootstrap over the scenes (each carrying all its fine-tunes' results; the spread
    between fine-tunes shows in their rows, not in it). Refuses runs of another policy or plan, or on
    unseeded scenes. `seeds.md`, `seeds.json` and `seeds.png` in `out`."""
    folders: dict[int, pathlib.Path] = {}
    runs = []  # (seed, folder, run)
    for folder in map(pathlib.Path, compare_seeds):
        # The checkpoint's own runs (blanked or not) have no fine-tune to pool, and may be shorter.
        found = [
            json.loads(path.read_text())
            for name, changes in VARIANTS.items()
            if changes is not None and (path := folder / "closed-loop" / f"{slug(name)}.json").exists()
        ]
        if not found:
            raise SystemExit(f"{folder / 'closed-loop'} holds no finished run: nothing to compare.")
        seeds = {run["plan"]["finetune"]["seed"] for run in found}
        if len(seeds) != 1 or (seed := seeds.pop()) in folders:
            raise SystemExit(
                f"{folder}: its runs, with those of the other folders, must be one fine-tune seed a folder "
                "(the command gives each --finetune-seed its own --out)."
            )
        folders[seed] = folder
        runs += [(seed, folder, run) for run in found]
    if len({json.dumps(_without_seed(run), sort_keys=True) for *_, run in runs}) != 1 or (
        len({run.get("baseline") for *_, run in runs}) != 1
    ):
        raise SystemExit(
            f"the runs in {', '.join(compare_seeds)} differ in more than their fine-tunes' seed (the policy they "
            "start from, the tasks, the schedule): their success cannot be pooled."
        )
    unseeded = [f"{f}: {r['variant']}" for _, f, r in runs if not checkpoint.descends_from(r["commit"], SEEDED_SINCE)]
    if unseeded:
        raise SystemExit(f"runs on unseeded scenes cannot be paired scene by scene: {'; '.join(unseeded)}")
    groups: dict[str, list] = {}
    for seed, folder, run in runs:
        group = groups.setdefault(json.dumps(run["settings"], sort_keys=True), [])
        if twin := next((f"{f}: {r['variant']}" for s, f, r in group if s == seed), None):
            raise SystemExit(f"{folder}: {run['variant']} ran with the same settings and seed as {twin}")
        group.append((seed, folder, run))
    references = [g for g in groups.values() if any(r["variant"] == trial_plan.REFERENCE for *_, r in g)]
    if len(references) != 1:
        raise SystemExit(f"the folders {', '.join(compare_seeds)} must hold the reference's runs, of one setting")
    reference = references[0]
    scenes = set.intersection(*({(e["task"], e["seed"]) for e in r["episodes"]} for _, _, r in runs))
    order = sorted(scenes)

    def wins(run: dict) -> np.ndarray:
        solved = {(e["task"], e["seed"]): e["success"] for e in run["episodes"]}
        return np.asarray([solved[scene] for scene in order], float)

    reference_rate = np.mean([wins(r) for *_, r in reference], axis=0)
    rows = []
    for group in groups.values():
        group.sort(key=lambda entry: entry[0])  # named as its first seed's run is
    for group in sorted(groups.values(), key=lambda g: (g is not reference, list(VARIANTS).index(g[0][2]["variant"]))):
        name = group[0][2]["variant"]
        each = []
        for seed, folder, run in group:
            solved = wins(run)
            low, high = wilson(int(solved.sum()), len(solved))
            row = {"variant": name, "seed": seed, "folder": str(folder), "commit": run["commit"]}
            row |= {"name_in_folder": run["variant"], "success": float(solved.mean()), "low": low, "high": high}
            if group is not reference:
                row["gap_to_reference"] = _points_below(reference_rate - solved)
            each.append((row, solved))
        rows += [row for row, _ in each]
        if len(each) > 1:
            rate = np.mean([solved for _, solved in each], axis=0)
            success, low, high = _bootstrap_mean(rate)
            row = {"variant": name, "seed": "all", "folder": "-", "commit": "-", "name_in_folder": name}
            row |= {"success": success, "low": low, "high": high}
            if group is not reference:
                row["gap_to_reference"] = _points_below(reference_rate - rate)
            rows.append(row)
    report = {
        "folders": {str(seed): str(folder) for seed, folder in sorted(folders.items())},
        "summarised_by": checkpoint.commit(),
        "scenes": len(order),
        "reference_fine_tunes": len(reference),
        "rows": rows,
    }
    preamble = [
        f"Success over the {len(order)} scenes every run met; a row per fine-tune, then their mean (its interval "
        "a bootstrap over the scenes). Gaps to the reference's fine-tunes averaged scene by scene, 95 % bootstrap "
        "over the scenes (scenes leaning to it / to this).",
        "",
    ]
    title = "Meta-World: the same variants, each fine-tune seed a row"
    write_comparison(
        pathlib.Path(out), report, preamble, SEED_HEADERS, _seed_cells, title, "seeds", lambda s: f"fine-tune seed {s}"
    )
    from openpi_prune.tools.lab import pictures

    pictures.gaps_by_fine_tune(rows, pathlib.Path(out) / "seeds.png")
    return report


def _without_seed(run: dict) -> dict:
    """What a run shares with the same suite fine-tuned from another seed: its plan, less the seed and
    where its expert episodes were kept."""
    plan = json.loads(json.dumps(run["plan"]))
    del plan["finetune"]["seed"], plan["spec"]["episodes_dir"]
    return plan


SEED_HEADERS = (
    "variant",
    "fine-tune seed",
    "success [95 %]",
    "points below the reference, same scenes [95 %] (scenes leaning to it / to this)",
    "commit",
)


def _seed_cells(row: dict) -> list[str]:
    return [
        row["variant"] if row["name_in_folder"] == row["variant"] else f"{row['variant']} (`{row['name_in_folder']}`)",
        "**mean**" if row["seed"] == "all" else str(row["seed"]),
        f"{row['success']:.1%} [{row['low']:.1%}, {row['high']:.1%}]",
        _gap_cell(row, "gap_to_reference"),
        row["commit"][:7],
    ]


def _gap_cell(row: dict, key: str = "paired_gap", above: bool = False) -> str:
    """A paired gap as points below the run it pairs with (`above`: as points above it)."""
    gap = row.get(key, "-")
    if not isinstance(gap, dict):
        return "-" if gap == "-" else "other scenes"
    solved_alone = (gap["reference_only"], gap["variant_only"])
    sign, alone = (-1, solved_alone[::-1]) if above else (1, solved_alone)
    # Rounded first, then + 0.0: a bound of -0.0 or -0.04 reads "0.0", not "-0.0".
    points, low, high = (
        round(x, 1) + 0.0 for x in (sign * gap["points"], *sorted((sign * gap["low"], sign * gap["high"])))
    )
    return f"{points:.1f} [{low:.1f}, {high:.1f}] ({alone[0]} / {alone[1]} of {gap['episodes']})"


def _cells(name: str, row: dict, plan: SuitePlan) -> list[str]:
    tasks = [row["per_task"][t]["success"] for t in plan.spec.tasks]
    kept = row["kept_per_camera"]
    return [
        name,
        f"{row['success']:.0%} [{row['low']:.0%}, {row['high']:.0%}] of {row['episodes']}",
        _gap_cell(row),
        _gap_cell(row, "paired_gap_to_default", above=True),
        *("-" if s is None else f"{s:.0%}" for s in tasks),
        "-" if row["call_ms_median"] is None else f"{row['call_ms_median']:.0f}",
        "-" if kept is None else " / ".join(f"{k:.1f}" for k in kept),
    ]


def _headers(plan: SuitePlan) -> list[str]:
    return [
        "variant",
        "success [Wilson 95 %]",
        "points below the reference, same scenes [95 %] (solved by it only / by this only)",
        "points above the default, same scenes [95 %] (solved by this only / by it only)",
        *(t.removesuffix("-v3") for t in plan.spec.tasks),
        "ms / call",
        "kept per camera",
    ]


def markdown(report: dict, plan: SuitePlan) -> str:
    lines = ["| " + " | ".join(_headers(plan)) + " |", "|" + "---|" * len(_headers(plan))]
    lines += ["| " + " | ".join(_cells(n, r, plan)) + " |" for n, r in report["variants"].items()]
    if report.get("reference_from"):
        borrowed = report["reference_from"]
        lines += [
            "",
            f"Points below the reference: {trial_plan.REFERENCE} of `{borrowed['folder']}` (by "
            f"`{borrowed['commit'][:7]}`), on the same scenes.",
        ]
    return "\n".join(lines) + "\n"


def _print(report: dict, plan: SuitePlan) -> None:
    table = Table(*_headers(plan), title="Meta-World: closed-loop success on held-out reset seeds")
    for name, row in report["variants"].items():
        table.add_row(*_cells(name, row, plan))
    console.print(table)
