"""The lab's scenes are what they claim, and its pipeline runs end to end (a few steps only)."""

import dataclasses
import json

import jax
import numpy as np
import pytest

import openpi_prune
from openpi_prune.tools.lab import run, scenes, train


def test_scenes_are_deterministic_and_the_target_is_where_the_masks_say():
    spec = scenes.SceneSpec()
    a, b = scenes.render(7, 6, spec), scenes.render(7, 6, spec)
    for camera in a.images:
        np.testing.assert_array_equal(a.images[camera], b.images[camera])
    assert not np.array_equal(a.images["base_0_rgb"], scenes.render(8, 6, spec).images["base_0_rgb"])
    per = spec.grid**2
    colours = list(scenes.COLOURS)
    for i in range(6):
        colour = np.asarray(scenes.COLOURS[colours[a.target[i]]], np.float32)
        # The prompt names the target's colour.
        assert scenes.WORDS[colours[a.target[i]]] in a.tokens[i][a.token_mask[i]].tolist()
        for c, camera in enumerate(scenes.TABLES):
            mask = a.target_mask[i, c * per : (c + 1) * per].reshape(spec.grid, spec.grid)
            assert mask.sum() == spec.block**2
            patches = a.images[camera][i].reshape(spec.grid, spec.patch, spec.grid, spec.patch, 3)
            means = patches.mean(axis=(1, 3))
            np.testing.assert_allclose(means[mask], np.broadcast_to(colour, means[mask].shape), atol=1e-4)
            # No other patch has the target's colour.
            assert np.abs(means[~mask] - colour).max(-1).min() > 0.5
        assert not a.target_mask[i, 2 * per :].any(), "the masked camera has no target"
        # The wrist camera sees the table transposed.
        base = a.target_mask[i, :per].reshape(spec.grid, spec.grid)
        np.testing.assert_array_equal(a.target_mask[i, per : 2 * per].reshape(spec.grid, spec.grid), base.T)
    # The chunk moves from the origin toward the target: its last step is the target's centre.
    rows, cols = np.nonzero(a.target_mask[0, :per].reshape(spec.grid, spec.grid))
    centre = (np.array([cols.mean(), rows.mean()]) + 0.5) / spec.grid * 2 - 1
    np.testing.assert_allclose(a.actions[0, -1], centre, atol=1e-6)
    assert np.all(np.diff(np.linalg.norm(a.actions[0], axis=-1)) > 0)


def test_single_object_curriculum_has_no_distractors():
    spec = scenes.SceneSpec()
    one = scenes.render(3, 4, spec, objects=1)
    coloured = np.abs(one.images["base_0_rgb"]).max(-1) > 0.7
    assert np.all(coloured.reshape(4, -1).sum(-1) == (spec.block * spec.patch) ** 2)


@pytest.mark.slow
def test_lab_pipeline_writes_its_table_and_pictures(tmp_path):
    only = ["unpruned, fine-tuned", "language_only (verbatim LightVLA)", "scheme_a", "action_queries + robust"]
    report = run.run(out=str(tmp_path), quick=True, only=only)
    results = report["results"]
    assert set(results) == {"unpruned", *only}
    for name in only[1:]:
        row = results[name]
        assert 0 <= row["kept_min"] <= row["kept_mean"] <= row["kept_max"] <= 64
        assert 0 <= row["target_recall"] <= 1
        assert np.isfinite(row["val_mse"]) and np.isfinite(row["kept_shared_direction"])
        assert len(report["histories"][name]) == run.QUICK.finetune.steps
        assert {"loss", "kept", "query_spread"} <= set(report["histories"][name][0])
    for name in ("results.md", "results.json", "kept_patches.png", "training.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text())["results"].keys() == results.keys()
    assert "action_queries + robust" in (tmp_path / "results.md").read_text()
    # A second run reuses the trained baseline (as users fine-tune from a checkpoint).
    again = run.run(out=str(tmp_path), quick=True, only=only[:1])
    assert again["results"]["unpruned"] == results["unpruned"]
    assert (tmp_path / "finetuned" / "unpruned-fine-tuned" / "params").is_dir()
    # A fine-tuned variant's params, its pruner's own included, evaluate again as the run did.
    name = "action_queries + robust"
    with openpi_prune.enabled(run._settings(run.VARIANTS[name])):
        params = train.restore_params(tmp_path / "finetuned" / run.slug(name) / "params", run.QUICK.spec)
        val = train.validation(run.QUICK.spec, run.QUICK.validation)
        again_mse = train.evaluate(train.load(run.QUICK.spec, params), run.QUICK.spec, val, 1.0).mse
    assert again_mse == pytest.approx(results[name]["val_mse"], rel=1e-5)
    assert all("val_mse_vs_mean" in h for h in again["histories"]["unpruned, fine-tuned"])  # checked each step
    # Another seed draws other fine-tuning batches; a larger validation set is evaluated as asked.
    other = run.run(out=str(tmp_path), quick=True, only=only[:1], seed=1, validation=6)
    assert other["plan"]["validation"] == 6 and other["plan"]["finetune"]["seed"] == run.QUICK.finetune.seed + 1
    assert (
        other["histories"]["unpruned, fine-tuned"][0]["loss"] != again["histories"]["unpruned, fine-tuned"][0]["loss"]
    )


def test_an_interrupted_training_run_resumes_with_the_same_updates(tmp_path, monkeypatch):
    spec = run.QUICK.spec
    schedule = train.Schedule(steps=4, lr=1e-3, batch_size=2, warmup=1)
    whole = train.create(spec)
    whole_history = train.train(whole, spec, schedule)

    class Interrupted(Exception):
        pass

    render = scenes.render

    def render_until_step_2(seed, *args, **kwargs):
        if seed >= 2:
            raise Interrupted
        return render(seed, *args, **kwargs)

    state = tmp_path / "training-state.npz"
    monkeypatch.setattr(train, "SAVE_SECONDS", -1)  # save after every step
    monkeypatch.setattr(scenes, "render", render_until_step_2)
    with pytest.raises(Interrupted):
        train.train(train.create(spec), spec, schedule, resume=state)
    monkeypatch.setattr(scenes, "render", render)
    resumed = train.create(spec)
    history = train.train(resumed, spec, schedule, resume=state)
    assert [h["loss"] for h in history] == [h["loss"] for h in whole_history]
    for a, b in zip(jax.tree.leaves(train.params_of(whole)), jax.tree.leaves(train.params_of(resumed)), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="another schedule"):
        train.train(train.create(spec), spec, dataclasses.replace(schedule, steps=5), resume=state)


def test_a_sampler_is_compiled_per_parameter_shape_not_per_tree_layout():
    """Two models whose parameters differ only in a size (an action dimension) get samplers of their
    own; a copy of the same shapes reuses its model's."""
    from flax import nnx

    from openpi_prune.tools.lab import train

    narrow, wide, copy = (nnx.split(nnx.Linear(2, k, rngs=nnx.Rngs(seed))) for k, seed in ((2, 0), (4, 0), (2, 1)))
    assert train._sampler(*narrow, 10) is not train._sampler(*wide, 10)
    assert train._sampler(*narrow, 10) is train._sampler(*copy, 10)


def test_the_head_s_loss_is_reported_over_the_samples_whose_saliency_ran():
    """With the saliency of half of each batch, the other half's pruner loss is zero: the reported
    `distill_loss` is the mean over the half that learnt, and the batch's loss holds half of it."""
    spec = run.QUICK.spec
    schedule = train.Schedule(steps=2, lr=1e-3, batch_size=4, warmup=1)
    settings = openpi_prune.PruneSettings(saliency_every=1, saliency_share=0.5)
    with openpi_prune.enabled(settings):
        history = train.train(train.create(spec), spec, schedule)
    for step in history:
        assert step["distill_loss"] > 0
        assert step["loss"] == pytest.approx(step["action_loss"] + 0.5 * step["distill_loss"], rel=1e-5)


def test_a_teacher_s_actions_from_the_loss_s_own_noise_are_the_targets():
    """`--teacher`: the targets are the unpruned teacher's samples from the noise `compute_loss` draws,
    even while the student is pruned; the teacher is not trained."""
    import jax.numpy as jnp

    from openpi_prune.adapter import wrappers

    spec = run.QUICK.spec
    openpi_prune.disable()
    teacher = train.create(spec, seed=1)
    batch = scenes.render(0, 2, spec)
    observation, actions = batch.observation(), jnp.asarray(batch.actions)
    rng = jax.random.key(3)
    unpruned = teacher.sample_actions(rng, observation, noise=wrappers.flow_draws(rng, actions)[0])
    teacher_params = jax.tree.leaves(train.params_of(teacher))
    schedule = train.Schedule(steps=2, lr=1e-3, batch_size=2, warmup=1)
    with openpi_prune.enabled(method="relevance", keep_fraction=0.1):
        targets = jax.jit(lambda o, a: train.teacher_targets(teacher, rng, o, a))(observation, actions)
        assert openpi_prune.is_enabled()  # the teacher's block restored the student's pruning
        taught = train.train(train.create(spec), spec, schedule, teacher=teacher)
        expert = train.train(train.create(spec), spec, schedule)
    np.testing.assert_allclose(targets, unpruned, atol=1e-5)
    assert not np.allclose(targets, actions, atol=1e-2)  # another target than the batch's
    # The same student, batches and draws: only the targets differ, so the losses do.
    assert all(np.isfinite(h["loss"]) for h in taught)
    assert [h["loss"] for h in taught] != [h["loss"] for h in expert]
    for before, after in zip(teacher_params, jax.tree.leaves(train.params_of(teacher)), strict=True):
        np.testing.assert_array_equal(before, after)
