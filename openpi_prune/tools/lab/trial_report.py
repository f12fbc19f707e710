"""The trial's report: each variant's MSE as a ratio to the reference's, paired by seed, scene and
noise draw, with a bootstrap interval; tables and pictures."""

import dataclasses
import json
import pathlib

import numpy as np
from rich.table import Table

from openpi_prune.tools.lab import checkpoint, named, train
from openpi_prune.tools.lab.run import console, write_comparison
from openpi_prune.tools.lab.trial_plan import (
    BOOTSTRAP,
    DEFAULT,
    EXAMPLES,
    REFERENCE,
    VARIANTS,
    TrialPlan,
    check_same,
)


def load_runs(out_dir: pathlib.Path, print_: str) -> dict[str, dict[int, dict]]:
    runs: dict[str, dict[int, dict]] = {}
    for path in sorted(out_dir.glob("runs/seed-*/*.json")):
        row = json.loads(path.read_text())
        check_same(path, row.get("fingerprint"), print_)
        runs.setdefault(row["variant"], {})[row["seed"]] = row
    return runs


def paired_ratio(
    variant: dict[int, np.ndarray],
    reference: dict[int, np.ndarray],
    rng: np.random.Generator,
    scenes: dict[int, np.ndarray] | None = None,
) -> dict | None:
    """Mean MSE of `variant` over that of `reference` on the same seeds, scenes and noise draws, with
    a 95 % interval: bootstrap over seeds, then over scenes within each drawn seed, paired. With
    `scenes` (a mask per seed), only those scenes count; a resample draws from all of them, so how
    many fall in the subset varies as it does between seeds."""
    seeds = sorted(set(variant) & set(reference))
    if not seeds:
        return None
    # [seeds, scenes]: each scene's MSE averaged over the noise draws.
    v = np.stack([np.mean(variant[s], axis=0) for s in seeds])
    r = np.stack([np.mean(reference[s], axis=0) for s in seeds])
    if scenes is not None:
        counted = np.stack([scenes[s] for s in seeds]).astype(v.dtype)
        if not counted.any():
            return None
        v, r = v * counted, r * counted
    ratios = np.empty(BOOTSTRAP)
    n_seeds, n_scenes = v.shape
    for i in range(BOOTSTRAP):
        picked_seeds = rng.integers(0, n_seeds, n_seeds)
        picked_scenes = rng.integers(0, n_scenes, (n_seeds, n_scenes))
        drawn = r[picked_seeds[:, None], picked_scenes].sum()
        # A subset can miss a resample altogether (few scenes): that resample says nothing.
        ratios[i] = v[picked_seeds[:, None], picked_scenes].sum() / drawn if drawn > 0 else np.nan
    low, high = np.nanpercentile(ratios, [2.5, 97.5])
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
            # A run made under another name, before the plan's names changed (its settings are the same).
            "run_as": sorted({r["variant_when_run"] for r in by_seed.values() if "variant_when_run" in r}),
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
            if name != DEFAULT:
                row["test_ratio_to_default"] = (
                    paired_ratio(
                        {s: np.asarray(r["test_mse"]) for s, r in by_seed.items()},
                        {s: np.asarray(r["test_mse"]) for s, r in runs.get(DEFAULT, {}).items()},
                        rng,
                    )
                    or "no default run for these seeds"
                )
            kept = np.concatenate([np.asarray(r["kept_per_camera"]) for r in by_seed.values()])
            row |= {
                "kept_per_camera": float(kept.mean()),
                "kept_share": float(kept.mean() / plan.spec.grid**2),
                "recall": float(np.mean([np.mean(r["recall"]) for r in by_seed.values()])),
                "precision": float(np.mean([np.mean(r["precision"]) for r in by_seed.values()])),
                "masked_vs_compact_max_abs": max(r["masked_vs_compact_max_abs"] for r in by_seed.values()),
            }
            row |= _where_named_kept(by_seed, reference)
            for key in ("distractors_kept", "swap_coverage", "saliency_agreement"):
                if all(key in r for r in by_seed.values()):
                    row[key] = float(np.mean([np.mean(r[key]) for r in by_seed.values()]))
        rows[name] = row
    report = {
        "plan": dataclasses.asdict(plan),
        "splits": splits,
        "bootstrap": BOOTSTRAP,
        "summarised_by": checkpoint.commit(),
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


def _held_every_named(run: dict) -> np.ndarray:
    """Per test scene: whether the kept set held every patch of the named objects."""
    return np.asarray(run["recall"]) >= 1


def _where_named_kept(by_seed: dict[int, dict], reference: dict[int, dict]) -> dict:
    """The gap split by whether a test scene's kept set held every patch of the named objects: what
    losing part of a target costs, against what hiding the rest of the scene costs."""
    rng = np.random.default_rng(0)  # its own draws: the main table's intervals stay as they were
    seeds = sorted(set(by_seed) & set(reference))
    if not seeds:
        return {}
    test = {s: np.asarray(by_seed[s]["test_mse"]) for s in seeds}
    ref = {s: np.asarray(reference[s]["test_mse"]) for s in seeds}
    held = {s: _held_every_named(by_seed[s]) for s in seeds}
    excess = {s: np.mean(test[s], axis=0) - np.mean(ref[s], axis=0) for s in seeds}
    total_excess = sum(e.sum() for e in excess.values())
    return {
        "all_named_kept_share": float(np.mean([held[s].mean() for s in seeds])),
        "test_ratio_all_named_kept": paired_ratio(test, ref, rng, held) or "no such scene",
        "test_ratio_named_patch_lost": paired_ratio(test, ref, rng, {s: ~h for s, h in held.items()})
        or "no such scene",
        # None: no worse than the reference, no excess to share out.
        "excess_from_named_patch_lost": float(sum(excess[s][~held[s]].sum() for s in seeds) / total_excess)
        if total_excess > 0
        else None,
    }


def _ratio_cell(pair, missing: str = "no reference") -> str:
    if not isinstance(pair, dict):
        return missing
    return f"{pair['ratio']:.3f} [{pair['low']:.3f}, {pair['high']:.3f}]"


def _cells(name: str, row: dict) -> list[str]:
    def fmt(key, spec="{:.3g}"):
        return spec.format(row[key]) if key in row else "-"

    return [
        name,
        ", ".join(map(str, row["seeds"])),
        _ratio_cell(row.get("test_ratio")) if name != REFERENCE else "1",
        _ratio_cell(row.get("validation_ratio")) if name != REFERENCE else "1",
        {DEFAULT: "1", REFERENCE: "-"}.get(name) or _ratio_cell(row.get("test_ratio_to_default"), "no default run"),
        fmt("test_mse_vs_mean", "{:.4f}"),
        fmt("kept_per_camera", "{:.1f}"),
        fmt("kept_share", "{:.0%}"),
        fmt("recall", "{:.0%}"),
        fmt("precision", "{:.0%}"),
        fmt("distractors_kept", "{:.0%}"),
        fmt("swap_coverage", "{:.0%}"),
        fmt("saliency_agreement", "{:.0%}"),
        fmt("masked_vs_compact_max_abs", "{:.1e}"),
        ", ".join(c[:7] for c in row["commits"]) + "".join(f' (run as "{n}")' for n in row.get("run_as", ())),
    ]


HEADERS = [
    "variant",
    "seeds",
    "test MSE / reference [95 %]",
    "validation MSE / reference [95 %]",
    "test MSE / default's [95 %]",
    "test MSE / predict-mean",
    "kept per live camera",
    "kept share",
    "recall",
    "precision",
    "distractors kept",
    "prompt swap: new object kept",
    "kept among the saliency's top (as many)",
    "masked vs compact",
    "runs by",
]


SPLIT_HEADERS = [
    "variant",
    "seeds",
    "scenes with every named patch kept",
    "test MSE / reference there [95 %]",
    "where a named patch was lost [95 %]",
    "share of the excess error from scenes that lost one",
]


def markdown(report: dict) -> str:
    plan, splits = report["plan"], report["splits"]
    lines = [
        f"Summarised by `{report['summarised_by']}`; runs by {sorted({c for r in report['variants'].values() for c in r['commits']})}.",
        f"Test split: {plan['test']} scenes x {plan['noise_draws']} noise draws, {splits['test_layouts']} layouts, "
        f"{splits['test_layouts_in_training']} of them in training ({splits['training_layouts']} layouts drawn "
        f"there); validation: {plan['validation']} scenes, {splits['validation_layouts_in_training']} in training. "
        f"Intervals: bootstrap over seeds and scenes, {report['bootstrap']} resamples, paired with the reference "
        "(and with the default, on the seeds both ran).",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "---|" * len(HEADERS),
    ]
    lines += ["| " + " | ".join(_cells(name, row)) + " |" for name, row in report["variants"].items()]
    split = {name: row for name, row in report["variants"].items() if "all_named_kept_share" in row}
    if split:
        lines += [
            "",
            "Where the gap is, test split: the scenes whose kept set held every patch of the named objects, "
            "and the scenes where it lost one or more (the first noise draw's kept set).",
            "",
            "| " + " | ".join(SPLIT_HEADERS) + " |",
            "|" + "---|" * len(SPLIT_HEADERS),
        ]
        lines += [
            f"| {name} | {', '.join(map(str, row['seeds']))} | {row['all_named_kept_share']:.0%} | "
            f"{_ratio_cell(row['test_ratio_all_named_kept'], 'no such scene')} | "
            f"{_ratio_cell(row['test_ratio_named_patch_lost'], 'no such scene')} | "
            f"{'-' if row['excess_from_named_patch_lost'] is None else format(row['excess_from_named_patch_lost'], '.0%')} |"
            for name, row in split.items()
        ]
    return "\n".join(lines) + "\n"


def print_report(report: dict) -> None:
    table = Table(*HEADERS, title="trial: paired with the unpruned reference, test split")
    for name, row in report["variants"].items():
        table.add_row(*_cells(name, row))
    console.print(table)


STEP_HEADERS = [
    "variant",
    "fine-tuning steps",
    "seeds",
    "validation MSE / reference [95 %]",
    "test MSE / reference [95 %]",
    "test MSE / its own at the fewest steps [95 %]",
    "fine-tune minutes (mean)",
    "recall",
    "scenes with every named patch kept",
    "prompt swap: new object kept",
]


def compare_steps(folders: list[pathlib.Path], out_dir: pathlib.Path) -> dict:
    """One trial fine-tuned for different step counts, a folder each: each variant's ratio to the
    reference at each count, on the seeds every count ran for it, validation beside test, and its
    test MSE over its own at the fewest steps (same seeds and scenes). The count is chosen on the
    default's validation ratio."""
    trials = {}
    for folder in folders:
        path = folder / "results.json"
        if not path.exists():
            raise SystemExit(f"{path} is missing: summarise that trial first (`openpi-prune trial --report-only`).")
        results = json.loads(path.read_text())
        steps = results["plan"]["finetune"]["steps"]
        if steps in trials:
            raise SystemExit(f"{trials[steps][0]} and {folder} were both fine-tuned {steps} steps: name one of them.")
        trials[steps] = (folder, results, load_runs(folder, results["fingerprint"]))
    plans = {steps: _without_steps(results["plan"]) for steps, (_, results, _) in trials.items()}
    if len({json.dumps(p, sort_keys=True) for p in plans.values()}) != 1:
        raise SystemExit(
            f"{', '.join(str(f) for f in folders)} differ in more than their fine-tuning steps "
            "(family, baseline, splits or settings): their ratios cannot be set side by side."
        )
    rng = np.random.default_rng(0)
    counts = sorted(trials)
    rows = []
    for name in VARIANTS:  # the reference too: its own MSE against the fewest steps'
        ran = [s for s in counts if name in trials[s][2] and REFERENCE in trials[s][2]]
        seeds = sorted(
            set.intersection(*(set(trials[s][2][name]) & set(trials[s][2][REFERENCE]) for s in ran)) if ran else set()
        )
        if not seeds:
            continue
        mse = {s: {seed: trials[s][2][name][seed] for seed in seeds} for s in ran}
        ref = {s: {seed: trials[s][2][REFERENCE][seed] for seed in seeds} for s in ran}
        for steps in ran:
            rows.append(
                {
                    "variant": name,
                    "steps": steps,
                    "seeds": seeds,
                    "validation_ratio": paired_ratio(
                        *(_arrays(m[steps], "validation_mse", draws=False) for m in (mse, ref)), rng
                    ),
                    "test_ratio": paired_ratio(*(_arrays(m[steps], "test_mse") for m in (mse, ref)), rng),
                    "test_ratio_to_fewest_steps": paired_ratio(
                        _arrays(mse[steps], "test_mse"), _arrays(mse[ran[0]], "test_mse"), rng
                    ),
                    "finetune_minutes": float(np.mean([r["finetune_minutes"] for r in mse[steps].values()])),
                }
                | _kept_on(mse[steps].values())
            )
    defaults = [r for r in rows if r["variant"] == DEFAULT]
    report = {
        "folders": {str(steps): str(trials[steps][0]) for steps in counts},
        "summarised_by": checkpoint.commit(),
        "chosen_steps": min(defaults, key=lambda r: r["validation_ratio"]["ratio"])["steps"] if defaults else None,
        "rows": rows,
    }
    write_comparison(
        out_dir,
        report,
        _steps_preamble(report),
        STEP_HEADERS,
        _step_cells,
        "trial: the same variants fine-tuned for different step counts",
    )
    from openpi_prune.tools.lab import pictures

    pictures.ratio_by_steps(rows, out_dir / "steps.png")
    return report


def _kept_on(runs) -> dict:
    """What a pruned variant kept on these seeds' test scenes: recall, the share of scenes whose kept
    set held every named patch, and after a prompt swap the newly named object's share."""
    runs = list(runs)
    if not all("recall" in r for r in runs):
        return {}
    kept = {
        "recall": float(np.mean([np.mean(r["recall"]) for r in runs])),
        "all_named_kept_share": float(np.mean([np.mean(_held_every_named(r)) for r in runs])),
    }
    if all("swap_coverage" in r for r in runs):
        kept["swap_coverage"] = float(np.mean([np.mean(r["swap_coverage"]) for r in runs]))
    return kept


def _without_steps(plan: dict) -> dict:
    return {k: v for k, v in plan.items() if k != "seeds"} | {
        "finetune": {k: v for k, v in plan["finetune"].items() if k != "steps"}
    }


def _arrays(runs: dict[int, dict], key: str, draws: bool = True) -> dict[int, np.ndarray]:
    """Per seed [draws, scenes]; the validation split has one draw."""
    return {seed: np.asarray(r[key]) if draws else np.asarray(r[key])[None] for seed, r in runs.items()}


def _step_cells(row: dict) -> list[str]:
    return [
        row["variant"],
        str(row["steps"]),
        ", ".join(map(str, row["seeds"])),
        _ratio_cell(row["validation_ratio"]),
        _ratio_cell(row["test_ratio"]),
        _ratio_cell(row["test_ratio_to_fewest_steps"]),
        f"{row['finetune_minutes']:.1f}",
        *(f"{row[key]:.0%}" if key in row else "-" for key in ("recall", "all_named_kept_share", "swap_coverage")),
    ]


def _steps_preamble(report: dict) -> list[str]:
    chosen = report["chosen_steps"]
    return [
        "Each variant on the seeds every step count ran for it; intervals: bootstrap over seeds and scenes, "
        "paired by seed, scene and noise draw. Minutes are as the runs recorded them, on whatever else the machine ran.",
        "",
        f"Chosen on the default's validation ratio: **{chosen} steps**." if chosen else "No default run to choose on.",
        "",
    ]
