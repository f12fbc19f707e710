"""The `relevance` method: a learned head distilled from the model's own saliency."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import in_both_modes, last_report, two_scenes
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from openpi.models import pi0

import openpi_prune
from openpi_prune import telemetry
from openpi_prune.adapter import prefix
from openpi_prune.pruner import methods, relevance
from openpi_prune.tools import small
from openpi_prune.tools.lab import train as lab_train


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 10_000), fraction=st.floats(0.01, 1.0), live=st.lists(st.booleans(), min_size=24, max_size=24)
)
def test_keep_top_keeps_the_most_relevant_share_of_live_patches(seed, fraction, live):
    scores = jax.random.normal(jax.random.key(seed), (1, 24))
    candidate_mask = jnp.asarray([live])
    kept = np.asarray(relevance.keep_top(scores, candidate_mask, fraction))[0]
    live_count = sum(live)
    assert kept.sum() == (max(math.ceil(fraction * live_count), 1) if live_count else 0)
    assert not (kept & ~np.asarray(live)).any()
    if kept.any() and (~kept & np.asarray(live)).any():
        s = np.asarray(scores)[0]
        assert s[kept].min() >= s[~kept & np.asarray(live)].max()


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    mass=st.floats(0.01, 1.0),
    fraction=st.floats(0.05, 1.0),
    spread=st.floats(0.1, 10.0),
    live=st.lists(st.booleans(), min_size=24, max_size=24),
)
def test_keep_mass_keeps_the_fewest_top_patches_that_hold_the_mass_within_the_share(seed, mass, fraction, spread, live):
    scores = spread * jax.random.normal(jax.random.key(seed), (1, 24))
    candidate_mask = jnp.asarray([live])
    kept = np.asarray(relevance.keep_mass(scores, candidate_mask, mass, fraction))[0]
    live_np, live_count = np.asarray(live), sum(live)
    if not live_count:
        assert not kept.any()
        return
    cap = math.ceil(fraction * live_count)
    assert 1 <= kept.sum() <= cap and not (kept & ~live_np).any()
    s = np.asarray(scores, np.float64)[0]
    if (~kept & live_np).any():
        assert s[kept].min() >= s[~kept & live_np].max(), "the most relevant are kept"
    probs = np.exp(s - s[live_np].max()) * live_np
    probs /= probs.sum()
    held = probs[kept].sum()
    if kept.sum() < cap:
        assert held >= mass - 1e-5, "below the cap, the kept patches hold the mass"
    if kept.sum() > 1:
        assert held - probs[kept].min() < mass + 1e-5, "one fewer would not hold it: the fewest"


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_distillation_is_best_when_relevance_matches_saliency(seed):
    k1, k2 = jax.random.split(jax.random.key(seed))
    saliency = jnp.abs(jax.random.normal(k1, (2, 16))) + 1e-3
    candidate_mask = jnp.arange(16)[None] < jnp.asarray([[16], [9]])
    matched = relevance.distillation_loss(jnp.log(saliency), saliency, candidate_mask)
    other = relevance.distillation_loss(jax.random.normal(k2, (2, 16)), saliency, candidate_mask)
    assert np.all(np.asarray(matched) <= np.asarray(other) + 1e-5)


_observation = two_scenes


def test_saliency_is_the_gradient_of_openpi_s_own_loss_at_each_image_token(relevance_model, monkeypatch):
    cfg, model = relevance_model
    obs, actions = _observation(cfg), small.actions(cfg, batch_size=2)
    rng = jax.random.key(4)
    with openpi_prune.enabled(method="relevance"):
        got = np.asarray(prefix.saliency(lambda: model.compute_loss(rng, obs, actions, train=False)))
    with openpi_prune.enabled(method="relevance", saliency="deviation"):
        deviation = np.asarray(prefix.saliency(lambda: model.compute_loss(rng, obs, actions, train=False)))

    # The same gradient by hand: upstream's compute_loss with a perturbation added to its image tokens.
    image_len = got.shape[1]
    embed = pi0.Pi0.embed_prefix
    delta_box = {}

    def perturbed(self, observation):
        tokens, input_mask, ar_mask = embed(self, observation)
        delta_box["tokens"] = tokens[:, :image_len]
        return tokens.at[:, :image_len].add(delta_box["delta"]), input_mask, ar_mask

    monkeypatch.setattr(pi0.Pi0, "embed_prefix", perturbed)
    width = model.PaliGemma.llm.embedder["input_embedding"].value.shape[-1]

    def total(delta):
        delta_box["delta"] = delta
        return jnp.sum(model.compute_loss(rng, obs, actions, train=False))

    grad = np.asarray(jax.grad(total)(jnp.zeros((2, image_len, width))))
    np.testing.assert_allclose(got, np.linalg.norm(grad, axis=-1), rtol=1e-4, atol=1e-7)
    # saliency=deviation: the loss's first-order change were each token the batch's mean token there.
    tokens = np.asarray(delta_box["tokens"])
    change = np.abs(np.sum(grad * (tokens - tokens.mean(0, keepdims=True)), axis=-1))
    np.testing.assert_allclose(deviation, change, rtol=1e-4, atol=1e-6)
    per_camera = image_len // 3
    # Nothing attends to a masked camera's tokens: the loss cannot depend on them.
    assert np.all(got[1, 2 * per_camera :] == 0)
    assert np.all(got[0, 2 * per_camera :] > 0) and np.all(got[:, : 2 * per_camera] > 0)


@pytest.mark.parametrize("fraction", [0.05, 0.2])
def test_relevance_keeps_its_share_of_live_patches_in_both_modes(relevance_model, fraction):
    cfg, model = relevance_model
    out, reports = in_both_modes(model, cfg, method="relevance", keep_fraction=fraction)
    kept = {mode: report.kept_mask for mode, report in reports.items()}
    live = np.asarray([3, 2]) * (kept["masked"].shape[1] // 3)
    np.testing.assert_array_equal(kept["masked"].sum(-1), np.ceil(fraction * live))
    np.testing.assert_array_equal(kept["masked"], kept["compact"])
    np.testing.assert_allclose(out["masked"], out["compact"], atol=2e-5)
    assert np.isfinite(out["compact"]).all()


def test_adaptive_budget_keeps_per_scene_counts_within_the_compact_capacity(relevance_model):
    cfg, model = relevance_model
    out, reports = in_both_modes(model, cfg, method="relevance", keep_mass=0.5, keep_fraction=0.3)
    kept = {mode: report.kept_mask for mode, report in reports.items()}
    per_camera = kept["masked"].shape[1] // 3
    live = np.asarray([3, 2]) * per_camera
    assert np.all(kept["masked"].sum(-1) >= 1) and np.all(kept["masked"].sum(-1) <= np.ceil(0.3 * live))
    np.testing.assert_array_equal(kept["masked"], kept["compact"])
    np.testing.assert_allclose(out["masked"], out["compact"], atol=2e-5)
    with openpi_prune.enabled(method="relevance", keep_mass=1.0, keep_fraction=0.3, warn_below=0):
        noise = jax.random.normal(jax.random.key(3), (2, cfg.action_horizon, cfg.action_dim))
        model.sample_actions(jax.random.key(0), _observation(cfg), num_steps=2, noise=noise)
        np.testing.assert_array_equal(last_report().kept_mask.sum(-1), np.ceil(0.3 * live))  # all the mass: the cap


def test_relevance_trains_only_its_head_from_saliency_and_hides_what_it_drops(relevance_model):
    cfg, model = relevance_model
    obs, actions = _observation(cfg), small.actions(cfg, batch_size=2)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def losses(p, **settings):
        with openpi_prune.enabled(method="relevance", warn_below=0, **settings):
            return nnx.merge(graphdef, p, rest).compute_loss(jax.random.key(0), obs, actions, train=True)

    with openpi_prune.enabled(method="relevance", warn_below=0):
        grads = jax.grad(lambda p: jnp.mean(losses(p)))(params)
    for name in (methods.RELEVANCE_QUERY, methods.RELEVANCE_KEY):
        assert float(jnp.abs(grads[name].value).sum()) > 0, name
    # The loss is the pruned flow-matching loss plus the distillation term, which a head pointing
    # away from the saliency makes larger; keeping everything hides nothing and adds no term.
    kept_all = np.asarray(losses(params, keep_fraction=1.0))
    pruned = np.asarray(losses(params, keep_fraction=0.1))
    with openpi_prune.disabled():
        upstream = np.asarray(model.compute_loss(jax.random.key(0), obs, actions, train=True))
    # One positive cross-entropy per sample, added to each action step of upstream's loss.
    extra = kept_all - upstream
    assert np.all(extra > 0)
    np.testing.assert_allclose(extra, extra[:, :1].repeat(extra.shape[1], 1), rtol=1e-4)
    assert not np.allclose(pruned, kept_all)


def test_the_hidden_layer_reads_each_patch_beside_its_scene_s_mean_of_live_patches():
    rng = np.random.default_rng(0)
    patches = rng.normal(size=(2, 5, 3)).astype(np.float32)
    live = np.asarray([[1, 1, 0, 1, 0], [1, 1, 1, 1, 1]], bool)
    kernel, bias = rng.normal(size=(6, 4)).astype(np.float32), rng.normal(size=4).astype(np.float32)
    features = np.asarray(relevance.hidden_features(patches, live, kernel, bias))
    for b in range(2):
        scene = patches[b][live[b]].mean(0)
        for i in range(5):
            expected = jax.nn.gelu(np.concatenate([patches[b, i], scene]) @ kernel + bias)
            np.testing.assert_allclose(features[b, i], expected, rtol=1e-5, atol=1e-6)
    # What a dead patch holds does not move the scene's mean.
    changed = patches.copy()
    changed[0, 2] += 100.0
    np.testing.assert_array_equal(
        np.asarray(relevance.hidden_features(changed, live, kernel, bias))[0, live[0]], features[0, live[0]]
    )


def test_a_head_with_a_hidden_layer_trains_all_its_parameters(relevance_hidden_model):
    cfg, model = relevance_hidden_model
    width = getattr(model, methods.RELEVANCE_QUERY).value.shape[0]
    head = {
        methods.RELEVANCE_QUERY: (width, methods.RELEVANCE_RANK),
        methods.RELEVANCE_KEY: (16, methods.RELEVANCE_RANK),
        methods.RELEVANCE_HIDDEN_KERNEL: (2 * width, 16),
        methods.RELEVANCE_HIDDEN_BIAS: (16,),
    }
    assert {name: getattr(model, name).value.shape for name in head} == head
    obs, actions = _observation(cfg), small.actions(cfg, batch_size=2)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        return jnp.mean(nnx.merge(graphdef, p, rest).compute_loss(jax.random.key(0), obs, actions, train=True))

    with openpi_prune.enabled(method="relevance", relevance_hidden=16, warn_below=0):
        grads = jax.grad(loss)(params)
        actions_out = model.sample_actions(jax.random.key(0), obs, num_steps=2)
        kept = last_report().kept_mask
    for name in head:
        assert float(jnp.abs(grads[name].value).sum()) > 0, name
    assert np.isfinite(np.asarray(actions_out)).all()
    per_camera = kept.shape[1] // 3
    np.testing.assert_array_equal(kept.sum(-1), np.ceil(0.2 * np.asarray([3, 2]) * per_camera))


def test_a_training_schedule_sets_the_share_kept_in_training_only(relevance_model):
    cfg, model = relevance_model
    obs, actions = _observation(cfg), small.actions(cfg, batch_size=2)
    rng = jax.random.key(7)
    np.testing.assert_allclose(
        [float(openpi_prune.gradual_keep_fraction(step, 100, 0.2)) for step in (0, 50, 100, 400)], [1.0, 0.6, 0.2, 0.2]
    )

    def kept(train, fraction):
        def kept_mask(fraction):
            with telemetry.collect() as reports, openpi_prune.keep_fraction(fraction):
                if train:
                    model.compute_loss(rng, obs, actions, train=True)
                else:
                    model.sample_actions(rng, obs, num_steps=1)
            return reports[0]["kept_mask"]

        with openpi_prune.enabled(method="relevance", keep_fraction=0.1, warn_below=0):
            # As a train step computes it: a traced share.
            return np.asarray(jax.jit(kept_mask)(jnp.float32(fraction))).sum(-1)

    live = np.asarray([3, 2]) * (kept(True, 1.0)[0] // 3)  # the second sample's third camera is masked
    np.testing.assert_array_equal(kept(True, 1.0), live)
    np.testing.assert_array_equal(kept(True, 0.5), np.ceil(0.5 * live))
    np.testing.assert_array_equal(kept(False, 0.5), np.ceil(0.1 * live))  # inference keeps the setting's share


def test_with_train_picks_saliency_training_sees_the_saliency_s_share_of_patches(relevance_model):
    cfg, model = relevance_model
    obs, actions = _observation(cfg), small.actions(cfg, batch_size=2)
    rng = jax.random.key(5)
    with openpi_prune.enabled(method="relevance", keep_fraction=0.1, warn_below=0, train_picks="saliency"):
        saliency = prefix.saliency(lambda: model.compute_loss(rng, obs, actions, train=True))
        with telemetry.collect() as reports:
            model.compute_loss(rng, obs, actions, train=True)
    per_camera = saliency.shape[1] // 3
    candidates = jnp.arange(saliency.shape[1])[None] < jnp.asarray([[3 * per_camera], [2 * per_camera]])
    want = np.asarray(relevance.keep_top(saliency, candidates, 0.1))
    np.testing.assert_array_equal(np.asarray(reports[0]["kept_mask"]), want)


def test_with_train_picks_head_training_sees_what_inference_keeps(relevance_model):
    cfg, model = relevance_model
    obs, actions = _observation(cfg), small.actions(cfg, batch_size=2)
    rng = jax.random.key(5)
    masks = {}
    for picks in ("saliency", "head"):
        with openpi_prune.enabled(method="relevance", keep_fraction=0.1, warn_below=0, train_picks=picks):
            # The same images in both passes: OpenPI's training augmentation off.
            with telemetry.collect() as reports, lab_train.without_augmentation():
                model.compute_loss(rng, obs, actions, train=True)
                model.sample_actions(rng, obs, num_steps=1)
        masks[picks] = [np.asarray(r["kept_mask"]) for r in reports]
    trained, served = masks["head"]
    np.testing.assert_array_equal(trained, served)
    np.testing.assert_array_equal(masks["saliency"][1], served)  # inference is the head's either way
    assert not np.array_equal(masks["saliency"][0], served)  # the fresh head does not match the saliency
