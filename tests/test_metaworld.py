"""The Meta-World suite: what the policy sees, and the closed loop through OpenPI's server (short)."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from openpi_prune.tools import cli
from openpi_prune.tools.lab import checkpoint, metaworld, metaworld_plan, metaworld_report, metaworld_trial, trial_plan
from openpi_prune.tools.lab.run import slug

SPEC = metaworld.MetaWorldSpec()


def test_prompt_names_the_task_then_the_state_as_tokens():
    low = metaworld.prompt_tokens("drawer-open-v3", np.array([-0.1, 0.6, 0.2, 1.0]), SPEC)
    high = metaworld.prompt_tokens("drawer-open-v3", np.array([0.1, 0.6, 0.2, 1.0]), SPEC)
    other = metaworld.prompt_tokens("window-open-v3", np.array([-0.1, 0.6, 0.2, 1.0]), SPEC)
    words = len(metaworld.TASKS["drawer-open-v3"].split())
    tokens, mask = low
    assert mask.sum() == words + 4 and not mask[words + 4 :].any()
    assert (tokens[words : words + 4] >= metaworld.STATE_TOKENS).all()
    assert tokens[words] < high[0][words], "a hand further along x gets a higher bin"
    np.testing.assert_array_equal(tokens[words + 1 : words + 4], high[0][words + 1 : words + 4])
    assert not np.array_equal(tokens[:words], other[0][:words])
    assert tokens.max() < 257_152, "every id is in PaliGemma's vocabulary"


def test_policy_inputs_are_openpi_s_observation_with_the_right_wrist_masked():
    from openpi.models import model as _model

    image = np.full((224, 224, 3), 200, np.uint8)
    message = {
        "observation/image": image,
        "observation/wrist_image": image,
        "observation/state": np.zeros(4, np.float32),
        "task": "drawer-open-v3",
    }
    observation = _model.Observation.from_dict(metaworld.policy_inputs(SPEC)(message))
    assert set(observation.images) == {"base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb"}
    assert not observation.image_masks["right_wrist_0_rgb"] and observation.image_masks["base_0_rgb"]
    with pytest.raises(metaworld.SuiteError, match="unknown task 'fly'"):
        metaworld.policy_inputs(SPEC)({**message, "task": "fly"})


def test_wilson_interval():
    assert metaworld_report.wilson(0, 0) == (0.0, 1.0)
    low, high = metaworld_report.wilson(30, 50)
    assert low == pytest.approx(0.4618, abs=1e-3) and high == pytest.approx(0.7239, abs=1e-3)
    assert metaworld_report.wilson(50, 50)[1] == 1.0 and metaworld_report.wilson(50, 50)[0] > 0.9


def test_the_paired_gap_counts_the_scenes_each_alone_solved(monkeypatch):
    monkeypatch.setattr(checkpoint, "descends_from", lambda commit, ancestor: commit != "unseeded")

    def run(commit, wins):
        return {"commit": commit, "episodes": [{"task": "t", "seed": k, "success": w} for k, w in enumerate(wins)]}

    reference = run("seeded", [1] * 8 + [0, 1])
    variant = run("seeded", [1] * 6 + [0, 0, 1, 1])
    variant["episodes"].reverse()  # paired by scene, not by order
    gap = metaworld_report.paired_gap(reference, variant)
    assert (gap["reference_only"], gap["variant_only"], gap["episodes"]) == (2, 1, 10)
    assert gap["points"] == pytest.approx(10.0) and gap["low"] <= 10.0 <= gap["high"] and gap["low"] < gap["high"]
    assert metaworld_report.paired_gap(reference, run("unseeded", [1] * 10)) is None
    elsewhere = run("seeded", [1])
    elsewhere["episodes"][0]["task"] = "another task"
    assert metaworld_report.paired_gap(reference, elsewhere) is None  # no scene in common
    assert metaworld_report._gap_cell({"paired_gap": None}) == "other scenes"
    # Against the default, a better variant's gap reads as points above it.
    assert metaworld_report._gap_cell({"g": gap}, "g").startswith("10.0 [")
    assert metaworld_report._gap_cell({"g": gap}, "g", above=True).startswith("-10.0 [")
    assert metaworld_report._gap_cell({"g": gap}, "g", above=True).endswith("(1 / 2 of 10)")
    # A bound that rounds to zero from below reads as 0.0, in either direction.
    at_zero = gap | {"points": 2.2, "low": -0.04, "high": 4.6}
    assert metaworld_report._gap_cell({"g": at_zero}, "g").startswith("2.2 [0.0, 4.6]")
    assert metaworld_report._gap_cell({"g": at_zero}, "g", above=True).startswith("-2.2 [-4.6, 0.0]")


def test_the_learning_curve_averages_each_stretch_and_the_head_s_loss_where_it_ran():
    # Saliency on every 2nd step: the pruner's loss is 0 on the others, and both checks fall on one.
    history = [
        {"loss": 1.0, "distill_loss": 0.5},
        {"loss": 3.0, "distill_loss": 0.0, "validation_action_mse": 0.2},
        {"loss": 2.0, "distill_loss": 0.25},
        {"loss": 4.0, "distill_loss": 0.0, "validation_action_mse": 0.1},
        {"loss": 9.0, "distill_loss": 0.75},  # after the last check: in no point
    ]
    curve = metaworld_trial.learning_curve(history)
    assert curve == [
        {"step": 2, "loss": 2.0, "distill_loss": 0.5, "validation_action_mse": 0.2},
        {"step": 4, "loss": 3.0, "distill_loss": 0.25, "validation_action_mse": 0.1},
    ]
    # The reference's run has no pruner's loss; a stretch whose saliency never ran reads 0.
    assert metaworld_trial.learning_curve([{"loss": 1.0, "validation_action_mse": 0.3}]) == [
        {"step": 1, "loss": 1.0, "validation_action_mse": 0.3}
    ]
    assert metaworld_trial.learning_curve([{"distill_loss": 0.0, "validation_action_mse": 0.3}])[0]["distill_loss"] == 0


def _finished_run(
    folder, name, steps, wins, commit="seeded", baseline="policy", tasks=("t",), seed=100_000, settings=None, episodes=9
):
    """A closed-loop run as the command leaves it, one scene per entry of `wins`."""
    plan = {
        "spec": {"episodes_dir": str(folder), "tasks": list(tasks)},
        "finetune": {"steps": steps, "seed": seed},
        "episodes": episodes,
    }
    episodes = [{"task": "t", "seed": k, "success": w} for k, w in enumerate(wins)]
    path = folder / "closed-loop" / f"{slug(name)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    run = {"variant": name, "commit": commit, "baseline": baseline, "plan": plan, "episodes": episodes}
    path.write_text(json.dumps(run | {"settings": settings or {"method": name}}))


def test_fine_tuning_lengths_set_side_by_side_on_the_same_scenes(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(checkpoint, "descends_from", lambda commit, ancestor: commit != "unseeded")
    reference, default = trial_plan.REFERENCE, trial_plan.DEFAULT
    short, long = tmp_path / "short", tmp_path / "long"
    _finished_run(short, reference, 100, [1] * 10, commit="unseeded")
    _finished_run(short, default, 100, [1] * 5 + [0] * 5)
    _finished_run(short, "distinct (prompt-blind)", 100, [0] * 10)  # at one length only: not compared
    _finished_run(long, reference, 300, [1] * 10)
    _finished_run(long, default, 300, [1] * 4 + [0] + [1] * 4 + [0])
    assert cli.main(["metaworld", "--compare-steps", str(long), str(short), "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "steps.json").read_text())
    rows = {(r["variant"], r["steps"]): r for r in report["rows"]}
    assert sorted(rows) == sorted([(reference, 100), (reference, 300), (default, 100), (default, 300)])
    later = rows[default, 300]
    assert later["success"] == pytest.approx(0.8) and later["low"] < 0.8 < later["high"]
    assert later["gap_to_reference"]["points"] == pytest.approx(20.0)
    # Against its own shorter run on the same scenes: 4 solved by this only, 1 by that only.
    gain = later["gain_over_length_before"]
    assert gain["points"] == pytest.approx(30.0) and (gain["reference_only"], gain["variant_only"]) == (4, 1)
    assert rows[default, 100]["gap_to_reference"] is None  # the reference then met unseeded scenes
    assert not rows[reference, 100]["seeded_scenes"] and "gain_over_length_before" not in rows[reference, 100]
    table = (tmp_path / "out" / "steps.md").read_text()
    assert "| default (relevance) | 300 | 80.0% [" in table and "30.0 [" in table and "(against 100)" in table
    assert "| default (relevance) | 100 | 50.0% [" in table and "| other scenes | - |" in table
    assert (tmp_path / "out" / "steps.png").stat().st_size > 0
    # Runs of another policy, or of another plan, are refused; so are two folders of one length.
    _finished_run(long, default, 300, [1] * 10, baseline="another policy")
    with pytest.raises(SystemExit, match="differ in more than their fine-tuning steps"):
        metaworld_report.compare_steps([str(short), str(long)], str(tmp_path / "out"))
    _finished_run(long, default, 300, [1] * 10, tasks=("t", "u"))
    with pytest.raises(SystemExit, match="differ in more than their fine-tuning steps"):
        metaworld_report.compare_steps([str(short), str(long)], str(tmp_path / "out"))
    with pytest.raises(SystemExit, match="one fine-tuning length a folder"):
        metaworld_report.compare_steps([str(short), str(short)], str(tmp_path / "out"))
    with pytest.raises(SystemExit, match="holds no finished run"):
        metaworld_report.compare_steps([str(short), str(tmp_path / "empty")], str(tmp_path / "out"))
    # It summarises finished runs: an option that would run something is refused.
    assert cli.main(["metaworld", "--compare-steps", str(short), "--only", reference]) == 2
    assert "--compare-steps summarises finished runs" in capsys.readouterr().err
    # The shares of a variant's weights are an --action-mse figure: asked for without it, refused.
    assert cli.main(["metaworld", "--out", str(short), "--shares-of", reference]) == 2
    assert "--shares and --shares-of apply to --action-mse only" in capsys.readouterr().err


def test_fine_tunes_of_another_seed_pooled_scene_by_scene(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(checkpoint, "descends_from", lambda commit, ancestor: commit != "unseeded")
    reference, default = trial_plan.REFERENCE, trial_plan.DEFAULT
    hidden = {"method": "relevance", "relevance_hidden": 256}
    first, second = tmp_path / "seed-1", tmp_path / "seed-2"
    _finished_run(first, reference, 300, [1] * 10)
    _finished_run(first, default, 300, [1] * 8 + [0] * 2, settings=hidden)
    _finished_run(first, "distinct (prompt-blind)", 300, [0] * 10)  # one fine-tune: no mean row
    # The checkpoint with its images blanked, on fewer scenes: not fine-tuned, so left out.
    _finished_run(first, metaworld_plan.BLANKED, 300, [0] * 5, episodes=5)
    _finished_run(second, reference, 300, [1] * 9 + [0], seed=200_000)
    # The same settings under the name they had then: pooled with the default, named in its row.
    _finished_run(second, "relevance, a hidden layer of 256 in the head", 300, [1] * 10, seed=200_000, settings=hidden)
    out = tmp_path / "out"
    assert cli.main(["metaworld", "--compare-seeds", str(second), str(first), "--out", str(out)]) == 0
    report = json.loads((out / "seeds.json").read_text())
    rows = {(r["variant"], r["seed"]): r for r in report["rows"]}
    assert list(rows) == [
        (reference, 100_000),
        (reference, 200_000),
        (reference, "all"),
        (default, 100_000),
        (default, 200_000),
        (default, "all"),
        ("distinct (prompt-blind)", 100_000),
    ]
    # The reference's two fine-tunes average 0.95 a scene: 1 on the first nine, 0.5 on the last.
    assert rows[reference, "all"]["success"] == pytest.approx(0.95) and "gap_to_reference" not in rows[reference, "all"]
    assert rows[default, 100_000]["gap_to_reference"]["points"] == pytest.approx(15.0)  # 95 - 80
    assert rows[default, 200_000]["gap_to_reference"]["points"] == pytest.approx(-5.0)  # 95 - 100
    mean = rows[default, "all"]["gap_to_reference"]
    assert mean["points"] == pytest.approx(5.0) and mean["low"] <= 5.0 <= mean["high"]
    # Scene 8: 1 against 0.5, leaning to the reference; scene 9: 0.5 both, leaning to neither.
    assert (mean["reference_only"], mean["variant_only"]) == (1, 0)
    assert rows[default, 200_000]["name_in_folder"] == "relevance, a hidden layer of 256 in the head"
    assert rows["distinct (prompt-blind)", 100_000]["gap_to_reference"]["points"] == pytest.approx(95.0)
    table = (out / "seeds.md").read_text()
    assert "(fine-tune seed 100000)" in table and "| default (relevance) | **mean** | 90.0% [" in table
    assert "| default (relevance) (`relevance, a hidden layer of 256 in the head`) | 200000 | 100.0% [" in table
    assert (out / "seeds.png").stat().st_size > 0
    # Runs of another policy or plan, on unseeded scenes, or two folders of one seed are refused.
    with pytest.raises(SystemExit, match="one fine-tune seed a folder"):
        metaworld_report.compare_seeds([str(first), str(first)], str(out))
    _finished_run(second, reference, 600, [1] * 10, seed=200_000)
    with pytest.raises(SystemExit, match="differ in more than their fine-tunes' seed"):
        metaworld_report.compare_seeds([str(first), str(second)], str(out))
    _finished_run(second, reference, 300, [1] * 10, seed=200_000, commit="unseeded")
    with pytest.raises(SystemExit, match="runs on unseeded scenes cannot be paired"):
        metaworld_report.compare_seeds([str(first), str(second)], str(out))
    _finished_run(second, reference, 300, [1] * 10, seed=200_000)
    _finished_run(second, default, 300, [1] * 10, seed=200_000, settings=hidden)
    with pytest.raises(SystemExit, match="ran with the same settings and seed as"):
        metaworld_report.compare_seeds([str(first), str(second)], str(out))
    assert cli.main(["metaworld", "--compare-seeds", str(first), "--only", reference]) == 2
    assert "--compare-seeds summarises finished runs" in capsys.readouterr().err


def test_the_seeds_picture_draws_each_fine_tune_on_a_line_of_its_own(tmp_path, monkeypatch):
    from openpi_prune.tools.lab import pictures

    def gap(points):
        return {"points": points, "low": points - 2.0, "high": points + 2.0}

    rows = [
        {"variant": "reference (unpruned)", "seed": 100_000},
        *({"variant": "default", "seed": s, "gap_to_reference": gap(p)} for s, p in [(1, 3.0), (2, 3.0), (3, 6.0)]),
        {"variant": "default", "seed": "all", "gap_to_reference": gap(4.0)},
        {"variant": "distinct", "seed": 1, "gap_to_reference": gap(16.0)},
    ]
    figures = []
    monkeypatch.setattr(pictures.plt, "close", figures.append)
    pictures.gaps_by_fine_tune(rows, tmp_path / "seeds.png")
    (ax,) = figures[0].axes
    drawn = sorted(
        (float(c.lines[0].get_xdata()[0]), float(c.lines[0].get_ydata()[0]), c.lines[0].get_marker())
        for c in ax.containers
        if len(c.lines[0].get_xdata())  # the legend's empty entries
    )
    # The reference has no gap: two variants, one row each, the default's three fine-tunes apart
    # (two of them at the same 3.0) above their mean's diamond.
    assert [t.get_text() for t in ax.get_yticklabels()] == ["default", "distinct"]
    default = [(x, y, m) for x, y, m in drawn if y < 0.5]
    assert [x for x, _, m in default if m == "o"] == [3.0, 3.0, 6.0]
    assert len({y for _, y, m in default if m == "o"}) == 3 and all(y < 0 for _, y, m in default if m == "o")
    assert [(x, y) for x, y, m in default if m == "D"] == [(4.0, 0.2)]
    assert [(x, m) for x, y, m in drawn if y > 0.5] == [(16.0, "o")]
    assert (tmp_path / "seeds.png").stat().st_size > 0


def test_git_tells_which_runs_descend_from_a_commit():
    assert checkpoint.descends_from("HEAD", "HEAD")
    assert not checkpoint.descends_from("HEAD", "0" * 40)


def test_a_reset_seed_is_one_scene_on_every_run():
    """MT1 draws its object positions when it is made: unseeded, seed 10,000 was another scene in each
    process, so no two runs met the same episodes."""
    metaworld.require_rendering()

    def start(seed: int) -> np.ndarray:
        env = metaworld.make_env("drawer-open-v3", SPEC, seed)
        try:
            return env.reset(seed=seed)[0]
        finally:
            env.close()

    assert np.array_equal(start(10_000), start(10_000))
    assert not np.array_equal(start(10_000), start(10_001))


def test_an_environment_is_made_in_a_fresh_process_without_importing_metaworld_first():
    metaworld.require_rendering()  # the libraries are there: what is tested is the registration
    code = (
        "from openpi_prune.tools.lab import metaworld as m; m.make_env('drawer-open-v3', m.MetaWorldSpec(), 0).close()"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_without_headless_rendering_the_error_names_the_libraries(monkeypatch):
    import mujoco

    def no_display(*args, **kwargs):
        raise RuntimeError("cannot initialize EGL display")

    monkeypatch.setattr(mujoco, "GLContext", no_display)
    with pytest.raises(metaworld.SuiteError, match="apt-get install -y libegl1 libgl1-mesa-dri"):
        metaworld.require_rendering()


ONLY = ["unpruned checkpoint", "default (relevance)"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The quick pipeline once for this module: a policy trained, the default fine-tuned from it, both
    closed loops through OpenPI's server; the tests below read it and run their recipes beside it."""
    out = tmp_path_factory.mktemp("metaworld")
    return out, metaworld_trial.run(out=str(out), quick=True, only=ONLY)


def _closed_loop(folder, name: str) -> dict:
    return json.loads((folder / "closed-loop" / f"{slug(name)}.json").read_text())


@pytest.fixture(scope="module")
def moved(quick_run):
    """The trained policy with one tensor moved: other unpruned weights to fine-tune or distil from."""
    out, _ = quick_run
    with np.load(out / "baseline" / "params.npz") as saved:
        weights = dict(saved)
    first_key = sorted(weights)[0]
    weights[first_key] = weights[first_key] + 0.01
    np.savez(out / "moved.npz", **weights)
    return out / "moved.npz", first_key, weights[first_key]


def _common(out) -> dict:
    return dict(quick=True, baseline_dir=str(out / "baseline"), episodes_dir=str(out / "episodes"))


def test_closed_loop_through_openpi_s_server_and_client(quick_run):
    tmp_path, report = quick_run
    plan = metaworld_plan.quick_plan(tmp_path)
    assert set(report["variants"]) == set(ONLY)
    for name in ONLY:
        (episode,) = _closed_loop(tmp_path, name)["episodes"]
        # Every call returned a chunk; `replan` of its actions ran before the next call.
        assert len(episode["call_seconds"]) == -(-episode["steps"] // plan.spec.replan)
        assert episode["steps"] == plan.spec.max_steps or episode["success"]
    # The pruned policy's responses carried what the server kept.
    kept = report["variants"]["default (relevance)"]["kept_per_camera"]
    assert len(kept) == 2 and 0 < sum(kept) <= 2 * 64
    assert report["variants"]["unpruned checkpoint"]["kept_per_camera"] is None
    # The closed loops left the expert episodes behind (a second process fine-tunes in that memory).
    assert not metaworld._episodes
    for name in ("results.md", "success.png", "first-calls.png", "validation-curves.png", "baseline/params.npz"):
        assert (tmp_path / name).stat().st_size > 0
    # One episode of each variant as an animation, a frame per call, the pruned one with its kept patches.
    from PIL import Image

    for name in ONLY:
        run = _closed_loop(tmp_path, name)
        gif = Image.open(tmp_path / "animations" / f"{slug(name)}.gif")
        assert gif.n_frames == len(run["episodes"][0]["call_seconds"]) and gif.size == (2 * 224, 224)
        # Each task's first episode, a few calls, on one sheet.
        assert Image.open(tmp_path / "animations" / f"{slug(name)}-by-task.png").size[0] > 448
    with np.load(tmp_path / "animations" / f"{slug('default (relevance)')}-first-call.npz") as call:
        assert call["kept_patches"].shape == (2, 64)  # both live cameras, 8 x 8 patches each
        assert call["kept_patches"].sum() == 26  # 20 % of the 128 live patches, rounded up
        assert call["merged_patches"].shape == (2, 64) and not call["merged_patches"].any()  # the default merges none
    # Each episode names the weights that ran it: the fine-tuned variant's own, not the checkpoint's.
    digests = {name: _closed_loop(tmp_path, name)["weights"] for name in ONLY}
    assert len(set(digests.values())) == 2
    for name in ONLY:
        assert {e["weights"] for e in _closed_loop(tmp_path, name)["episodes"]} == {digests[name]}
    # The fine-tuned variant is kept as what fine-tuning changed, and loads as the weights its episodes name.
    import openpi_prune
    from openpi_prune.tools.lab import train

    with openpi_prune.enabled(trial_plan.settings_for(metaworld_plan.VARIANTS["default (relevance)"])):
        saved = checkpoint.load_trained(tmp_path / "finetuned" / "default-relevance.npz", plan.spec, pruned=True)
        reloaded = train.params_of(train.load(plan.spec, saved))
    assert checkpoint.digest(reloaded) == digests["default (relevance)"]
    # Its learning curve on the validation reset seeds; its training state is gone once it is done.
    curve = json.loads((tmp_path / "finetuned" / "default-relevance.curve.json").read_text())
    assert [point["step"] for point in curve] == [1, 2] and all(point["validation_action_mse"] > 0 for point in curve)
    assert not list((tmp_path / "finetuned").glob("*.training-state.npz"))
    # Done variants leave no partial episode file.
    assert not list((tmp_path / "closed-loop").glob("*.partial.jsonl"))
    # The expert episodes are cached on disk, each one a success.
    episodes = sorted(p for p in (tmp_path / "episodes").rglob("*.npz") if int(p.stem) < metaworld.VALIDATION_SEEDS)
    assert len(episodes) == plan.spec.train_seeds and all(np.load(p)["success"] for p in episodes)


def test_another_plan_in_the_same_folder_is_refused_before_anything_runs(quick_run, moved):
    tmp_path, _ = quick_run
    with pytest.raises(SystemExit, match="another --out"):
        metaworld_trial.run(out=str(tmp_path), quick=True, only=ONLY, finetune_steps=3)
    with pytest.raises(SystemExit, match="another --out"):  # a second fine-tune, other batches and draws
        metaworld_trial.run(out=str(tmp_path), quick=True, only=ONLY, finetune_seed=7)
    with pytest.raises(SystemExit, match="fine-tuned from the trained policy.*another --out"):
        metaworld_trial.run(out=str(tmp_path), quick=True, only=ONLY, finetune_from=str(moved[0]))
    with pytest.raises(SystemExit, match="the expert's actions.*another --out"):
        metaworld_trial.run(out=str(tmp_path), quick=True, only=ONLY, teacher=str(moved[0]))
    # A pruned variant's fine-tune is no unpruned policy to start from or learn from; a missing file is named.
    refused = dict(out=str(tmp_path / "refused"), only=["default (relevance)"], **_common(tmp_path))
    pruned = str(tmp_path / "finetuned" / "default-relevance.npz")
    with pytest.raises(metaworld.SuiteError, match="--finetune-from .*default-relevance.npz.*lacks"):
        metaworld_trial.run(finetune_from=pruned, **refused)
    with pytest.raises(metaworld.SuiteError, match="--finetune-from .*none.npz: no such file"):
        metaworld_trial.run(finetune_from=str(tmp_path / "none.npz"), **refused)
    with pytest.raises(metaworld.SuiteError, match="--teacher .*default-relevance.npz.*lacks"):
        metaworld_trial.run(teacher=pruned, **refused)


@pytest.mark.slow  # a fine-tune and a closed loop more
def test_a_longer_fine_tune_goes_to_another_out_from_the_same_policy(quick_run):
    tmp_path, _ = quick_run
    other = tmp_path / "three-steps"
    metaworld_trial.run(out=str(other), only=["default (relevance)"], finetune_steps=3, **_common(tmp_path))
    longer, first = (_closed_loop(folder, "default (relevance)") for folder in (other, tmp_path))
    assert longer["baseline"] == first["baseline"] and longer["plan"]["finetune"]["steps"] == 3
    assert not (other / "baseline").exists()  # no second policy trained
    curve = json.loads((other / "finetuned" / "default-relevance.curve.json").read_text())
    assert [point["step"] for point in curve] == [1, 2, 3]


@pytest.mark.slow  # a fine-tune and a closed loop more
def test_a_fine_tune_from_other_unpruned_weights_starts_from_them(quick_run, moved):
    # LightVLA's recipe: a policy already fine-tuned; here the trained one with one tensor moved.
    from flax import traverse_util

    tmp_path, _ = quick_run
    path, first_key, moved_tensor = moved
    plan = metaworld_plan.quick_plan(tmp_path)
    start = traverse_util.flatten_dict(checkpoint.load_trained(path, plan.spec), sep="/")
    assert np.array_equal(start[first_key], moved_tensor)
    recipe = tmp_path / "from-moved"
    metaworld_trial.run(out=str(recipe), only=["default (relevance)"], finetune_from=str(path), **_common(tmp_path))
    pruned, first = (_closed_loop(folder, "default (relevance)") for folder in (recipe, tmp_path))
    assert pruned["finetuned_from"] == checkpoint.digest(traverse_util.unflatten_dict(start, sep="/"))
    assert pruned["finetuned_from"] != first["finetuned_from"] == first["baseline"] == pruned["baseline"]
    assert pruned["weights"] != first["weights"]


@pytest.mark.slow  # a fine-tune and a closed loop more
def test_a_fine_tune_distilled_from_unpruned_weights_learns_their_actions(quick_run, moved):
    tmp_path, _ = quick_run
    taught = tmp_path / "taught"
    metaworld_trial.run(out=str(taught), only=["default (relevance)"], teacher=str(moved[0]), **_common(tmp_path))
    distilled, first = (_closed_loop(folder, "default (relevance)") for folder in (taught, tmp_path))
    assert distilled["plan"]["teacher"] == str(moved[0])
    assert distilled["finetuned_from"] == first["finetuned_from"]  # the same start, other targets
    assert distilled["weights"] != first["weights"]


@pytest.mark.slow  # renders validation episodes and scores every variant's weights at each share
def test_the_action_mse_check_on_validation_seeds_no_run_trained_on(quick_run):
    # Every variant's weights as they run, and the default's at the shares asked for (its own share:
    # its own figure).
    tmp_path, _ = quick_run
    plan = metaworld_plan.quick_plan(tmp_path)
    check = metaworld_trial.action_mse(out=str(tmp_path), quick=True, shares=[0.2, 1.0], validation_episodes=1)
    assert check["validation_seeds"] == [metaworld.VALIDATION_SEEDS, metaworld.VALIDATION_SEEDS + 1]
    assert (tmp_path / "episodes" / plan.spec.tasks[0] / f"{metaworld.VALIDATION_SEEDS}.npz").exists()
    rows = check["rows"]
    assert list(rows) == [
        "unpruned checkpoint",
        "default (relevance)",
        "  its weights, 20% kept",
        "  its weights, 100% kept",
    ]
    assert rows["  its weights, 20% kept"] == rows["default (relevance)"]
    assert rows["  its weights, 100% kept"] != rows["default (relevance)"]
    assert all(np.isfinite(list(row.values())).all() and row["all"] > 0 for row in rows.values())
    assert "| unpruned checkpoint |" in (tmp_path / "action-mse.md").read_text()
    # Each fine-tuned head beside the saliency it learns from (the share rows are not heads of their own).
    agreement = check["saliency_agreement"]
    assert list(agreement) == ["default (relevance)"]
    assert all(0 <= share <= 1 for share in agreement["default (relevance)"].values())
    assert "| default (relevance) | " in (tmp_path / "action-mse.md").read_text().split("| head |")[1]
    # Another variant's weights at each share are asked for by name, its rows named after it. Here the
    # default's weights under a variant with the default's settings (named before the default took them).
    hidden = "relevance, a hidden layer of 256 in the head"
    finetuned = tmp_path / "finetuned"
    (finetuned / f"{slug(hidden)}.npz").write_bytes((finetuned / "default-relevance.npz").read_bytes())
    named = metaworld_trial.action_mse(
        out=str(tmp_path), quick=True, shares=[0.2, 1.0], validation_episodes=1, shares_of=[hidden]
    )["rows"]
    assert f"  its weights, 20% kept ({hidden})" in named and "  its weights, 20% kept" not in named
    assert named[f"  its weights, 20% kept ({hidden})"] == named[hidden] == named["default (relevance)"]
    assert named[f"  its weights, 100% kept ({hidden})"] != named[hidden]
    (finetuned / f"{slug(hidden)}.npz").unlink()
    # One not fine-tuned here is refused.
    with pytest.raises(metaworld.SuiteError, match="--shares-of verbatim LightVLA: no fine-tuned weights"):
        metaworld_trial.action_mse(out=str(tmp_path), quick=True, shares_of=["verbatim LightVLA"])


def test_a_run_with_only_a_closed_loop_left_renders_no_expert_episode(quick_run):
    # Last in this module: it moves the expert episodes away. A resumed run serves from the files alone.
    tmp_path, _ = quick_run
    digest = _closed_loop(tmp_path, "default (relevance)")["weights"]
    (tmp_path / "closed-loop" / "default-relevance.json").unlink()
    (tmp_path / "episodes").rename(tmp_path / "episodes-elsewhere")
    metaworld_trial.run(out=str(tmp_path), quick=True, only=["default (relevance)"])
    assert not (tmp_path / "episodes").exists()
    rerun = _closed_loop(tmp_path, "default (relevance)")
    assert rerun["weights"] == digest and len(rerun["episodes"]) == metaworld_plan.quick_plan(tmp_path).episodes


def test_a_resumed_variant_refuses_episodes_of_other_weights(tmp_path):
    plan = metaworld_plan.quick_plan(tmp_path)
    partial = tmp_path / "closed-loop" / "default-relevance.partial.jsonl"
    partial.parent.mkdir(parents=True)
    episode = {"task": plan.spec.tasks[0], "seed": 10_000, "success": True, "steps": 3}
    partial.write_text(json.dumps(episode | {"weights": "0123abcd"}) + "\n")
    with pytest.raises(SystemExit, match="other weights \\(0123abcd\\) than default \\(relevance\\)'s now"):
        metaworld_trial.evaluate(None, plan, "default (relevance)", None, tmp_path, weights="feedbeef")


def test_expert_episodes_are_kept_outside_the_checkout_by_what_shapes_them(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    full = metaworld.episode_cache(SPEC)
    assert full.is_relative_to(tmp_path / "openpi-prune" / "metaworld-episodes")
    assert metaworld.episode_cache(SPEC) == full
    # Episodes of another length or image size are other episodes; other tasks or seeds are other files.
    assert metaworld.episode_cache(metaworld_plan.quick_plan(tmp_path).spec) != full
    assert metaworld.episode_cache(metaworld.MetaWorldSpec(image_size=112)) != full
    assert metaworld.episode_cache(metaworld.MetaWorldSpec(tasks=("drawer-open-v3",), train_seeds=3)) == full


def test_a_run_made_with_uncommitted_changes_to_the_package_says_so(tmp_path, tmp_path_factory):
    def git(*args):
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True)

    package = tmp_path / "openpi_prune"
    package.mkdir()
    (package / "code.py").write_text("x = 1\n")
    (tmp_path / "README.md").write_text("notes\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    head = git("rev-parse", "HEAD").stdout.strip()
    read = checkpoint._read_commit
    assert read(package) == head
    (tmp_path / "README.md").write_text("other notes\n")  # outside the package: the code is the same
    assert read(package) == head
    (package / "code.py").write_text("x = 2\n")
    assert read(package) == head + "+dirty"
    assert read(tmp_path_factory.mktemp("not-a-checkout")) == "unknown (not a git checkout)"


def test_a_run_records_the_commit_its_code_was_loaded_from(monkeypatch):
    # A commit made while a long run goes on must not be taken for the code it runs.
    loaded = checkpoint.commit()
    monkeypatch.setattr(checkpoint.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(OSError))
    assert checkpoint.commit() == loaded


def test_a_folder_without_a_reference_pairs_with_another_s_on_the_same_scenes(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "descends_from", lambda commit, ancestor: True)
    task = "button-press-topdown-v3"
    plan = metaworld_plan.SuitePlan(spec=metaworld.MetaWorldSpec(tasks=(task,)))

    def finished(folder, name, wins):
        episodes = [
            {"task": task, "seed": k, "success": w, "call_seconds": [1.0, 0.02], "kept_per_camera": [[9, 17, 0]]}
            for k, w in enumerate(wins)
        ]
        path = folder / "closed-loop" / f"{slug(name)}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"commit": "c0ffee0", "episodes": episodes}))

    finished(tmp_path / "reference-run", trial_plan.REFERENCE, [1] * 10)
    finished(tmp_path / "recipe", trial_plan.DEFAULT, [1] * 8 + [0, 0])
    alone = metaworld_report.summarise(tmp_path / "recipe", plan)
    assert "paired_gap" not in alone["variants"][trial_plan.DEFAULT]
    report = metaworld_report.summarise(tmp_path / "recipe", plan, str(tmp_path / "reference-run"))
    gap = report["variants"][trial_plan.DEFAULT]["paired_gap"]
    assert gap["points"] == pytest.approx(20.0) and (gap["reference_only"], gap["variant_only"]) == (2, 0)
    assert list(report["variants"]) == [trial_plan.DEFAULT]  # the borrowed run is no row
    table = (tmp_path / "recipe" / "results.md").read_text()
    assert "| 20.0 [" in table and f"reference (unpruned) of `{tmp_path / 'reference-run'}` (by `c0ffee0`)" in table
    with pytest.raises(metaworld.SuiteError, match="--reference-dir .*: no finished reference run"):
        metaworld_report.summarise(tmp_path / "recipe", plan, str(tmp_path / "recipe"))


def test_the_scene_map_places_each_failed_scene_s_object_beside_the_training_scenes(tmp_path, capsys):
    task = "button-press-topdown-v3"  # the quick plan's task, 2 training scenes

    def finished(folder, name, wins):
        episodes = [
            {"task": task, "seed": metaworld.TEST_SEEDS + k, "success": w, "call_seconds": [1.0], "kept_per_camera": []}
            for k, w in enumerate(wins)
        ]
        path = folder / "closed-loop" / f"{slug(name)}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        # Trained on 3 scenes a task (--train-scenes 3): the map draws those, not the plan's default.
        plan = {"spec": {"train_seeds": 3}}
        path.write_text(json.dumps({"commit": "c0ffee0", "episodes": episodes, "plan": plan}))

    with pytest.raises(metaworld.SuiteError, match="no finished closed-loop run"):
        metaworld_report.scene_map(str(tmp_path / "run"), quick=True)
    finished(tmp_path / "reference-run", trial_plan.REFERENCE, [1, 1, 1])
    finished(tmp_path / "run", trial_plan.DEFAULT, [1, 0, 1])
    report = metaworld_report.scene_map(str(tmp_path / "run"), str(tmp_path / "reference-run"), quick=True)
    found = report["tasks"][task]
    spec = metaworld_plan.quick_plan(tmp_path).spec
    assert found["failed"] == {trial_plan.REFERENCE: [], trial_plan.DEFAULT: [10_001]}
    assert found["train"] == [metaworld.object_position(task, seed, spec).tolist() for seed in range(3)]
    assert found["test"][10_001] == metaworld.object_position(task, 10_001, spec).tolist()
    assert found["test"][10_000] != found["test"][10_001]  # each seed its own scene
    assert (tmp_path / "run" / "scene-map.png").stat().st_size > 0
    assert json.loads((tmp_path / "run" / "scene-map.json").read_text())["tasks"][task]["failed"] == found["failed"]
    assert f"{task}, scenes failed: reference (unpruned): 0; default (relevance): 1" in capsys.readouterr().out
    # A run that failed nothing draws no map.
    finished(tmp_path / "all-solved", trial_plan.DEFAULT, [1, 1])
    assert metaworld_report.scene_map(str(tmp_path / "all-solved"), quick=True) == {"tasks": {}}
    assert not (tmp_path / "all-solved" / "scene-map.png").exists()
    # It draws finished runs: an option that would run something is refused.
    assert cli.main(["metaworld", "--out", str(tmp_path / "run"), "--scene-map", "--only", "reference (unpruned)"]) == 2
    assert "--scene-map draws finished runs" in capsys.readouterr().err


def test_another_number_of_training_scenes_is_another_plan(tmp_path):
    """`--train-scenes`: a folder's runs share their training scenes, as their fine-tuning steps."""
    path = tmp_path / "closed-loop" / "reference-unpruned.json"
    path.parent.mkdir(parents=True)
    plan = metaworld_plan.SuitePlan()
    path.write_text(json.dumps({"episodes": [], "plan": dataclasses.asdict(plan)}))
    metaworld_trial._check_same_plan(tmp_path, plan)  # the same plan: goes on
    wider = dataclasses.replace(plan, spec=dataclasses.replace(plan.spec, train_seeds=60))
    with pytest.raises(SystemExit, match="trained on 30 expert episodes per task, and this run's plan on 60"):
        metaworld_trial._check_same_plan(tmp_path, wider)
    with pytest.raises(metaworld.SuiteError, match="--train-scenes must be at least 1"):
        metaworld_trial.run(str(tmp_path / "none"), train_scenes=0)


def test_a_deeper_siglip_is_another_policy_whose_weights_the_shallow_one_refuses(tmp_path, capsys):
    """`--siglip-depth N`: OpenPI's SigLIP built N layers deep (its blocks stacked, as OpenPI scans them),
    its own plan; a checkpoint of one depth is refused by a model of another, by name and shape."""
    from flax import traverse_util

    import openpi_prune
    from openpi_prune.tools.lab import checkpoint, train

    spec = metaworld.MetaWorldSpec()
    deeper = dataclasses.replace(spec, siglip_depth=3)
    kernel = "PaliGemma/img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"
    with openpi_prune.disabled():
        shallow = traverse_util.flatten_dict(train.params_of(train.create(spec)), sep="/")
        deep = traverse_util.flatten_dict(train.params_of(train.create(deeper)), sep="/")
    assert shallow[kernel].shape[0] == 1 and deep[kernel].shape[0] == 3  # mu/28 has one layer
    assert deep[kernel].shape[1:] == shallow[kernel].shape[1:]
    np.savez(tmp_path / "params.npz", **{kernel: np.asarray(shallow[kernel])})
    with pytest.raises(
        SystemExit,
        match=r"holds .*encoderblock.* of shape \(1, 32, 128\), where this model's is \(3, 32, 128\).*--siglip-depth",
    ):
        checkpoint.load_trained(tmp_path / "params.npz", deeper)
    loaded = traverse_util.flatten_dict(checkpoint.load_trained(tmp_path / "params.npz", spec), sep="/")
    np.testing.assert_array_equal(loaded[kernel], shallow[kernel])

    path = tmp_path / "run" / "closed-loop" / "reference-unpruned.json"
    path.parent.mkdir(parents=True)
    plan = metaworld_plan.SuitePlan()
    path.write_text(json.dumps({"episodes": [], "plan": dataclasses.asdict(plan)}))
    with pytest.raises(
        SystemExit, match=r"SigLIP has 1 layer\(s\), and this run's plan 3: give this plan another --out"
    ):
        metaworld_trial._check_same_plan(tmp_path / "run", dataclasses.replace(plan, spec=deeper))
    assert cli.main(["metaworld", "--out", str(tmp_path / "none"), "--siglip-depth", "0"]) == 2
    assert "--siglip-depth must be at least 1" in capsys.readouterr().err
