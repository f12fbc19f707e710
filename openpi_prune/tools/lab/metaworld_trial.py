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
import pathlib
import time

import numpy as np

import openpi_prune
from openpi_prune.adapter import prefix
from openpi_prune.tools.lab import checkpoint, metaworld, train, trial, trial_plan
from openpi_prune.tools.lab.metaworld_plan import BLANKED, VARIANTS, SuitePlan, plan_for
from openpi_prune.tools.lab.metaworld_report import print_table, summarise
from openpi_prune.tools.lab.run import baseline_folder, console, prepare, progress_bars, slug

# Noise draws the saliency is averaged over where `--action-mse` compares each head with it.
SALIENCY_DRAWS = 4


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
    plan = plan_for(out_dir, quick, episodes_dir, siglip_depth)
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
    print_table(report, plan)
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
    plan = plan_for(out_dir, quick, episodes_dir, siglip_depth)
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
