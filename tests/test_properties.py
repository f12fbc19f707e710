"""Properties of the kept set and the compact prefix, over many random cases (hypothesis)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import last_report
from hypothesis import given, settings
from hypothesis import strategies as st

import openpi_prune
from openpi_prune.pruner import lightvla, relevance
from openpi_prune.tools import small

N = 24


@st.composite
def kept_sets(draw):
    b = draw(st.integers(1, 3))
    live = np.asarray(draw(st.lists(st.booleans(), min_size=b * N, max_size=b * N))).reshape(b, N)
    kept = live & np.asarray(draw(st.lists(st.booleans(), min_size=b * N, max_size=b * N))).reshape(b, N)
    priority = np.asarray(draw(st.lists(st.integers(0, 5), min_size=b * N, max_size=b * N))).reshape(b, N)
    return kept, priority, draw(st.integers(1, N))


@settings(max_examples=700, deadline=None)
@given(case=kept_sets())
def test_compact_slots_hold_kept_patches_in_their_order_within_capacity(case):
    kept, priority, capacity = case
    indices, slot_mask, overflow = map(
        np.asarray, lightvla.fit_capacity(jnp.asarray(kept), jnp.asarray(priority), capacity)
    )
    for b in range(kept.shape[0]):
        assert indices.shape[1] == capacity
        assert np.all(np.diff(indices[b]) > 0)  # original order, no repeats
        chosen = indices[b][slot_mask[b]]
        assert np.all(kept[b][chosen])  # a live slot holds a kept patch
        assert len(chosen) == min(kept[b].sum(), capacity)
        assert overflow[b] == kept[b].sum() - len(chosen)
        dropped = np.setdiff1d(np.flatnonzero(kept[b]), chosen)
        if len(dropped) and len(chosen):  # when some must go, the lowest priority goes
            assert priority[b][dropped].max() <= priority[b][chosen].min()


@st.composite
def token_sets(draw):
    b, k, d = draw(st.integers(1, 3)), draw(st.integers(1, 12)), draw(st.integers(1, 4))
    finite = st.floats(
        -(2.0**100), 2.0**100, allow_nan=False, allow_subnormal=False, width=32
    )  # XLA flushes subnormals
    values = draw(
        st.lists(st.one_of(finite, st.sampled_from([0.0, -0.0, 1.0, -1.0])), min_size=b * k * d, max_size=b * k * d)
    )
    mask = draw(st.lists(st.booleans(), min_size=b * k, max_size=b * k))
    return np.asarray(values, np.float32).reshape(b, k, d), np.asarray(mask).reshape(b, k)


@settings(max_examples=400, deadline=None)
@given(case=token_sets())
def test_live_median_is_numpy_s_median_of_the_live_tokens(case):
    x, mask = case
    got = np.asarray(lightvla.live_median(jnp.asarray(x), jnp.asarray(mask)))
    for b in range(x.shape[0]):
        live = x[b][mask[b]]
        want = np.median(live, axis=0).astype(np.float32) if len(live) else np.zeros(x.shape[-1], np.float32)
        want[np.abs(want) < np.finfo(np.float32).tiny] = 0.0  # XLA flushes a subnormal mean to zero
        np.testing.assert_array_equal(got[b, 0], want)


@settings(max_examples=400, deadline=None)
@given(case=token_sets())
def test_an_accelerator_s_sort_picks_the_keys_the_cpu_s_bisection_picks(case):
    x, mask = case
    key, mask = lightvla._order_key(jnp.asarray(x)), jnp.asarray(mask)
    count = jnp.sum(mask, axis=1)
    need = jnp.stack([jnp.maximum((count + 1) // 2, 1), jnp.maximum(count // 2 + 1, 1)])[..., None, None]
    live = count > 0  # with nothing live either may answer anything: the median is 0 then
    bisected = np.asarray(lightvla._bisected_keys(key, mask, need))[:, live]
    np.testing.assert_array_equal(np.asarray(lightvla._sorted_keys(key, mask, need))[:, live], bisected)


@settings(max_examples=400, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), live=st.lists(st.booleans(), min_size=N, max_size=N), t=st.integers(1, 6))
def test_both_rules_keep_only_live_patches_and_are_deterministic(seed, live, t):
    k1, k2 = jax.random.split(jax.random.key(seed))
    patches, task = jax.random.normal(k1, (1, N, 8)), jax.random.normal(k2, (1, t, 8))
    candidate_mask, task_mask = jnp.asarray([live]), jnp.ones((1, t), bool)
    votes = lightvla.vote_scores(patches, task, task_mask)
    relevances = relevance.scores(patches, task, task_mask, jnp.eye(8), jnp.eye(8))
    for kept in (
        lightvla.union_of_argmax(votes, candidate_mask),
        relevance.keep_top(relevances, candidate_mask, 0.3),
    ):
        kept = np.asarray(kept)
        assert not (kept & ~np.asarray(candidate_mask)).any()
        assert kept.any() == any(live)
    again = relevance.keep_top(relevance.scores(patches, task, task_mask, jnp.eye(8), jnp.eye(8)), candidate_mask, 0.3)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(relevance.keep_top(relevances, candidate_mask, 0.3)))


@pytest.fixture(scope="module")
def default_model(pi05):
    cfg, _ = pi05
    with openpi_prune.enabled():
        return cfg, small.create(cfg, seed=3)


@pytest.mark.parametrize("keep_fraction, capacity", [(0.1, 90), (0.2, 160)])
def test_masked_and_compact_agree_below_the_live_count_with_different_counts_per_sample(
    default_model, keep_fraction, capacity
):
    cfg, model = default_model
    # Three live cameras, then two: different kept counts per sample, capacity below both live counts.
    obs = small.observation(cfg, batch_size=2, prompt_tokens=[20, 9], camera_masks={"right_wrist_0_rgb": [True, False]})
    noise = jax.random.normal(jax.random.key(1), (2, cfg.action_horizon, cfg.action_dim))
    out, kept = {}, {}
    for mode in ("masked", "compact"):
        settings_ = dict(keep_fraction=keep_fraction, mode=mode, capacity=capacity, warn_below=0)
        with openpi_prune.enabled(**settings_):
            out[mode] = np.asarray(model.sample_actions(jax.random.key(0), obs, num_steps=2, noise=noise))
            kept[mode] = last_report().kept_mask
            # Deterministic at inference: the same call twice keeps the same set.
            model.sample_actions(jax.random.key(5), obs, num_steps=2, noise=noise)
            np.testing.assert_array_equal(last_report().kept_mask, kept[mode])
    counts = kept["masked"].sum(-1)
    assert counts[0] != counts[1] and counts.max() <= capacity < 512
    np.testing.assert_array_equal(kept["masked"], kept["compact"])
    np.testing.assert_allclose(out["masked"], out["compact"], atol=2e-5)


def test_a_kept_patch_reaches_paligemma_unchanged(default_model):
    cfg, model = default_model
    obs = small.observation(cfg, batch_size=2, prompt_tokens=[20, 9], camera_masks={"right_wrist_0_rgb": [True, False]})
    noise = jnp.zeros((2, cfg.action_horizon, cfg.action_dim))
    with openpi_prune.disabled():
        upstream, _, _ = model.embed_prefix(obs)
    with openpi_prune.enabled(mode="compact", warn_below=0), openpi_prune.noisy_actions(noise, jnp.ones(2)):
        tokens, input_mask, _ = model.embed_prefix(obs)
        kept = last_report().kept_mask
    capacity = tokens.shape[1] - (upstream.shape[1] - kept.shape[1])
    for b in range(2):
        slots = np.asarray(tokens[b, :capacity])[np.asarray(input_mask[b, :capacity])]
        np.testing.assert_array_equal(slots, np.asarray(upstream[b, : kept.shape[1]])[kept[b]])
