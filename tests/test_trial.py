"""The fair trial: held-out layouts, prompt-blind baselines, paired intervals, runs that resume."""

import dataclasses
import json
import math

import numpy as np
import pytest

import openpi_prune
from openpi_prune.tools.lab import named, scenes, train, trial, trial_plan, trial_report

SPEC = scenes.SceneSpec()
NAMED = named.NamedSpec()


def test_every_split_draws_only_its_own_layouts_and_layouts_lists_what_render_draws():
    for split in scenes.SPLITS:
        batch = scenes.render(11, 40, SPEC, split=split)
        assert {scenes.split_of(layout) for layout in batch.layouts} == {split}
        assert list(batch.layouts) == scenes.layouts(11, 40, SPEC, split=split)
    # The layout is the arrangement (colour and place of every block), not which block is named.
    layout = scenes.render(3, 1, SPEC, split=None).layouts[0]
    assert len(layout) == SPEC.objects and layout == tuple(sorted(layout))


@pytest.mark.parametrize("spec", [SPEC, NAMED], ids=["blocks", "named"])
def test_no_training_step_draws_a_test_or_validation_layout(spec):
    schedule = train.Schedule(steps=300, lr=1e-3, batch_size=32, single_object=0.25)
    seen = train.training_layouts(schedule, spec)
    held_out = set(train.test(spec, 512).layouts) | set(train.validation(spec, 256).layouts)
    assert len(seen) > 5000 and len(held_out) > 600
    assert not seen & held_out
    # Without the split the same seeds would have met them: the check can fail.
    anywhere = {layout for step in range(300) for layout in scenes.layouts(step, 32, SPEC, split=None)}
    assert anywhere & {layout for layout in anywhere if scenes.split_of(layout) == "test"}


def test_each_shape_shows_its_own_mark_in_one_patch():
    marks = {shape: named.mark(shape, 28) for shape in named.SHAPES}
    assert marks["block"].all() and 0 < marks["bar"].sum() < marks["block"].sum()
    assert 0 < marks["dot"].sum() < marks["bar"].sum()
    assert not (marks["bar"] == marks["dot"]).all()


def test_named_scenes_hold_more_objects_than_the_budget_and_name_two_of_them():
    batch = named.render(4, 24, NAMED, split=None)
    per, colours = NAMED.grid**2, list(named.COLOURS)
    objects = (batch.target_mask | batch.distractor_mask)[:, :per].sum(-1)
    assert objects.min() >= NAMED.object_patches > math.ceil(0.2 * per), "a 20 % budget cannot keep every object"
    for i in range(24):
        layout, (first, second) = batch.layouts[i], batch.named[i]
        (k1, s1, *_), (k2, s2, *_) = layout[first], layout[second]
        words = batch.tokens[i][batch.token_mask[i]].tolist()
        assert words[2:4] == [named.WORDS[colours[k1]], named.WORDS[s1]]
        assert words[6:8] == [named.WORDS[colours[k2]], named.WORDS[s2]]
        # A distractor shares the first named object's colour, in another shape.
        assert any(k == k1 and s != s1 for k, s, *_ in layout)
        for c, camera in enumerate(scenes.TABLES):
            named_patches = batch.target_mask[i, c * per : (c + 1) * per]
            assert named_patches.sum() == np.prod(named.SHAPES[s1]) + np.prod(named.SHAPES[s2])
            # Every named patch shows its object's colour where its shape's mark is painted.
            size = batch.images[camera][i].shape[0] // NAMED.grid
            patches = batch.images[camera][i].reshape(NAMED.grid, size, NAMED.grid, size, 3).transpose(0, 2, 1, 3, 4)
            patches = patches.reshape(per, size, size, 3)
            for k, s in ((k1, s1), (k2, s2)):
                painted = named.mark(s, size) if c == 0 else named.mark(s, size).T
                shows = np.abs(patches[:, painted] - np.asarray(named.COLOURS[colours[k]])).max(axis=(1, 2)) < 1e-6
                assert shows[named_patches].sum() >= np.prod(named.SHAPES[s]), "a named object's patches show it"
            # Each named object's own patches show its mark: a bar's groove, the table around a dot.
            for k, s, r, col in (layout[first], layout[second]):
                painted = named.mark(s, size) if c == 0 else named.mark(s, size).T
                own = named._mask(NAMED, s, r, col)[c * per : (c + 1) * per]
                colour = np.asarray(named.COLOURS[colours[k]])
                bare = np.abs(patches[own][:, ~painted] - colour).max(axis=-1) > 1e-3
                assert bare.all(), f"a {s}'s patches show its mark, not a filled square"
        # The chunk reaches the first object halfway, and ends on the second.
        for step, (_, shape, r, col) in ((NAMED.horizon // 2 - 1, layout[first]), (-1, layout[second])):
            rows, cols = named.SHAPES[shape]
            centre = np.array([col + cols / 2, r + rows / 2]) / NAMED.grid * 2 - 1
            np.testing.assert_allclose(batch.actions[i, step], centre, atol=1e-6)


def test_a_renamed_scene_keeps_its_images_and_names_a_new_first_object():
    batch = named.render(9, 16, NAMED, split="test")
    swapped = named.rename(batch, NAMED, seed=2)
    for camera in batch.images:
        np.testing.assert_array_equal(swapped.images[camera], batch.images[camera])
    assert all(new[0] not in old for new, old in zip(swapped.named, batch.named, strict=True))
    assert not np.array_equal(swapped.actions, batch.actions)
    again = named.render(9, 16, NAMED, split="test")
    assert again.layouts == batch.layouts and again.named == batch.named


def _kept(method: str, batch: scenes.Batch, model) -> np.ndarray:
    with openpi_prune.enabled(method=method, warn_below=0, telemetry=False):
        return train.sample(model, batch, num_steps=2)[1]["kept_mask"]


@pytest.fixture(scope="module")
def lab_model():
    return train.create(SPEC)


@pytest.mark.parametrize("method", ["random", "distinct"])
def test_prompt_blind_baselines_keep_the_share_whatever_the_prompt_says(lab_model, method):
    batch = scenes.render(5, 6, SPEC, split=None)
    renamed = batch.tokens.copy()
    renamed[:, 3] = scenes.WORDS["yellow"]  # another colour named, the same images
    other = dataclasses.replace(batch, tokens=renamed)
    kept = _kept(method, batch, lab_model)
    np.testing.assert_array_equal(kept, _kept(method, other, lab_model))
    live = 2 * SPEC.grid**2
    np.testing.assert_array_equal(kept.sum(-1), math.ceil(0.2 * live))
    assert not kept[:, live:].any(), "the masked camera's patches are never kept"


def test_random_share_is_drawn_anew_per_image_and_repeats_for_the_same_image(lab_model):
    batch = scenes.render(6, 4, SPEC, split=None)
    kept = _kept("random", batch, lab_model)
    assert len({row.tobytes() for row in kept}) == 4
    np.testing.assert_array_equal(kept, _kept("random", batch, lab_model))


def test_distinct_keeps_what_stands_out_and_random_does_not(lab_model):
    # One block on a plain table: the block's patches are the least like the rest of their image.
    batch = scenes.render(5, 8, SPEC, objects=1, split=None)
    recall = {
        m: (_kept(m, batch, lab_model) & batch.target_mask).sum() / batch.target_mask.sum()
        for m in ("distinct", "random")
    }
    assert recall["distinct"] == 1.0
    assert recall["random"] < 0.5


def test_a_merged_slot_is_not_counted_as_its_patch():
    kept = np.asarray([[True, True, False, True]])
    assert trial.as_they_are({"kept_mask": kept}).tolist() == kept.tolist()
    merged = np.asarray([[False, True, False, False]])
    assert trial.as_they_are({"kept_mask": kept, "merged_mask": merged}).tolist() == [[True, False, False, True]]


def test_paired_ratio_interval_holds_the_ratio_and_needs_the_reference():
    rng = np.random.default_rng(0)
    reference = {s: rng.gamma(2.0, 1.0, (2, 200)) for s in range(3)}
    same = trial_report.paired_ratio(reference, reference, rng)
    assert same["ratio"] == same["low"] == same["high"] == 1.0
    worse = trial_report.paired_ratio({s: 1.2 * v for s, v in reference.items()}, reference, rng)
    assert worse["ratio"] == pytest.approx(1.2) and worse["low"] == pytest.approx(1.2)
    noisy = trial_report.paired_ratio(
        {s: v * rng.uniform(0.5, 1.7, v.shape) for s, v in reference.items()}, reference, rng
    )
    assert noisy["low"] < noisy["ratio"] < noisy["high"] and noisy["high"] - noisy["low"] > 0.02
    assert trial_report.paired_ratio(reference, {7: reference[0]}, rng) is None


def test_the_gap_splits_into_scenes_that_held_every_named_patch_and_those_that_lost_one():
    rng = np.random.default_rng(1)
    reference = {s: rng.gamma(2.0, 1.0, (3, 400)) for s in range(2)}
    held = {s: np.arange(400) % 4 != 0 for s in range(2)}  # a quarter of the scenes lost a named patch
    # Twice the reference's error where everything named was kept, ten times where a patch was lost.
    variant = {s: v * np.where(held[s], 2.0, 10.0) for s, v in reference.items()}
    runs = {s: {"test_mse": variant[s], "recall": np.where(held[s], 1.0, 0.75)} for s in range(2)}
    split = trial_report._where_named_kept(runs, {s: {"test_mse": v} for s, v in reference.items()})
    assert split["all_named_kept_share"] == pytest.approx(0.75)
    there, lost = split["test_ratio_all_named_kept"], split["test_ratio_named_patch_lost"]
    assert there["ratio"] == pytest.approx(2.0) and there["low"] == pytest.approx(2.0)
    assert lost["ratio"] == pytest.approx(10.0) and lost["high"] == pytest.approx(10.0)

    def excess(keep):
        return sum(((variant[s] - reference[s]).mean(0))[keep[s]].sum() for s in range(2))

    assert split["excess_from_named_patch_lost"] == pytest.approx(
        excess({s: ~h for s, h in held.items()}) / excess({s: np.ones(400, bool) for s in range(2)})
    )
    everything_held = {s: {**r, "recall": np.ones(400)} for s, r in runs.items()}
    none_lost = trial_report._where_named_kept(everything_held, {s: {"test_mse": v} for s, v in reference.items()})
    assert none_lost["test_ratio_named_patch_lost"] == "no such scene"
    assert none_lost["excess_from_named_patch_lost"] == 0


@pytest.mark.slow
def test_trial_runs_in_pieces_and_reports_paired_ratios(tmp_path, monkeypatch):
    only = [trial_plan.REFERENCE, "default (relevance)", "distinct (prompt-blind)"]
    report = trial.run(out=str(tmp_path), quick=True, seeds=[0], only=only)
    assert report["splits"]["test_layouts_in_training"] == 0
    assert report["splits"]["test_layouts"] > 0
    rows = report["variants"]
    assert set(rows) == set(only)
    for name in only[1:]:
        pair = rows[name]["test_ratio"]
        assert pair["low"] <= pair["ratio"] <= pair["high"] and pair["seeds"] == [0]
        assert rows[name]["kept_share"] == pytest.approx(13 / 64)
        assert 0 <= rows[name]["precision"] <= 1 and 0 <= rows[name]["recall"] <= 1
        # Compact (the shipped path) and masked agree on the fine-tuned weights.
        assert rows[name]["masked_vs_compact_max_abs"] < 1e-4
    # The head's picks against the saliency it learns from: a share, measured for relevance only.
    assert 0 <= rows["default (relevance)"]["saliency_agreement"] <= 1
    assert "saliency_agreement" not in rows["distinct (prompt-blind)"]
    # Another variant is also paired with the default, on the seeds both ran.
    to_default = rows["distinct (prompt-blind)"]["test_ratio_to_default"]
    assert to_default["seeds"] == [0] and to_default["low"] <= to_default["ratio"] <= to_default["high"]
    # The baseline's training state, saved as it trained, is gone once its checkpoint is written.
    assert not list((tmp_path / "baseline").glob("training-state-*"))
    run_file = tmp_path / "runs" / "seed-0" / "default-relevance.json"
    saved = json.loads(run_file.read_text())
    assert saved["commit"] and saved["settings"]["mode"] == "compact"
    assert np.asarray(saved["test_mse"]).shape == (trial.QUICK.noise_draws, trial.QUICK.test)
    for name in ("results.md", "results.json", "ratios.png", "kept_patches.png", "baseline/params.npz"):
        assert (tmp_path / name).stat().st_size > 0

    # The next piece resumes: nothing is trained again, the same figures come back.
    def no_training(*args, **kwargs):
        raise AssertionError("a finished run or the baseline was trained again")

    monkeypatch.setattr(train, "train", no_training)
    again = trial.run(out=str(tmp_path), quick=True, seeds=[0], only=only)
    assert again["variants"] == rows
    # Runs made for other scenes or another plan are never paired with this one's.
    monkeypatch.setattr(trial, "QUICK", dataclasses.replace(trial.QUICK, test=trial.QUICK.test - 2))
    with pytest.raises(SystemExit, match="another plan or other scenes"):
        trial.run(out=str(tmp_path), quick=True, seeds=[0], only=only)
    monkeypatch.undo()
    # A trial that differs only in its fine-tuning shares the baseline: it fine-tunes from it, never
    # trains it again, and one made for other scenes is refused.
    trained = []

    def record(*args, resume=None, **kwargs):  # leaves a training state, as a real run saves one
        resume.parent.mkdir(parents=True, exist_ok=True)
        resume.touch()
        trained.append((args[2], resume))
        return [{"loss": 1.0}]

    monkeypatch.setattr(train, "train", record)
    other = trial.run(
        out=str(tmp_path / "longer"),
        quick=True,
        seeds=[0],
        only=only[:2],
        finetune_steps=3,
        baseline_dir=str(tmp_path / "baseline"),
    )
    assert [schedule.steps for schedule, _ in trained] == [3, 3] and not (tmp_path / "longer" / "baseline").exists()
    # Each fine-tune saved its state as it went, under the plan's fingerprint, for a cut-short run to
    # resume; once its run is written, the state is gone.
    runs = tmp_path / "longer" / "runs" / "seed-0"
    for (_, state), name in zip(trained, only[:2], strict=True):
        fingerprint = json.loads((runs / f"{trial.slug(name)}.json").read_text())["fingerprint"]
        assert state == runs / f"{trial.slug(name)}.training-state-{fingerprint}.npz" and not state.exists()
    assert other["variants"][only[1]]["test_ratio"]["seeds"] == [0]
    with pytest.raises(SystemExit, match="another plan or other scenes"):
        trial.run(
            out=str(tmp_path / "named"),
            family="named",
            quick=True,
            seeds=[0],
            only=only[:1],
            baseline_dir=str(tmp_path / "baseline"),
        )
    monkeypatch.undo()
    # Without the reference's run, a ratio is said to be missing, never taken against another figure.
    monkeypatch.setattr(train, "train", no_training)
    (tmp_path / "runs" / "seed-0" / "reference-unpruned.json").unlink()
    alone = trial.run(out=str(tmp_path), quick=True, seeds=[0], report_only=True)
    assert alone["variants"]["default (relevance)"]["test_ratio"] == "no reference run for these seeds"
    assert "no reference" in (tmp_path / "results.md").read_text()


@pytest.mark.slow
def test_trial_on_named_scenes_reports_distractors_and_the_prompt_swap(tmp_path):
    only = [trial_plan.REFERENCE, "distinct (prompt-blind)"]
    report = trial.run(out=str(tmp_path), family="named", quick=True, seeds=[0], only=only)
    row = report["variants"]["distinct (prompt-blind)"]
    assert 0 <= row["distractors_kept"] <= 1 and 0 <= row["swap_coverage"] <= 1
    assert row["recall"] < 1, "a prompt-blind choice cannot hold every named patch here"
    assert report["plan"]["spec"]["objects"] == named.NamedSpec().objects
    assert "prompt swap" in (tmp_path / "results.md").read_text()
    assert 0 <= row["all_named_kept_share"] < 1 and 0 <= row["excess_from_named_patch_lost"] <= 1
    assert "Where the gap is" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "kept_patches.png").stat().st_size > 0


def _trial_folder(root, steps, ratios, validation_ratios, family="named"):
    """A summarised trial as `trial.run` leaves it: results.json and one file per (seed, variant)."""
    folder = root / f"ft{steps}"
    plan = {"spec": {"family": family}, "seeds": [0, 1], "finetune": {"steps": steps, "lr": 3e-4}}
    (folder / "runs").mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"plan": plan, "fingerprint": f"print-{steps}"}))
    rng = np.random.default_rng(steps)
    for seed in (0, 1):
        reference_test, reference_val = rng.gamma(2.0, 1.0, (3, 50)), rng.gamma(2.0, 1.0, 20)
        for name, scale, val_scale in (
            (trial_plan.REFERENCE, 1.0, 1.0),
            (trial_plan.DEFAULT, ratios, validation_ratios),
        ):
            path = folder / "runs" / f"seed-{seed}" / f"{name}.json"
            path.parent.mkdir(exist_ok=True)
            row = {"variant": name, "seed": seed, "finetune_minutes": steps / 100, "fingerprint": f"print-{steps}"}
            row |= {
                "test_mse": (scale * reference_test).tolist(),
                "validation_mse": (val_scale * reference_val).tolist(),
            }
            if name == trial_plan.DEFAULT:
                row["recall"] = [1.0, 0.8] * 25  # every named patch kept in half of the scenes
            path.write_text(json.dumps(row))
    return folder


def test_step_counts_are_set_side_by_side_and_chosen_on_validation(tmp_path):
    # The test split favours 2400 steps, the validation split 1200: the choice follows validation.
    folders = [
        _trial_folder(tmp_path, 600, ratios=20.0, validation_ratios=18.0),
        _trial_folder(tmp_path, 1200, ratios=10.0, validation_ratios=6.0),
        _trial_folder(tmp_path, 2400, ratios=5.0, validation_ratios=8.0),
    ]
    report = trial.run(out=str(tmp_path / "steps"), compare_steps=[str(f) for f in folders])
    assert report["chosen_steps"] == 1200
    by = {(r["variant"], r["steps"]): r for r in report["rows"]}
    assert by[(trial_plan.DEFAULT, 2400)]["test_ratio"]["ratio"] == pytest.approx(5.0)
    assert by[(trial_plan.DEFAULT, 1200)]["validation_ratio"]["ratio"] == pytest.approx(6.0)
    assert by[(trial_plan.REFERENCE, 600)]["test_ratio"]["ratio"] == 1.0
    assert by[(trial_plan.DEFAULT, 600)]["seeds"] == [0, 1]
    assert by[(trial_plan.DEFAULT, 600)]["recall"] == pytest.approx(0.9)
    assert by[(trial_plan.DEFAULT, 600)]["all_named_kept_share"] == pytest.approx(0.5)
    for name in ("steps.md", "steps.json", "steps.png"):
        assert (tmp_path / "steps" / name).stat().st_size > 0
    assert "**1200 steps**" in (tmp_path / "steps" / "steps.md").read_text()
    other = _trial_folder(tmp_path / "other", 4800, ratios=4.0, validation_ratios=4.0, family="blocks")
    with pytest.raises(SystemExit, match="differ in more than their fine-tuning steps"):
        trial.run(out=str(tmp_path / "mixed"), compare_steps=[str(folders[0]), str(other)])
    with pytest.raises(SystemExit, match="summarise that trial first"):
        trial.run(out=str(tmp_path / "missing"), compare_steps=[str(tmp_path / "nowhere")])
