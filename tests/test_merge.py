"""`merge_unkept`: the unkept patches of each region of a camera as one more token, their mean."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import in_both_modes, two_scenes
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import openpi_prune
from openpi_prune.errors import PruneInputError, SettingsError
from openpi_prune.pruner import merge
from openpi_prune.settings import PruneSettings
from openpi_prune.tools import small


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    regions=st.sampled_from([1, 4]),
    live=st.lists(st.booleans(), min_size=32, max_size=32),
    kept=st.lists(st.booleans(), min_size=32, max_size=32),
)
def test_the_unkept_live_patches_of_each_region_become_their_mean_in_the_first_one_s_place(seed, regions, live, kept):
    tokens = jax.random.normal(jax.random.key(seed), (1, 32, 5))  # two cameras of 4 x 4 patches
    candidate_mask, kept_mask = jnp.asarray([live]), jnp.asarray([live]) & jnp.asarray([kept])
    out, new_kept, merged = map(
        np.asarray, merge.merge_unkept(tokens, candidate_mask, kept_mask, per_camera=16, regions=regions)
    )
    tokens, candidate_mask, kept_mask = map(np.asarray, (tokens, candidate_mask, kept_mask))
    region = merge.region_of_patch(16, regions)
    for camera in range(2):
        for r in range(regions):
            patches = 16 * camera + np.flatnonzero(region == r)
            unkept = patches[candidate_mask[0, patches] & ~kept_mask[0, patches]]
            if unkept.size == 0:
                assert not merged[0, patches].any()
                continue
            assert np.flatnonzero(merged[0, patches]).tolist() == [np.searchsorted(patches, unkept[0])]
            np.testing.assert_allclose(out[0, unkept[0]], tokens[0, unkept].mean(0), rtol=1e-5, atol=1e-6)
    # Nothing else moves: the kept and the masked tokens stay as they were.
    np.testing.assert_array_equal(out[~merged], tokens[~merged])
    np.testing.assert_array_equal(new_kept, kept_mask | merged)


def test_regions_are_the_squares_of_the_camera_s_grid():
    np.testing.assert_array_equal(merge.region_of_patch(16, 4).reshape(4, 4), [[0, 0, 1, 1]] * 2 + [[2, 2, 3, 3]] * 2)
    assert not merge.region_of_patch(16, 1).any()
    with pytest.raises(ValueError, match="do not tile"):
        merge.region_of_patch(64, 9)


_observation = two_scenes


@pytest.mark.parametrize("regions", [1, 4])
def test_a_merged_prefix_holds_a_token_more_per_region_of_a_live_camera_in_both_modes(relevance_model, regions):
    cfg, model = relevance_model
    out, reports = in_both_modes(model, cfg, method="relevance", merge_unkept=regions)
    plain, plain_reports = in_both_modes(model, cfg, method="relevance")
    kept, merged = reports["compact"].kept_mask, reports["compact"].merged_mask
    plain_kept = plain_reports["compact"].kept_mask
    live_cameras = np.asarray([3, 2])
    # The telemetry tells the merged slots from the patches kept as they are.
    np.testing.assert_array_equal(merged.sum(-1), regions * live_cameras)
    np.testing.assert_array_equal(kept & ~merged, plain_kept)  # the head's picks stay, the merged join them
    np.testing.assert_array_equal(reports["masked"].kept_mask, kept)
    np.testing.assert_array_equal(reports["masked"].merged_mask, merged)
    np.testing.assert_allclose(out["masked"], out["compact"], atol=2e-5)
    assert np.isfinite(out["compact"]).all() and not np.allclose(out["compact"], plain["compact"], atol=1e-4)


def test_training_with_merged_tokens_gives_a_finite_loss_that_differs(relevance_model):
    cfg, model = relevance_model
    obs, actions = _observation(cfg), small.actions(cfg, batch_size=2)
    # A copy: a training pass advances the model's step, which the shared model's other tests count on.
    graphdef, state = nnx.split(model)
    losses = {}
    for merged in (0, 1):
        with openpi_prune.enabled(method="relevance", merge_unkept=merged, warn_below=0):
            copy = nnx.merge(graphdef, state)
            losses[merged] = np.asarray(copy.compute_loss(jax.random.key(0), obs, actions, train=True))
    assert np.isfinite(losses[1]).all() and not np.allclose(losses[1], losses[0])


def test_a_method_that_mixes_patches_in_training_cannot_merge(pi05):
    cfg, _ = pi05
    with openpi_prune.enabled(method="language_only", scoring="lightvla", merge_unkept=1, warn_below=0):
        model = small.create(cfg, seed=1)
        with pytest.raises(PruneInputError, match="merge_unkept needs a method"):
            model.compute_loss(jax.random.key(0), _observation(cfg), small.actions(cfg, batch_size=2), train=True)


def test_regions_that_do_not_tile_the_camera_say_so(relevance_model):
    cfg, model = relevance_model
    with openpi_prune.enabled(method="relevance", merge_unkept=9, warn_below=0):
        with pytest.raises(PruneInputError, match="merge_unkept=9: 9 regions do not tile a camera of 256 patches"):
            model.sample_actions(jax.random.key(0), _observation(cfg), num_steps=1)


def test_merging_inside_siglip_is_refused():
    with pytest.raises(SettingsError, match="merge_unkept and siglip_layer do not go together"):
        PruneSettings(merge_unkept=1, siglip_layer=4)
