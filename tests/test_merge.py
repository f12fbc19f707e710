"""`merge_unkept`: each camera's unkept patches as one more token, their mean."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import last_report
from hypothesis import given, settings
from hypothesis import strategies as st

import openpi_prune
from openpi_prune.errors import PruneInputError
from openpi_prune.pruner import merge
from openpi_prune.tools import small


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    live=st.lists(st.booleans(), min_size=12, max_size=12),
    kept=st.lists(st.booleans(), min_size=12, max_size=12),
)
def test_each_camera_s_unkept_live_patches_become_their_mean_in_the_first_one_s_place(seed, live, kept):
    tokens = jax.random.normal(jax.random.key(seed), (1, 12, 5))
    candidate_mask, kept_mask = jnp.asarray([live]), jnp.asarray([live]) & jnp.asarray([kept])
    out, new_kept, merged = map(np.asarray, merge.merge_unkept(tokens, candidate_mask, kept_mask, per_camera=4))
    tokens, candidate_mask, kept_mask = map(np.asarray, (tokens, candidate_mask, kept_mask))
    for camera in range(3):
        part = slice(4 * camera, 4 * camera + 4)
        unkept = np.flatnonzero(candidate_mask[0, part] & ~kept_mask[0, part])
        if unkept.size == 0:
            assert not merged[0, part].any()
            continue
        slot = 4 * camera + unkept[0]
        assert np.flatnonzero(merged[0, part]).tolist() == [unkept[0]]
        np.testing.assert_allclose(out[0, slot], tokens[0, 4 * camera + unkept].mean(0), rtol=1e-5, atol=1e-6)
    # Nothing else moves: the kept and the masked tokens stay as they were.
    np.testing.assert_array_equal(out[~merged], tokens[~merged])
    np.testing.assert_array_equal(new_kept, kept_mask | merged)


def _observation(cfg):
    return small.observation(
        cfg, batch_size=2, prompt_tokens=[12, 7], camera_masks={"right_wrist_0_rgb": [True, False]}
    )


def test_a_merged_prefix_holds_one_token_more_per_live_camera_in_both_modes(relevance_model):
    cfg, model = relevance_model
    obs = _observation(cfg)
    noise = jax.random.normal(jax.random.key(3), (2, cfg.action_horizon, cfg.action_dim))
    out, kept = {}, {}
    for mode in ("masked", "compact"):
        with openpi_prune.enabled(method="relevance", merge_unkept=True, mode=mode, warn_below=0):
            out[mode] = np.asarray(model.sample_actions(jax.random.key(0), obs, num_steps=2, noise=noise))
            kept[mode] = last_report().kept_mask
    with openpi_prune.enabled(method="relevance", warn_below=0):
        plain = np.asarray(model.sample_actions(jax.random.key(0), obs, num_steps=2, noise=noise))
        plain_kept = last_report().kept_mask
    live_cameras = np.asarray([3, 2])
    np.testing.assert_array_equal(kept["compact"].sum(-1), plain_kept.sum(-1) + live_cameras)
    assert np.all(kept["compact"] >= plain_kept)  # the head's picks stay; one slot per camera joins them
    np.testing.assert_array_equal(kept["masked"], kept["compact"])
    np.testing.assert_allclose(out["masked"], out["compact"], atol=2e-5)
    assert np.isfinite(out["compact"]).all() and not np.allclose(out["compact"], plain, atol=1e-4)


def test_training_with_merged_tokens_gives_a_finite_loss_that_differs(relevance_model):
    cfg, model = relevance_model
    obs, actions = _observation(cfg), small.actions(cfg, batch_size=2)
    losses = {}
    for merged in (False, True):
        with openpi_prune.enabled(method="relevance", merge_unkept=merged, warn_below=0):
            losses[merged] = np.asarray(model.compute_loss(jax.random.key(0), obs, actions, train=True))
    assert np.isfinite(losses[True]).all() and not np.allclose(losses[True], losses[False])


def test_a_method_that_mixes_patches_in_training_cannot_merge(pi05):
    cfg, _ = pi05
    with openpi_prune.enabled(method="language_only", scoring="lightvla", merge_unkept=True, warn_below=0):
        model = small.create(cfg, seed=1)
        with pytest.raises(PruneInputError, match="merge_unkept needs a method"):
            model.compute_loss(jax.random.key(0), _observation(cfg), small.actions(cfg, batch_size=2), train=True)
