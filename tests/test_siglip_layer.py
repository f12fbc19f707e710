"""Pruning inside SigLIP (`siglip_layer`): on a pi0.5 whose SigLIP has 12 layers (Ti/14, 256 patches a
camera), the later layers run on the kept patches only (with 0, all of them), and nothing changes when
all are kept."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import openpi_prune
from openpi_prune import telemetry
from openpi_prune.tools import small

SIGLIP = "Ti/14"  # 12 layers, width 192
LAYER = 4


@pytest.fixture(scope="module")
def deep():
    """A small pi0.5 with a 12-layer SigLIP and the relevance head; its actions from upstream OpenPI;
    an observation with the right wrist masked (as OpenPI's LIBERO inputs are)."""
    cfg = small.config()
    with openpi_prune.enabled(method="relevance"):
        model = small.create(cfg, siglip=SIGLIP)
    masks = {"right_wrist_0_rgb": [False, False]}
    observation = small.observation(cfg, batch_size=2, camera_masks=masks)
    with openpi_prune.disabled():
        upstream = model.sample_actions(jax.random.key(0), observation, num_steps=2)
        tokens, _, _ = model.embed_prefix(observation)
    return cfg, model, observation, upstream, tokens


def _sample(model, observation, **settings):
    with openpi_prune.enabled(**settings), telemetry.collect() as reports:
        actions = model.sample_actions(jax.random.key(0), observation, num_steps=2)
    return actions, {k: np.asarray(v) for k, v in reports[0].items()}


@pytest.mark.parametrize("layer", [LAYER, 0])
def test_keeping_every_patch_gives_upstream_s_actions_exactly(deep, layer):
    cfg, model, observation, upstream, _ = deep
    actions, report = _sample(model, observation, method="keep_all", siglip_layer=layer)
    np.testing.assert_array_equal(actions, upstream)
    assert report["prefix_length"].tolist() == [3 * 256 + cfg.max_token_len] * 2


@pytest.mark.parametrize("layer", [LAYER, 0])
def test_each_live_camera_keeps_its_share_and_the_later_layers_see_only_those(deep, layer):
    cfg, model, observation, upstream, _ = deep
    actions, report = _sample(model, observation, siglip_layer=layer)
    kept = int(np.ceil(0.2 * 256))
    assert report["kept_per_camera"].tolist() == [[kept, kept, 0]] * 2
    assert report["prefix_length"].tolist() == [3 * kept + cfg.max_token_len] * 2
    assert np.all(np.isfinite(actions)) and not np.allclose(actions, upstream)
    # SigLIP's blocks run as two scans per camera: `layer` blocks over all 256 patches, the other
    # 12 - layer over the kept ones only.
    with openpi_prune.enabled(siglip_layer=layer):
        graphdef, state = nnx.split(model)
        jaxpr = jax.make_jaxpr(
            lambda s: nnx.merge(graphdef, s).sample_actions(jax.random.key(0), observation, num_steps=2)
        )(state)
    scans = [
        (e.params["length"], e.outvars[0].aval.shape)
        for e in jaxpr.eqns
        if e.primitive.name == "scan" and e.outvars and e.outvars[0].aval.shape[-1:] == (192,)
    ]
    over_every_patch = [length for length, shape in scans if shape == (2, 256, 192) and length]
    assert over_every_patch == [layer] * 3 if layer else not over_every_patch, scans
    assert scans.count((12 - layer, (2, kept, 192))) == 3, scans


def test_pruned_after_the_last_layer_the_kept_tokens_are_upstream_s(deep):
    """With nothing left after the cut, each kept token is exactly upstream's token of its patch: the
    gather, the late pass and the prefix put every token where it came from."""
    cfg, model, observation, _, upstream_tokens = deep
    with openpi_prune.enabled(siglip_layer=12, telemetry=False), telemetry.collect() as reports:
        tokens, input_mask, _ = model.embed_prefix(observation)
    kept_mask = np.asarray(reports[0]["kept_mask"])
    for i in range(2):
        sources = np.flatnonzero(kept_mask[i])
        slots = np.flatnonzero(np.asarray(input_mask[i, : 3 * 52]))
        np.testing.assert_array_equal(tokens[i, slots], upstream_tokens[i, sources])


def test_training_teaches_the_head_on_the_early_tokens(deep):
    cfg, model, observation, _, _ = deep
    actions = small.actions(cfg, batch_size=2)
    with openpi_prune.enabled(siglip_layer=LAYER, telemetry=False):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(params):
            m = nnx.merge(graphdef, params, rest)
            with telemetry.collect() as reports:
                value = jnp.mean(m.compute_loss(jax.random.key(1), observation, actions, train=True))
            return value, reports[0]["distill_loss"]

        (value, distill), grads = jax.value_and_grad(loss, has_aux=True)(params)
    assert np.isfinite(float(value)) and float(np.mean(distill)) > 0
    head = np.asarray(grads["prune_relevance_key"].value)
    assert np.all(np.isfinite(head)) and np.abs(head).max() > 0


@pytest.mark.parametrize("layer", [LAYER, 0])
def test_masked_mode_gives_compact_mode_s_actions(deep, layer):
    """Masked mode keeps every slot, but SigLIP's later layers run on the patches the compact prefix
    holds: the same tokens, so the same actions."""
    cfg, model, observation, _, _ = deep
    compact, compact_report = _sample(model, observation, siglip_layer=layer)
    masked, report = _sample(model, observation, siglip_layer=layer, mode="masked")
    assert report["prefix_length"].tolist() == [3 * 256 + cfg.max_token_len] * 2
    np.testing.assert_array_equal(report["kept_mask"], compact_report["kept_mask"])
    np.testing.assert_allclose(masked, compact, atol=1e-5)
