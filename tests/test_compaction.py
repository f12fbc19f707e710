"""What the compact prefix leaves out besides pruned patches: cameras a config never uses, and the
prompt's padding (cut to a few bucket lengths, one compile each). With nothing pruned, the actions
stay upstream's."""

import dataclasses
from unittest import mock

import jax
import numpy as np
from conftest import last_report
from openpi.policies import policy as _policy

import openpi_prune
from openpi_prune import telemetry
from openpi_prune.adapter import prefix
from openpi_prune.tools import small

MASKED = {"right_wrist_0_rgb": [False, False]}


def _sample(model, observation, seed=3):
    return np.asarray(model.sample_actions(jax.random.key(seed), observation, num_steps=2))


def test_dropping_a_masked_camera_skips_it_and_leaves_the_actions_upstream_s(any_model):
    cfg, model = any_model
    obs = small.observation(cfg, batch_size=2, prompt_tokens=[9, 4], camera_masks=MASKED)
    actions = small.actions(cfg, batch_size=2)
    rng = jax.random.key(5)
    upstream = _sample(model, obs), np.asarray(model.compute_loss(rng, obs, actions))
    # 512 slots: both live cameras whole, so nothing is pruned; only the masked camera leaves.
    with openpi_prune.enabled(method="keep_all", capacity=512, drop_cameras=("right_wrist_0_rgb",)):
        with mock.patch.object(model.PaliGemma, "img", wraps=model.PaliGemma.img) as siglip:
            dropped = _sample(model, obs), np.asarray(model.compute_loss(rng, obs, actions))
        report = last_report()
    assert siglip.call_count == 2 * 2  # two cameras, in each of the two calls
    assert report.prefix_length[0] == 512 + cfg.max_token_len
    for got, want in zip(dropped, upstream, strict=True):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def test_dropping_a_live_camera_changes_the_actions(pi05):
    cfg, model = pi05
    obs = small.observation(cfg, batch_size=2, prompt_tokens=9)
    with openpi_prune.enabled(method="keep_all", capacity=512, drop_cameras=("right_wrist_0_rgb",)):
        dropped = _sample(model, obs)
    assert np.abs(dropped - _sample(model, obs)).max() > 1e-3


def test_bucket_is_the_smallest_that_holds_the_last_live_token():
    cfg = small.config(pi05=True, max_token_len=48)
    obs = small.observation(cfg, batch_size=2, prompt_tokens=[5, 13])
    assert prefix.bucket_prompt(obs, (8, 16, 32)).tokenized_prompt.shape == (2, 16)
    assert prefix.bucket_prompt(obs, (8, 13)).tokenized_prompt_mask.shape == (2, 13)
    assert prefix.bucket_prompt(obs, (8,)).tokenized_prompt.shape == (2, 48)  # none holds it: whole
    assert prefix.bucket_prompt(obs, ()).tokenized_prompt.shape == (2, 48)
    # A live token after padding (not OpenPI's layout, but possible) is never cut off.
    mask = np.asarray(obs.tokenized_prompt_mask).copy()
    mask[0, 30] = True
    gappy = dataclasses.replace(obs, tokenized_prompt_mask=mask)
    assert prefix.bucket_prompt(gappy, (16, 32)).tokenized_prompt.shape == (2, 32)


def _example(cfg, live: int) -> dict:
    obs = small.observation(cfg, batch_size=1, prompt_tokens=live, camera_masks={"right_wrist_0_rgb": [False]})
    return jax.tree.map(lambda x: np.asarray(x[0]), obs.to_dict())


def test_a_policy_compiles_once_per_bucket_and_serves_upstream_s_actions(pi05):
    cfg, model = pi05
    noise = np.random.default_rng(0).normal(size=(cfg.action_horizon, cfg.action_dim)).astype(np.float32)
    lengths = [3, 7, 12, 15, 20]  # buckets (16,): four prompts fit, the fifth runs whole
    with openpi_prune.disabled():
        upstream = _policy.Policy(model, sample_kwargs={"num_steps": 2})
        want = [upstream.infer(_example(cfg, n), noise=noise)["actions"] for n in lengths]
    with openpi_prune.enabled(method="keep_all", capacity=768, prompt_buckets=(16,), telemetry=True, warn_below=0):
        policy = _policy.Policy(model, sample_kwargs={"num_steps": 2})
        with mock.patch.object(prefix, "split_prefix", wraps=prefix.split_prefix) as traced:
            responses = [policy.infer(_example(cfg, n), noise=noise) for n in lengths]
    assert traced.call_count == 2  # one trace for bucket 16, one for the whole prompt
    assert [r["pruning"]["prefix_length"] for r in responses] == [768 + 16] * 4 + [768 + cfg.max_token_len]
    for got, expected in zip(responses, want, strict=True):
        np.testing.assert_allclose(got["actions"], expected, atol=2e-5, rtol=1e-5)


def test_a_served_call_returns_its_telemetry_with_its_actions_not_by_a_host_callback(relevance_model):
    cfg, model = relevance_model
    examples = [_example(cfg, live) for live in (5, 9)]
    with openpi_prune.enabled(method="relevance", telemetry=True, warn_below=0):
        policy = _policy.Policy(model, sample_kwargs={"num_steps": 1})
        with mock.patch.object(jax.debug, "callback", wraps=jax.debug.callback) as callbacks:
            responses = [policy.infer(example) for example in examples]
            served_callbacks = callbacks.call_count
            by_hand = jax.jit(lambda o: model.sample_actions(jax.random.key(0), o, num_steps=1))
            np.asarray(by_hand(small.observation(cfg, batch_size=1)))
            jax.effects_barrier()
        recorded = telemetry.recent()
    assert served_callbacks == 0  # traced once, and it never reports through the host
    assert callbacks.call_count == 1  # a `sample_actions` jitted by hand still does
    for response in responses:
        assert response["pruning"]["live_image_tokens"] == 512  # the masked camera is not live
        assert response["pruning"]["kept"] == np.ceil(0.2 * 512)
        assert np.isfinite(response["actions"]).all()
    # The recorder and the hooks have each served call's report, then the hand-jitted call's.
    assert len(recorded) == 3
    served = [int(r.kept[0]) for r in recorded[:2]]
    assert served == [r["pruning"]["kept"] for r in responses]
    assert [r.values["kept_mask"][0].reshape(3, -1).tolist() for r in recorded[:2]] == [
        r["pruning"]["kept_patches"].tolist() for r in responses
    ]
    assert recorded[2].prefix_length[0] == 154 + cfg.max_token_len  # three live cameras, 20 % of 768
