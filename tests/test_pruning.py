"""Scheme B and the status quo inside real pi0 / pi0.5 models: training, inference, both modes."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import last_report
from flax import nnx
from openpi.models import pi0 as openpi_pi0

import openpi_prune
from openpi_prune import hookspecs, telemetry
from openpi_prune.pruner import methods
from openpi_prune.telemetry import CollapseWarning
from openpi_prune.tools import small


class _Spy:
    """Records what the pruner's task-context hook receives, then lets the real method answer."""

    def __init__(self):
        self.seen = []

    @hookspecs.hookimpl(tryfirst=True)
    def openpi_prune_task_context(self, model, text_tokens, text_mask, noisy_actions, time, settings):
        self.seen.append((noisy_actions, time))


@pytest.fixture
def spy(register_plugin):
    return register_plugin(_Spy())


def test_compute_loss_pruner_sees_exactly_what_embed_suffix_gets(any_model, spy, monkeypatch):
    cfg, model = any_model
    obs, actions = small.observation(cfg, batch_size=2), small.actions(cfg, batch_size=2)
    suffix_inputs = []
    original = openpi_pi0.Pi0.embed_suffix

    def recording_embed_suffix(self, obs, noisy_actions, timestep):
        suffix_inputs.append((noisy_actions, timestep))
        return original(self, obs, noisy_actions, timestep)

    monkeypatch.setattr(openpi_pi0.Pi0, "embed_suffix", recording_embed_suffix)
    with openpi_prune.enabled(method="scheme_b", mode="masked"):
        loss = model.compute_loss(jax.random.key(11), obs, actions, train=True)
    assert np.isfinite(np.asarray(loss)).all()
    ((x_t, time),) = spy.seen
    ((suffix_x_t, suffix_time),) = suffix_inputs
    assert np.array_equal(np.asarray(x_t), np.asarray(suffix_x_t))
    assert np.array_equal(np.asarray(time), np.asarray(suffix_time))


def test_sample_actions_pruner_sees_the_initial_noise(pi05, spy):
    cfg, model = pi05
    obs = small.observation(cfg, batch_size=2)
    rng = jax.random.key(5)
    with openpi_prune.enabled(method="scheme_b"):
        model.sample_actions(rng, obs, num_steps=1)
        given = jax.random.normal(jax.random.key(6), (2, cfg.action_horizon, cfg.action_dim))
        model.sample_actions(rng, obs, num_steps=1, noise=given)
    (drawn, t_drawn), (passed, t_passed) = spy.seen
    # Without `noise`, OpenPI draws it from the rng like this; the pruner saw that same draw.
    expected = jax.random.normal(rng, (2, cfg.action_horizon, cfg.action_dim))
    assert np.array_equal(np.asarray(drawn), np.asarray(expected))
    assert np.array_equal(np.asarray(passed), np.asarray(given))
    assert np.all(np.asarray(t_drawn) == 1.0) and np.all(np.asarray(t_passed) == 1.0)


def test_training_step_reaches_scores_and_projector(any_model):
    cfg, model = any_model
    obs, actions = small.observation(cfg, batch_size=2), small.actions(cfg, batch_size=2)
    with openpi_prune.enabled(method="scheme_b"):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss_fn(params):
            m = nnx.merge(graphdef, params, rest)
            return jnp.mean(m.compute_loss(jax.random.key(2), obs, actions, train=True))

        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    assert np.isfinite(float(loss))
    projector = grads[methods.PROJECTOR]
    # The projector only reaches the loss through the vote scores (straight-through estimator).
    assert float(jnp.abs(projector["kernel"].value).sum()) > 0
    assert float(jnp.abs(projector["bias"].value).sum()) > 0
    assert last_report().mode == "train"


def test_compact_prefix_is_capacity_plus_text_and_masked_tokens_never_kept(pi05):
    cfg, model = pi05
    obs = small.observation(cfg, batch_size=2, prompt_tokens=[12, 3], camera_masks={"left_wrist_0_rgb": [False, True]})
    noise = jax.random.normal(jax.random.key(0), (2, cfg.action_horizon, cfg.action_dim))
    # Room for both samples' kept sets (the second has one camera more), so their counts differ.
    with openpi_prune.enabled(method="scheme_b", mode="compact", capacity=500):
        with openpi_prune.noisy_actions(noise, jnp.ones(2)):
            tokens, input_mask, ar_mask = model.embed_prefix(obs)
        assert tokens.shape[1] == 500 + cfg.max_token_len == input_mask.shape[1] == ar_mask.shape[0]
        actions = model.sample_actions(jax.random.key(0), obs, noise=noise, num_steps=2)
        again = model.sample_actions(jax.random.key(0), obs, noise=noise, num_steps=2)
    assert np.array_equal(np.asarray(actions), np.asarray(again)), "inference is not deterministic"
    assert np.isfinite(np.asarray(actions)).all()
    report = last_report()
    assert report.kept_per_camera[0, 1] == 0, "a patch of a masked camera was kept"
    assert report.kept_mask[0, 256:512].sum() == 0
    assert report.kept[0] != report.kept[1], "batch samples should keep different counts"
    assert np.all(report.kept <= 500) and np.all(report.kept + report.overflow == report.union_picks)
    assert report.live_task_tokens.tolist() == [12 + cfg.action_horizon, 3 + cfg.action_horizon]


@pytest.mark.parametrize("method", ["scheme_b", "language_only"])
def test_masked_and_compact_agree_with_enough_capacity(pi0, method):
    cfg, model = pi0
    obs, actions = small.observation(cfg, batch_size=2, prompt_tokens=[10, 6]), small.actions(cfg, batch_size=2)
    out = {}
    for mode in ("masked", "compact"):
        with openpi_prune.enabled(method=method, mode=mode, capacity=768):
            out[mode] = (
                model.compute_loss(jax.random.key(1), obs, actions, train=False),
                model.sample_actions(jax.random.key(1), obs, num_steps=2),
            )
        report = last_report()
        assert 0 < report.kept.min() < 768
    for masked, compact in zip(out["masked"], out["compact"], strict=True):
        np.testing.assert_allclose(np.asarray(masked), np.asarray(compact), rtol=1e-4, atol=1e-5)


def test_overflow_keeps_the_most_voted(pi05):
    cfg, model = pi05
    obs = small.observation(cfg, batch_size=1)
    with openpi_prune.enabled(method="language_only", mode="compact", capacity=768):
        model.sample_actions(jax.random.key(0), obs, num_steps=1)
    full = last_report()
    with openpi_prune.enabled(method="language_only", mode="compact", capacity=8):
        model.sample_actions(jax.random.key(0), obs, num_steps=1)
    small_cap = last_report()
    assert small_cap.kept[0] == 8 and small_cap.overflow[0] == full.kept[0] - 8
    assert set(np.flatnonzero(small_cap.kept_mask[0])) <= set(np.flatnonzero(full.kept_mask[0]))


def test_policy_runs_the_pruned_model(pi05):
    """OpenPI's own Policy (module_jit of sample_actions) goes through the wrappers."""
    from openpi.policies import policy as _policy

    cfg, model = pi05
    obs = small.observation(cfg, batch_size=1)
    inputs = {
        "image": {k: np.asarray(v[0]) for k, v in obs.images.items()},
        "image_mask": {k: np.asarray(v[0]) for k, v in obs.image_masks.items()},
        "state": np.asarray(obs.state[0]),
        "tokenized_prompt": np.asarray(obs.tokenized_prompt[0]),
        "tokenized_prompt_mask": np.asarray(obs.tokenized_prompt_mask[0]),
    }
    with openpi_prune.enabled(method="scheme_b", mode="compact"):
        policy = _policy.Policy(model, sample_kwargs={"num_steps": 2})
        result = policy.infer(inputs)
        report = last_report()
    assert result["actions"].shape == (cfg.action_horizon, cfg.action_dim)
    assert report.mode == "compact" and report.capacity == 192 and 0 < report.kept[0] <= 192


def test_collapse_warning_threshold(pi05):
    cfg, model = pi05
    obs = small.observation(cfg, batch_size=1)
    with openpi_prune.enabled(method="language_only", warn_below=10_000):
        with pytest.warns(CollapseWarning, match="below warn_below=10000"):
            model.sample_actions(jax.random.key(0), obs, num_steps=1)
            jax.effects_barrier()
    with openpi_prune.enabled(method="language_only", warn_below=0), warnings.catch_warnings():
        warnings.simplefilter("error", CollapseWarning)
        model.sample_actions(jax.random.key(0), obs, num_steps=1)
        jax.effects_barrier()


def test_training_code_collects_telemetry_inside_jit(pi0):
    cfg, model = pi0
    obs, actions = small.observation(cfg, batch_size=2), small.actions(cfg, batch_size=2)

    @jax.jit
    def step(step_number):
        scale = openpi_prune.linear_noise_scale(step_number, 100)
        with telemetry.collect() as reports, openpi_prune.noise_scale(scale):
            loss = model.compute_loss(jax.random.key(0), obs, actions, train=True)
        return loss, reports[0]["kept"], reports[0]["query_spread"]

    with openpi_prune.enabled(method="scheme_b", telemetry=False):
        loss, kept, spread = step(10)
    assert kept.shape == (2,) and np.all(np.asarray(kept) > 0)
    assert np.all((0 < np.asarray(spread)) & (np.asarray(spread) <= 1))
    assert telemetry.recent() == []  # telemetry=False: no host callback


def test_one_compile_per_setting_not_per_sample(pi05):
    cfg, model = pi05
    first = small.observation(cfg, batch_size=1, seed=1, prompt_tokens=14)
    second = small.observation(cfg, batch_size=1, seed=2, prompt_tokens=3)
    with openpi_prune.enabled(method="scheme_b", mode="compact"):
        sample = jax.jit(lambda obs: model.sample_actions(jax.random.key(0), obs, num_steps=1))
        sample(first)
        kept_first = last_report().kept[0]
        sample(second)
        kept_second = last_report().kept[0]
    assert kept_first != kept_second  # a different number of tokens kept ...
    assert sample._cache_size() == 1  # ... by the same compiled function


def test_paligemma_sees_kept_tokens_at_their_upstream_positions(pi05, monkeypatch):
    """OpenPI numbers tokens by cumsum(input_mask); a pruned prefix must not renumber them."""
    from openpi.models import gemma

    cfg, model = pi05
    obs = small.observation(cfg, batch_size=2, prompt_tokens=[12, 7], camera_masks={"right_wrist_0_rgb": [True, False]})
    noise = jax.random.normal(jax.random.key(3), (2, cfg.action_horizon, cfg.action_dim))
    seen = {}  # length of the call -> the positions it used (the same in every layer)
    rope = gemma._apply_rope

    def spy(x, *, positions, **kwargs):
        jax.debug.callback(lambda p: seen.__setitem__(p.shape[1], np.asarray(p)), positions)
        return rope(x, positions=positions, **kwargs)

    monkeypatch.setattr(gemma, "_apply_rope", spy)
    with openpi_prune.disabled():
        model.sample_actions(jax.random.key(0), obs, num_steps=1, noise=noise)
        jax.effects_barrier()
        upstream_prefix, upstream_suffix = seen[max(seen)], seen[min(seen)]
        _, upstream_mask, _ = model.embed_prefix(obs)
    for keep_positions in (True, False):
        seen.clear()
        with openpi_prune.enabled(
            method="scheme_b", mode="compact", capacity=300, warn_below=0, keep_positions=keep_positions
        ):
            model.sample_actions(jax.random.key(0), obs, num_steps=1, noise=noise)
            kept = last_report().kept_mask
            prefix_positions, suffix_positions = seen[max(seen)], seen[min(seen)]
            with openpi_prune.noisy_actions(noise, jnp.ones(2)):
                _, slot_mask, _ = model.embed_prefix(obs)
        image_len = kept.shape[1]
        for b in range(2):
            source = np.flatnonzero(kept[b])  # the live compact slots hold the kept patches in order
            live_prompt = np.flatnonzero(np.asarray(upstream_mask[b, image_len:]))
            want = np.concatenate([upstream_prefix[b, source], upstream_prefix[b, image_len + live_prompt]])
            live_slots = np.asarray(slot_mask[b, :300])
            got = np.concatenate([prefix_positions[b, :300][live_slots], prefix_positions[b, 300 + live_prompt]])
            if keep_positions:
                np.testing.assert_array_equal(got, want)
                np.testing.assert_array_equal(suffix_positions[b], upstream_suffix[b])
            else:  # OpenPI's own numbering of the shorter prefix: 0, 1, 2, ...
                np.testing.assert_array_equal(got, np.arange(len(got)))


@pytest.mark.parametrize("method, capacity", [("keep_all", 768), ("relevance", 154)])
def test_compact_capacity_follows_the_method_so_nothing_overflows(pi05, method, capacity):
    cfg, _ = pi05
    with openpi_prune.enabled(method=method):
        model = small.create(cfg, seed=2)
    obs = small.observation(cfg, batch_size=2)
    with openpi_prune.enabled(method=method, mode="compact", warn_below=0):
        model.sample_actions(jax.random.key(0), obs, num_steps=1)
        report = last_report()
    assert report.capacity == capacity
    assert report.overflow.tolist() == [0, 0]
    live = report.candidates
    want = live if method == "keep_all" else np.ceil(0.2 * live)
    np.testing.assert_array_equal(report.kept, want)
