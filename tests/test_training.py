"""Training a pruned model: the schedules the settings carry, counted by the model's own step through
OpenPI's train state and checkpoints; the saliency on every k-th step; the compact training pass."""

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from openpi.training import checkpoints, data_loader

import openpi_prune
from openpi_prune import telemetry
from openpi_prune.adapter import training
from openpi_prune.tools import small

EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"


def _kept_at(step: int) -> telemetry.Telemetry:
    jax.effects_barrier()
    telemetry.DELIVERY.flush(timeout=30)
    reports = [r for r in telemetry.recent() if r.mode == "train" and int(r.training_step[0]) == step]
    assert reports, f"no training report for step {step}"
    return reports[-1]


def test_a_train_step_with_no_openpi_prune_call_ramps_and_resumes_from_a_checkpoint(tmp_path, monkeypatch, caplog):
    """The twin's settings carry the ramp; `train_twin.train_step` is written as OpenPI's
    `scripts/train.py` writes it. Its kept share follows the hand-written schedule step by step, and
    after a restart from OpenPI's checkpoint it goes on from where it was, not from the start."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import train_twin

    steps, restart = 8, 5
    config = train_twin.train_config(tmp_path, steps)
    ramp = config.model.prune.keep_ramp_steps
    assert ramp == 2
    train_twin.write_plain_checkpoint(tmp_path / "plain" / "params")
    loader = data_loader.create_data_loader(config, shuffle=True, num_batches=steps)
    batches = iter(loader)
    step_fn = jax.jit(lambda rng, state, batch: train_twin.train_step(config, rng, state, batch))
    rng = jax.random.key(1)
    manager, _ = checkpoints.initialize_checkpoint_dir(
        config.checkpoint_dir, keep_period=None, overwrite=True, resume=False
    )

    def hand_written(step: int, live) -> np.ndarray:  # what examples/train_twin.py computed in its step
        share = openpi_prune.gradual_keep_fraction(step, ramp, config.model.prune.keep_fraction)
        return np.asarray(jnp.maximum(jnp.ceil(share * live), 1)).astype(int)

    state = train_twin.init_train_state(config, jax.random.key(config.seed))
    assert int(state.params[training.STEP].value) == 0  # the plain checkpoint has none: from 0
    telemetry.clear()
    with caplog.at_level("INFO", logger="openpi_prune"):
        for step in range(restart):
            state, _ = step_fn(rng, state, next(batches))
            report = _kept_at(step)
            np.testing.assert_array_equal(report.kept, hand_written(step, report.candidates))
        checkpoints.save_state(manager, state, loader, restart)
        manager.wait_until_finished()

        # A new process: a fresh train state, restored from the checkpoint.
        fresh = train_twin.init_train_state(config, jax.random.key(config.seed))
        # The optimizer is a static field of TrainState, matched by identity: this process's, so the step
        # compiled above serves the restored state (a new process compiles once anyway).
        fresh = dataclasses.replace(fresh, tx=state.tx)
        resumed = train_twin.on_mesh(config, checkpoints.restore_state(manager, fresh, loader, restart))
        assert int(resumed.params[training.STEP].value) == restart
        for step in range(restart, steps):
            resumed, _ = step_fn(rng, resumed, next(batches))
            report = _kept_at(step)
            np.testing.assert_array_equal(report.kept, hand_written(step, report.candidates))
    assert report.kept[0] == np.ceil(0.2 * report.candidates[0])  # past the ramp: the setting's share
    assert step_fn._cache_size() == 1  # one compile serves the first state, its outputs and the restored one
    # The pruner's line in the training log, every `log_every` (2) steps, with no code for it.
    lines = [r.getMessage() for r in caplog.records if "openpi-prune at training step" in r.getMessage()]
    assert [int(line.split("step ")[1].split(":")[0]) for line in lines] == [1, 3, 5, 7], lines
    assert "kept per camera" in lines[-1] and "head's loss" in lines[-1]


@pytest.fixture(scope="module")
def relevance_model():
    with openpi_prune.enabled(method="relevance", telemetry=False, warn_below=0):
        return small.create(small.config(pi05=True, max_token_len=48))


def _train_pass(model, steps: int = 1, first: int = 2, **changes):
    """Loss, the pruner's figures and the gradients of `steps` training passes (OpenPI's
    `compute_loss(train=True)`) under the relevance defaults plus `changes`, on the `first` samples
    of a batch of 2."""
    cfg = small.config(pi05=True, max_token_len=48)
    observation, actions = jax.tree.map(
        lambda x: x[:first], (small.observation(cfg, batch_size=2, prompt_tokens=16), small.actions(cfg, batch_size=2))
    )
    graphdef, state = nnx.split(model)
    with openpi_prune.enabled(method="relevance", telemetry=False, warn_below=0, **changes):

        @jax.jit
        def one(state):
            m = nnx.merge(graphdef, state)

            def loss_fn(m):
                with telemetry.collect() as reports:
                    loss = jnp.mean(m.compute_loss(jax.random.key(0), observation, actions, train=True))
                return loss, reports[0]

            (loss, report), grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.Param), has_aux=True)(m)
            return loss, report, grads, nnx.state(m)

        passes = []
        for _ in range(steps):
            loss, report, grads, state = one(state)
            passes.append((float(loss), jax.device_get(report), grads))
    return passes


def test_compact_training_gives_the_loss_and_gradients_of_the_full_length_pass(relevance_model):
    [(full_loss, full, full_grads)] = _train_pass(relevance_model, compact_training=False)
    [(compact_loss, compact, compact_grads)] = _train_pass(relevance_model, compact_training=True)
    # Shorter: the kept patches gathered, as at inference (20 % of 768 live patches, and the prompt).
    assert full["prefix_length"][0] == 768 + 48 and compact["prefix_length"][0] == 154 + 48
    np.testing.assert_array_equal(full["kept_mask"], compact["kept_mask"])
    assert compact_loss == pytest.approx(full_loss, rel=1e-5)
    for path in ("prune_relevance_query", "prune_relevance_key"):
        np.testing.assert_allclose(compact_grads[path].value, full_grads[path].value, rtol=1e-4, atol=1e-7)
    # Every gradient alike (SigLIP's key bias, which softmax ignores, has only rounding noise, ~1e-10).
    flat_full, flat_compact = (jax.tree.leaves(g) for g in (full_grads, compact_grads))
    worst = max(
        float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(a)), 1e-6))
        for a, b in zip(flat_full, flat_compact, strict=True)
    )
    assert worst < 1e-3, worst


def test_saliency_every_kth_step_and_the_compact_pass_after_the_ramp(relevance_model):
    passes = _train_pass(relevance_model, steps=4, keep_ramp_steps=2, saliency_every=2, compact_training=True)
    steps = [int(report["training_step"][0]) for _, report, _ in passes]
    assert steps == [0, 1, 2, 3]
    lengths = [int(report["prefix_length"][0]) for _, report, _ in passes]
    assert lengths == [816, 816, 202, 202]  # full length during the ramp, compact after it
    kept = [int(report["kept"][0]) for _, report, _ in passes]
    assert kept == [768, 461, 154, 154]
    distill = [float(np.mean(report["distill_loss"])) for _, report, _ in passes]
    assert distill[0] > 0 and distill[2] > 0 and distill[1] == 0 and distill[3] == 0
    # Without saliency the head gets no gradient that step; with it, it does.
    head = [float(jnp.abs(grads["prune_relevance_query"].value).max()) for _, _, grads in passes]
    assert head[0] > 0 and head[1] == 0


def test_saliency_of_a_share_of_the_batch(relevance_model):
    """saliency_share=0.5: every step, the saliency of the batch's first half only; the head learns
    from those samples exactly as from a batch of them alone, and nothing from the rest."""
    passes = _train_pass(relevance_model, steps=2, saliency_every=1, saliency_share=0.5)
    [(_, alone, _)] = _train_pass(relevance_model, first=1, saliency_every=1)
    for _, report, grads in passes:
        assert report["distill_loss"][0] > 0 and report["distill_loss"][1] == 0
        assert float(jnp.abs(grads["prune_relevance_query"].value).max()) > 0
    np.testing.assert_allclose(passes[0][1]["distill_loss"][0], alone["distill_loss"][0], rtol=1e-5)
