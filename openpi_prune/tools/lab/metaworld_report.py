"""Tables and pictures of finished Meta-World runs: one folder's results (`results.md`), fine-tuning
lengths (`--compare-steps`) and fine-tune seeds (`--compare-seeds`) side by side, and where the
failed scenes lie (`--scene-map`). Each pairs runs scene by scene (`paired_gap`)."""

import dataclasses
import json
import math
import pathlib

import numpy as np
from rich.table import Table

from openpi_prune.tools.lab import checkpoint, metaworld, trial_plan
from openpi_prune.tools.lab.metaworld_plan import SEEDED_SINCE, VARIANTS, SuitePlan, plan_for
from openpi_prune.tools.lab.run import console, progress_bars, slug, write_comparison


def wilson(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson's 95 % interval of a success rate."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


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
    plan = plan_for(out_dir, quick, episodes_dir)
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


def print_table(report: dict, plan: SuitePlan) -> None:
    table = Table(*_headers(plan), title="Meta-World: closed-loop success on held-out reset seeds")
    for name, row in report["variants"].items():
        table.add_row(*_cells(name, row, plan))
    console.print(table)
