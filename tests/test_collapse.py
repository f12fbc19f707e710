"""Collapse-proof scoring, Scheme A and learned action queries, on the math and on real models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import last_report
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import openpi_prune
from openpi_prune import hookspecs
from openpi_prune.pruner import lightvla, methods
from openpi_prune.tools import small


def _tokens(seed, b=2, k=32, d=24):
    return jax.random.normal(jax.random.key(seed), (b, k, d))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), shift=st.floats(-100, 100), live=st.lists(st.booleans(), min_size=32, max_size=32))
def test_centring_removes_any_shared_direction(seed, shift, live):
    x = _tokens(seed)
    mask = jnp.asarray([live, [True] * 32])
    direction = jax.random.normal(jax.random.key(seed + 1), (x.shape[-1],)) * shift
    a = lightvla.centre(x, mask)
    b = lightvla.centre(x + direction, mask)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-3 * max(1.0, abs(shift)))
    assert not np.asarray(a)[~np.asarray(mask)].any(), "a masked token leaked into the vote"


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), outliers=st.integers(1, 4), magnitude=st.floats(10, 1e5))
def test_robust_scaling_ignores_each_dimension_s_offset_and_scale(seed, outliers, magnitude):
    x = _tokens(seed)
    mask = jnp.ones(x.shape[:2], bool)
    rng = np.random.default_rng(seed)
    scale = np.ones(x.shape[-1], np.float32)
    scale[:outliers] = magnitude
    offset = rng.normal(size=x.shape[-1]).astype(np.float32) * magnitude
    a = lightvla.robust_standardise(x, mask)
    b = lightvla.robust_standardise(x * scale + offset, mask)
    # float32 keeps ~7 digits of the offset: the tolerance grows with it.
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-3 + 1e-5 * magnitude)
    assert float(jnp.max(jnp.abs(b))) <= 4.0


def test_prepared_tokens_are_finite_when_nothing_is_live():
    x = _tokens(0)
    none = jnp.zeros(x.shape[:2], bool)
    for scoring in ("lightvla", "centred", "robust"):
        patches, task = lightvla.prepare(x, none, x, none, scoring)
        assert np.isfinite(np.asarray(patches)).all() and np.isfinite(np.asarray(task)).all()


def _kept_per_live_camera(model, cfg, **settings):
    obs = small.observation(cfg, batch_size=2, prompt_tokens=20, camera_masks={"right_wrist_0_rgb": [False, False]})
    with openpi_prune.enabled(mode="masked", warn_below=0, **settings):
        model.sample_actions(jax.random.key(0), obs, num_steps=1)
        report = last_report()
    return report.kept_per_camera[:, :2], report


@pytest.fixture(scope="module")
def stressed(pi05):
    """The small pi0.5 (with the default method's head), healthy, with one shared direction (2x RMS),
    and with four massive dimensions."""
    cfg, with_projector = pi05
    with openpi_prune.enabled():
        healthy = small.create(cfg, seed=0)
    shared, outliers, projector_outliers = nnx.clone(healthy), nnx.clone(healthy), nnx.clone(with_projector)
    small.add_shared_component(shared, scale=2.0)
    small.add_outlier_dimensions(outliers)
    small.add_outlier_dimensions(projector_outliers)
    return cfg, {
        "healthy": healthy,
        "shared direction": shared,
        "outlier dimensions": outliers,
        "outlier dimensions, scheme_b's projector": projector_outliers,
    }


@pytest.mark.parametrize("stress", ["shared direction", "outlier dimensions"])
def test_default_survives_what_collapses_verbatim_lightvla(stressed, stress):
    cfg, models = stressed
    verbatim, _ = _kept_per_live_camera(models[stress], cfg, method="language_only", scoring="lightvla")
    default, report = _kept_per_live_camera(models[stress], cfg)
    assert verbatim.max() <= 3, verbatim
    assert default.min() >= 8, default
    # The default keeps a fixed share, so its count cannot collapse; what matters is that the stress
    # does not change which patches it keeps (robust scoring removes a shared offset exactly).
    _, healthy = _kept_per_live_camera(models["healthy"], cfg)
    same = (report.kept_mask & healthy.kept_mask).sum() / healthy.kept_mask.sum()
    assert same >= {"shared direction": 0.95, "outlier dimensions": 0.5}[stress], same
    # Telemetry describes the geometry the method scored, not the raw tokens.
    assert report.query_spread.min() > 0.5


def test_centring_alone_is_not_enough_for_massive_dimensions(stressed):
    """Why the default is robust, not centred: outliers' variation survives centring."""
    cfg, models = stressed
    model = models["outlier dimensions, scheme_b's projector"]
    centred, _ = _kept_per_live_camera(model, cfg, method="scheme_b", scoring="centred")
    robust, _ = _kept_per_live_camera(model, cfg, method="scheme_b", scoring="robust")
    assert robust.mean() > 3 * centred.mean()


def _scheme_model(cfg, method, seed=0):
    with openpi_prune.enabled(method=method):
        return small.create(cfg, seed=seed)


@pytest.mark.parametrize("mode", ["masked", "compact"])
def test_scheme_a_acts_like_scheme_b_and_hides_its_placeholders(pi05, mode):
    cfg, model = pi05  # created with scheme_b: the same projector serves scheme_a
    obs = small.observation(cfg, batch_size=2, prompt_tokens=[12, 7])
    noise = jax.random.normal(jax.random.key(3), (2, cfg.action_horizon, cfg.action_dim))
    out, kept, lengths = {}, {}, {}
    for method in ("scheme_b", "scheme_a"):
        with openpi_prune.enabled(method=method, mode=mode, capacity=400, warn_below=0):
            out[method] = np.asarray(model.sample_actions(jax.random.key(0), obs, num_steps=2, noise=noise))
            kept[method] = last_report().kept_mask
            with openpi_prune.noisy_actions(noise, jnp.ones(2)):
                tokens, input_mask, _ = model.embed_prefix(obs)
            lengths[method] = (tokens.shape[1], np.asarray(input_mask).sum(-1).tolist())
    np.testing.assert_array_equal(kept["scheme_a"], kept["scheme_b"])
    np.testing.assert_allclose(out["scheme_a"], out["scheme_b"], atol=2e-5)
    # The placeholders are there (one per action step) but not live.
    assert lengths["scheme_a"][0] == lengths["scheme_b"][0] + cfg.action_horizon
    assert lengths["scheme_a"][1] == lengths["scheme_b"][1]


def test_scheme_a_placeholders_are_never_attended(pi05, register_plugin):
    """Replacing the placeholders' values by anything leaves the actions and the loss unchanged."""
    cfg, model = pi05
    obs = small.observation(cfg, batch_size=2)
    actions = small.actions(cfg, batch_size=2)

    class Loud:
        @hookspecs.hookimpl(tryfirst=True)
        def openpi_prune_prefix_extension(self, model, task_tokens, task_mask, settings):
            return jnp.full((task_tokens.shape[0], 5, task_tokens.shape[-1]), 1e4, task_tokens.dtype)

    def run():
        with openpi_prune.enabled(method="scheme_a", mode="compact", warn_below=0):
            a = model.sample_actions(jax.random.key(0), obs, num_steps=2)
            loss = model.compute_loss(jax.random.key(1), obs, actions, train=True)
        return np.asarray(a), np.asarray(loss)

    plain = run()
    register_plugin(Loud(), name="loud")
    loud = run()
    np.testing.assert_allclose(loud[0], plain[0], atol=2e-5)
    np.testing.assert_allclose(loud[1], plain[1], atol=2e-5)


def test_action_queries_are_learned_and_the_same_at_inference(pi05):
    cfg, _ = pi05
    model = _scheme_model(cfg, "action_queries")
    queries = getattr(model, methods.QUERIES)
    assert queries.value.shape == (cfg.action_horizon, 64)
    obs = small.observation(cfg, batch_size=2)
    actions = small.actions(cfg, batch_size=2)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    with openpi_prune.enabled(method="action_queries", warn_below=0):

        def loss(p):
            return jnp.mean(nnx.merge(graphdef, p, rest).compute_loss(jax.random.key(0), obs, actions, train=True))

        grads = jax.grad(loss)(params)
        assert float(jnp.abs(grads[methods.QUERIES].value).sum()) > 0
        # Inference: the kept set does not depend on the noise the sampler starts from.
        kept = []
        for seed in (0, 1):
            model.sample_actions(jax.random.key(seed), obs, num_steps=1)
            kept.append(last_report().kept_mask)
    np.testing.assert_array_equal(kept[0], kept[1])
