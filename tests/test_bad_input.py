"""Every row of `docs/bad-input.md`, one test each (named after the row's id).

Each bad input gets an error that names what is wrong and what to do, or the documented behaviour;
never a NaN out of the model, never a half-applied patch, nothing lost from a checkpoint.
"""

import dataclasses
import inspect
import logging
import pathlib
import re
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import last_report, run_child
from flax import nnx
from jaxtyping import TypeCheckError

import openpi_prune
from openpi_prune import PruneInputError, SettingsError, hookspecs, telemetry
from openpi_prune.adapter import install, table, training
from openpi_prune.errors import UncountedStepsWarning, UntrainedParametersWarning, UnusedParametersWarning
from openpi_prune.settings import PruneSettings, parse
from openpi_prune.tools import small

DOC = pathlib.Path(__file__).parent.parent / "docs" / "bad-input.md"
CAMERAS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")


def test_every_row_of_the_table_has_its_test_and_every_test_its_row():
    rows = re.findall(r"^\| `([a-z0-9-]+)` \|", DOC.read_text(), flags=re.MULTILINE)
    assert len(rows) == len(set(rows)) >= 30
    tests = {name[len("test_") :].replace("_", "-") for name in globals() if name.startswith("test_")}
    tests.discard("every-row-of-the-table-has-its-test-and-every-test-its-row")
    assert set(rows) == tests


def _sample(model, observation, num_steps=2, seed=0):
    return np.asarray(model.sample_actions(jax.random.key(seed), observation, num_steps=num_steps))


def _openpi_attributes() -> dict:
    """Every attribute openpi-prune may wrap, as the objects OpenPI holds now."""
    install.import_openpi()
    return {t.qualname: inspect.getattr_static(t.owner_object(), t.name) for t in table.CORE}


def _child(openpi_prune_value: str) -> dict:
    """Import OpenPI twice in a fresh interpreter with `OPENPI_PRUNE` set; what each import did."""
    script = textwrap.dedent(
        """
        import json, sys
        outcomes = []
        for attempt in range(2):
            try:
                import openpi.models.pi0
                import openpi_prune
                outcomes.append("enabled" if openpi_prune.is_enabled() else "unpatched")
            except Exception as error:
                outcomes.append(f"{type(error).__name__}: {error}")
        print(json.dumps(outcomes))
        """
    )
    return run_child(script, OPENPI_PRUNE=openpi_prune_value)


# --- OPENPI_PRUNE -------------------------------------------------------------------------------


def test_env_not_key_value():
    with pytest.raises(SettingsError, match="'fast' is not key=value; use 1 for the defaults"):
        parse("fast")


def test_env_unknown_setting():
    with pytest.raises(SettingsError, match="unknown setting 'capcity'; known: method, scoring, mode, capacity"):
        parse("capcity=96")


def test_env_repeated_setting():
    with pytest.raises(SettingsError, match="'mode' is given twice"):
        parse("mode=masked,mode=compact")


def test_env_bad_number():
    with pytest.raises(SettingsError, match="capacity must be an integer; got 'lots'"):
        parse("capacity=lots")
    with pytest.raises(SettingsError, match="keep_fraction must be a number; got 'most'"):
        parse("keep_fraction=most")


def test_env_bad_switch():
    with pytest.raises(SettingsError, match="telemetry must be one of 1/true/on/yes/0/false/off/no; got 'maybe'"):
        parse("telemetry=maybe")


def test_env_invalid_value_fails_every_import():
    for value, message in (
        ("capcity=96", "SettingsError: OPENPI_PRUNE='capcity=96': unknown setting 'capcity'"),
        ("method=nope", "SettingsError: unknown pruning method 'nope'"),
    ):
        outcomes = _child(value)
        assert len(outcomes) == 2 and all(o.startswith(message) for o in outcomes), outcomes


def test_env_off_values():
    assert parse("1") == PruneSettings()
    for value in ("0", "off"):
        assert _child(value) == ["unpatched", "unpatched"]


# --- Settings in code -----------------------------------------------------------------------------


def test_setting_bad_mode():
    with pytest.raises(SettingsError, match="mode must be one of compact, masked; got 'sparse'"):
        PruneSettings(mode="sparse")


def test_setting_bad_scoring():
    with pytest.raises(SettingsError, match="scoring must be one of lightvla, centred, robust; got 'zscore'"):
        PruneSettings(scoring="zscore")


def test_setting_bad_saliency():
    with pytest.raises(SettingsError, match="saliency must be one of gradient, deviation; got 'attention'"):
        PruneSettings(saliency="attention")


def test_setting_bad_train_picks():
    with pytest.raises(SettingsError, match="train_picks must be head or saliency; got 'votes'"):
        PruneSettings(train_picks="votes")


@pytest.mark.parametrize("capacity", [0, -3, True, 2.5])
def test_setting_capacity_not_positive(capacity):
    with pytest.raises(SettingsError, match="capacity must be a positive number of image tokens"):
        PruneSettings(capacity=capacity)


@pytest.mark.parametrize("fraction", [0, 1.5, True, "0.2"])
def test_setting_keep_fraction_out_of_range(fraction):
    with pytest.raises(SettingsError, match=r"keep_fraction must be a number in \(0, 1\]"):
        PruneSettings(keep_fraction=fraction)


@pytest.mark.parametrize("mass", [-0.1, 1.5, True, "0.9"])
def test_setting_keep_mass_out_of_range(mass):
    with pytest.raises(SettingsError, match=r"keep_mass must be a number in \[0, 1\] \(0: a fixed keep_fraction\)"):
        PruneSettings(keep_mass=mass)


def test_setting_negative_numbers():
    with pytest.raises(SettingsError, match="noise_scale must be a number >= 0"):
        PruneSettings(noise_scale=-1)
    with pytest.raises(SettingsError, match="warn_below must be an integer >= 0"):
        PruneSettings(warn_below=-1)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("keep_ramp_steps", -1, "keep_ramp_steps must be an integer >= 0"),
        ("noise_steps", 2.5, "noise_steps must be an integer >= 0"),
        ("saliency_every", 0, "saliency_every must be an integer >= 1"),
        ("saliency_share", 0, "saliency_share must be a share of the batch"),
        ("saliency_share", 1.5, "saliency_share must be a share of the batch"),
        ("log_every", True, "log_every must be an integer >= 0"),
        ("compact_training", "yes", "compact_training must be True or False"),
        ("merge_unkept", 3, "merge_unkept must be 0 \\(off\\) or a square number"),
        ("merge_unkept", True, "merge_unkept must be 0 \\(off\\) or a square number"),
    ],
)
def test_setting_bad_training_schedule(name, value, message):
    with pytest.raises(SettingsError, match=message):
        PruneSettings(**{name: value})


def test_setting_bad_lists():
    for buckets in ((64, 32), (0,), (16, 16)):
        with pytest.raises(SettingsError, match=r"prompt_buckets must be increasing .*\(32, 64, 128\)"):
            PruneSettings(prompt_buckets=buckets)
    with pytest.raises(SettingsError, match=r"drop_cameras must be a tuple .*\('right_wrist_0_rgb',\)"):
        PruneSettings(drop_cameras="right_wrist_0_rgb")
    with pytest.raises(SettingsError, match=r"joined by '\+', e.g. 32\+64\+128; got 'short'"):
        parse("prompt_buckets=short")


def test_setting_unknown_name():
    before = _openpi_attributes()
    with pytest.raises(SettingsError, match="unknown setting.s. capcity; known: method"):
        openpi_prune.enable(capcity=3)
    assert not openpi_prune.is_enabled()
    assert _openpi_attributes() == before


def test_setting_unknown_method():
    before = _openpi_attributes()
    with pytest.raises(SettingsError, match="unknown pruning method 'nope'; known: action_queries, distinct, keep_all"):
        openpi_prune.enable(method="nope")
    assert not openpi_prune.is_enabled()
    assert all(now is before[name] for name, now in _openpi_attributes().items())


def test_setting_bad_change_keeps_what_was_in_force():
    settings = openpi_prune.enable(method="language_only")
    wrapped = _openpi_attributes()
    with pytest.raises(SettingsError, match="unknown pruning method 'nope'"):
        openpi_prune.enable(method="nope")
    with pytest.raises(SettingsError, match="mode must be one of"):
        openpi_prune.enable(mode="sparse")
    assert openpi_prune.current_settings() == settings
    assert all(now is wrapped[name] for name, now in _openpi_attributes().items())


# --- Observations -------------------------------------------------------------------------------


def test_obs_every_camera_masked(pi05):
    cfg, model = pi05
    obs = small.observation(cfg, batch_size=1, camera_masks={name: [False] for name in CAMERAS})
    actions = small.actions(cfg)
    for mode in ("compact", "masked"):
        with openpi_prune.enabled(method="scheme_b", mode=mode, warn_below=0):
            sampled = _sample(model, obs)
            report = last_report()
            losses = [model.compute_loss(jax.random.key(0), obs, actions, train=t) for t in (False, True)]
        assert report.kept[0] == 0 and report.candidates[0] == 0
        assert all(np.isfinite(np.asarray(v)).all() for v in (sampled, *losses))


def test_obs_prefix_without_noisy_actions(pi05):
    cfg, model = pi05
    with (
        openpi_prune.enabled(method="scheme_b"),
        pytest.raises(PruneInputError, match=r"needs the noisy actions.*openpi_prune.noisy_actions\(x_t, time\)"),
    ):
        model.embed_prefix(small.observation(cfg))


def test_obs_empty_prompt(pi05):
    cfg, model = pi05
    obs = small.observation(cfg, batch_size=2, prompt_tokens=[0, 12])
    with openpi_prune.enabled(method="language_only", mode="masked"):
        actions = _sample(model, obs)
        report = last_report()
    # Nothing to vote against: every live patch is kept for the prompt-less sample.
    assert report.kept[0] == report.candidates[0] == 768
    assert report.kept[1] < 768
    assert np.isfinite(actions).all()


def test_obs_no_prompt(pi05):
    cfg, model = pi05
    obs = small.observation(cfg).replace(tokenized_prompt=None, tokenized_prompt_mask=None)
    with openpi_prune.enabled(method="language_only"), pytest.raises(PruneInputError, match="no tokenized prompt"):
        _sample(model, obs)


def test_obs_batch_of_one(pi05):
    cfg, model = pi05
    two = small.observation(cfg, batch_size=2, prompt_tokens=[12, 5])
    one = jax.tree.map(lambda x: x[:1], two)
    noise = jax.random.normal(jax.random.key(3), (2, cfg.action_horizon, cfg.action_dim))
    with openpi_prune.enabled(method="language_only"):
        both = model.sample_actions(jax.random.key(0), two, num_steps=2, noise=noise)
        alone = model.sample_actions(jax.random.key(0), one, num_steps=2, noise=noise[:1])
    np.testing.assert_allclose(np.asarray(alone)[0], np.asarray(both)[0], atol=1e-5)


def _with_pixels(obs, camera: str, value: float, sample: int = 0):
    image = obs.images[camera].at[sample, 10, 10, 0].set(value)
    return dataclasses.replace(obs, images={**obs.images, camera: image})


@pytest.mark.parametrize("mode", ["compact", "masked"])
def test_obs_nan_pixels(pi05, mode):
    cfg, model = pi05
    clean = small.observation(cfg, batch_size=2)
    noise = jax.random.normal(jax.random.key(3), (2, cfg.action_horizon, cfg.action_dim))
    with openpi_prune.enabled(method="language_only", mode=mode, warn_below=0):
        expected = np.asarray(model.sample_actions(jax.random.key(0), clean, num_steps=2, noise=noise))
        with pytest.warns(telemetry.NonFiniteInputWarning, match="256 live image token.s. held NaN or inf"):
            actions = np.asarray(
                model.sample_actions(
                    jax.random.key(0), _with_pixels(clean, "base_0_rgb", np.nan), num_steps=2, noise=noise
                )
            )
            report = last_report()
    # SigLIP spreads one bad pixel over its camera's tokens: that camera is dropped for that sample.
    assert report.nonfinite.tolist() == [256, 0]
    assert report.kept_per_camera[0, 0] == 0 and report.kept_per_camera[0, 1] > 0
    assert np.isfinite(actions).all()
    np.testing.assert_allclose(actions[1], expected[1], atol=1e-5)


def test_obs_inf_pixels(pi05):
    cfg, model = pi05
    obs = _with_pixels(small.observation(cfg, batch_size=1), "left_wrist_0_rgb", np.inf)
    with openpi_prune.enabled(method="keep_all"), pytest.warns(telemetry.NonFiniteInputWarning):
        actions = _sample(model, obs)
        report = last_report()
    assert report.kept_per_camera.tolist() == [[256, 0, 256]]
    assert np.isfinite(actions).all()


def test_obs_every_pixel_nan(pi05):
    cfg, model = pi05
    obs = small.observation(cfg, batch_size=1)
    obs = dataclasses.replace(obs, images={k: jnp.full_like(v, jnp.nan) for k, v in obs.images.items()})
    with openpi_prune.enabled(method="language_only", warn_below=0), pytest.warns(telemetry.NonFiniteInputWarning):
        actions = _sample(model, obs)
        loss = model.compute_loss(jax.random.key(0), obs, small.actions(cfg), train=False)
        report = last_report()
    assert report.kept[0] == 0
    assert np.isfinite(actions).all() and np.isfinite(np.asarray(loss)).all()


def test_obs_uint8_images(pi05):
    cfg, model = pi05
    obs = small.observation(cfg, batch_size=1)
    as_uint8 = {k: np.asarray((v + 1) * 127.5, np.uint8) for k, v in obs.images.items()}
    # OpenPI's own type check, before anything is pruned; `from_dict` converts uint8 images.
    with pytest.raises(TypeCheckError, match="images"):
        dataclasses.replace(obs, images=as_uint8)
    data = {
        "image": as_uint8,
        "image_mask": obs.image_masks,
        "state": obs.state,
        "tokenized_prompt": obs.tokenized_prompt,
        "tokenized_prompt_mask": obs.tokenized_prompt_mask,
    }
    from openpi.models import model as _model

    with openpi_prune.enabled(method="language_only"):
        assert np.isfinite(_sample(model, _model.Observation.from_dict(data))).all()


def test_obs_other_resolution(pi05):
    cfg, model = pi05
    obs = small.observation(cfg, batch_size=1)
    obs = dataclasses.replace(obs, images={k: v[:, :128, :160] for k, v in obs.images.items()})
    with openpi_prune.enabled(method="language_only"):
        actions = _sample(model, obs)  # OpenPI resizes with padding to 224 x 224
        report = last_report()
    assert report.candidates[0] == 768 and np.isfinite(actions).all()


def test_obs_four_channels(pi05):
    cfg, model = pi05
    obs = small.observation(cfg, batch_size=1)
    base = obs.images["base_0_rgb"]
    obs = dataclasses.replace(obs, images={**obs.images, "base_0_rgb": jnp.concatenate([base, base[..., :1]], -1)})
    with openpi_prune.enabled(method="language_only"), pytest.raises(Exception, match=r"\(14, 14, 3, .*\(14, 14, 4, "):
        _sample(model, obs)


def test_obs_extra_camera(pi05):
    cfg, model = pi05
    obs = small.observation(cfg, batch_size=1)
    extra = dataclasses.replace(
        obs,
        images={**obs.images, "top_rgb": obs.images["base_0_rgb"]},
        image_masks={**obs.image_masks, "top_rgb": obs.image_masks["base_0_rgb"]},
    )
    with openpi_prune.enabled(method="language_only"):
        np.testing.assert_array_equal(_sample(model, extra), _sample(model, obs))


def test_obs_missing_camera(pi05):
    cfg, model = pi05
    obs = small.observation(cfg, batch_size=1)
    fewer = dataclasses.replace(
        obs,
        images={k: v for k, v in obs.images.items() if k != "right_wrist_0_rgb"},
        image_masks={k: v for k, v in obs.image_masks.items() if k != "right_wrist_0_rgb"},
    )
    with openpi_prune.enabled(method="language_only"), pytest.raises(ValueError, match="images dict missing keys"):
        _sample(model, fewer)


def test_obs_dropped_camera_absent(pi05):
    cfg, model = pi05
    obs = small.observation(cfg, batch_size=1)
    with openpi_prune.enabled(drop_cameras=("cam_high",)):
        with pytest.raises(PruneInputError, match="cameras base_0_rgb, left_wrist_0_rgb, right_wrist_0_rgb.*cam_high"):
            _sample(model, obs)
    with openpi_prune.enabled(drop_cameras=CAMERAS):
        with pytest.raises(PruneInputError, match="drops every one of them"):
            _sample(model, obs)


def test_obs_batch_mismatch(pi05):
    cfg, _ = pi05
    obs = small.observation(cfg, batch_size=2)
    with pytest.raises(TypeCheckError):
        dataclasses.replace(obs, images={**obs.images, "base_0_rgb": obs.images["base_0_rgb"][:1]})


# --- Capacities -----------------------------------------------------------------------------------


def test_capacity_all_image_tokens(pi05):
    cfg, model = pi05
    obs = small.observation(cfg, batch_size=2, prompt_tokens=[12, 5])
    with openpi_prune.disabled():
        upstream = _sample(model, obs)
    with openpi_prune.enabled(method="keep_all", capacity=768):
        kept_all = _sample(model, obs)
        report = last_report()
    assert report.kept.tolist() == [768, 768] and report.overflow.tolist() == [0, 0]
    np.testing.assert_allclose(kept_all, upstream, atol=1e-5)


def test_capacity_past_image_tokens(pi05):
    cfg, model = pi05
    with (
        openpi_prune.enabled(method="language_only", capacity=769),
        pytest.raises(PruneInputError, match="capacity 769 exceeds the 768 image tokens.*choose 1..768"),
    ):
        _sample(model, small.observation(cfg))


def test_capacity_one(pi05):
    cfg, model = pi05
    with openpi_prune.enabled(method="language_only", capacity=1, warn_below=0):
        actions = _sample(model, small.observation(cfg, batch_size=2))
        report = last_report()
    assert report.kept.tolist() == [1, 1]
    assert report.prefix_length.tolist() == [1 + cfg.max_token_len] * 2
    assert np.isfinite(actions).all()


def test_capacity_below_the_method(pi05):
    cfg, model = pi05
    with openpi_prune.enabled(method="keep_all", capacity=96):
        _sample(model, small.observation(cfg, batch_size=1))
        report = last_report()
    assert report.kept[0] == 96 and report.overflow[0] == 768 - 96


def test_keep_fraction_tiny(relevance_model):
    cfg, model = relevance_model
    with openpi_prune.enabled(method="relevance", keep_fraction=0.001, warn_below=0):
        actions = _sample(model, small.observation(cfg, batch_size=2))
        report = last_report()
    assert report.kept.tolist() == [1, 1]  # ceil(0.001 x 768): never nothing
    assert np.isfinite(actions).all()


# --- Checkpoints ----------------------------------------------------------------------------------


def _params(model) -> dict:
    return nnx.state(model, nnx.Param).to_pure_dict()


def _load(cfg, params):
    """OpenPI's `BaseModelConfig.load`, building the small models' SigLIP."""
    with small.siglip_variant("mu/14"):
        return cfg.load(params)


def test_checkpoint_without_pruner_parameters(plain_checkpoint):
    cfg, params, _ = plain_checkpoint
    with openpi_prune.enabled(method="relevance"), pytest.warns(UntrainedParametersWarning, match="no prune_relevance"):
        model = _load(cfg, params)
    assert "prune_relevance_query" in nnx.state(model, nnx.Param).to_pure_dict()


def test_checkpoint_other_method_parameters(pi05):
    cfg, model = pi05  # made with Scheme B: it carries the action projector
    params = _params(model)
    with openpi_prune.enabled(method="relevance"):
        with pytest.warns(UnusedParametersWarning, match="prune_action_proj belong to another pruning method"):
            loaded = _load(cfg, params)
    assert "prune_action_proj" not in _params(loaded)
    assert "prune_action_proj" in params  # the caller's tree is left as it was


def test_checkpoint_mis_shaped_parameters(pi05):
    cfg, model = pi05
    params = _params(model)
    kernel = params["prune_action_proj"]["kernel"]
    bad = {**params, "prune_action_proj": {**params["prune_action_proj"], "kernel": kernel[:, :-1]}}
    with (
        openpi_prune.enabled(method="scheme_b"),
        pytest.raises(PruneInputError, match="prune_action_proj has shapes .*but scheme_b on this model needs"),
    ):
        _load(cfg, bad)


def test_checkpoint_round_trip(relevance_model, tmp_path):
    import orbax.checkpoint as ocp
    from openpi.models import model as _model

    cfg, model = relevance_model
    params = _params(model)
    with ocp.PyTreeCheckpointer() as checkpointer:  # as OpenPI saves `params`
        checkpointer.save(tmp_path / "params", {"params": params})
    with openpi_prune.enabled(method="relevance"), warnings.catch_warnings():
        warnings.simplefilter("error", UntrainedParametersWarning)
        loaded = _params(_load(cfg, _model.restore_params(tmp_path / "params", restore_type=np.ndarray)))
    for name in ("prune_relevance_query", "prune_relevance_key"):
        jax.tree.map(np.testing.assert_array_equal, loaded[name], params[name])


def test_relevance_untrained_head(pi05):
    cfg, model = pi05  # created before relevance was enabled: no head
    with (
        openpi_prune.enabled(method="relevance"),
        pytest.raises(PruneInputError, match="relevance needs its learned head.*Enable it first, then create"),
    ):
        _sample(model, small.observation(cfg))


def test_relevance_hidden_mismatch(relevance_hidden_model):
    cfg, model = relevance_hidden_model  # its head made with relevance_hidden=16
    for other in (0, 32):
        with (
            openpi_prune.enabled(method="relevance", relevance_hidden=other),
            pytest.raises(PruneInputError, match=f"relevance_hidden is {other}.*made with relevance_hidden=16: set it"),
        ):
            _sample(model, small.observation(cfg))


# --- Plugins --------------------------------------------------------------------------------------


class _Broken:
    """A third-party method whose hooks misbehave as `how` says."""

    def __init__(self, how: str):
        self.how = how

    @hookspecs.hookimpl
    def openpi_prune_methods(self):
        return ["broken"]

    @hookspecs.hookimpl
    def openpi_prune_task_context(self, text_tokens, text_mask, settings):
        return (text_tokens, text_mask) if settings.method == "broken" else None

    @hookspecs.hookimpl
    def openpi_prune_score(self, image_tokens, candidate_mask, settings):
        if settings.method != "broken":
            return None
        if self.how == "score raises":
            raise RuntimeError("broken plugin: no score today")
        if self.how == "score shape":
            return jnp.zeros(image_tokens.shape[:2] + (3,))
        return jnp.zeros(image_tokens.shape[:2])

    @hookspecs.hookimpl
    def openpi_prune_select(self, scores, candidate_mask, settings):
        if settings.method != "broken":
            return None
        return candidate_mask[:, 0] if self.how == "select shape" else candidate_mask

    @hookspecs.hookimpl
    def openpi_prune_report(self, telemetry):
        if self.how == "report raises":
            raise RuntimeError("broken plugin: cannot report")


@pytest.fixture
def broken(register_plugin):
    return lambda how: register_plugin(_Broken(how), name="broken")


def test_plugin_score_raises(pi05, broken):
    cfg, model = pi05
    broken("score raises")
    obs = small.observation(cfg)
    openpi_prune.enable(method="broken")
    wrapped = _openpi_attributes()
    with pytest.raises(RuntimeError, match="no score today"):
        _sample(model, obs)
    # OpenPI stays patched as a whole, and the next call with a working method runs.
    assert _openpi_attributes() == wrapped and all(install.installed().values())
    openpi_prune.enable(method="language_only")
    assert np.isfinite(_sample(model, obs)).all()


def test_plugin_score_wrong_shape(pi05, broken):
    cfg, model = pi05
    broken("score shape")
    with (
        openpi_prune.enabled(method="broken"),
        pytest.raises(
            PruneInputError,
            match=r"openpi_prune_score of method 'broken' \(plugin 'broken'\) returned shape \(1, 768, 3\); expected \[1, 768, 768\] or \[1, 768\]",
        ),
    ):
        _sample(model, small.observation(cfg))


def test_plugin_select_wrong_shape(pi05, broken):
    cfg, model = pi05
    broken("select shape")
    with (
        openpi_prune.enabled(method="broken"),
        pytest.raises(
            PruneInputError,
            match=r"openpi_prune_select of method 'broken' .* returned shape \(1,\); expected \[1, 768\]",
        ),
    ):
        _sample(model, small.observation(cfg))


def test_plugin_report_raises(pi05, broken, caplog):
    cfg, model = pi05
    broken("report raises")
    telemetry.clear()
    with openpi_prune.enabled(method="language_only"), caplog.at_level(logging.ERROR, "openpi_prune"):
        actions = _sample(model, small.observation(cfg))
        jax.effects_barrier()
        assert telemetry.flush(timeout=60)
    assert np.isfinite(actions).all()
    assert "the openpi_prune_report hook of 'broken' raised; skipped" in caplog.text
    assert telemetry.recent()  # the built-in recorder still got its report


def test_schedule_on_a_model_without_its_step():
    with openpi_prune.disabled():
        model = small.create(small.config(pi05=True, max_token_len=48))
    cfg = small.config(pi05=True, max_token_len=48)
    observation, actions = small.observation(cfg, batch_size=1, prompt_tokens=4), small.actions(cfg, batch_size=1)
    with openpi_prune.enabled(method="keep_all", keep_ramp_steps=10, telemetry=False):
        with pytest.raises(openpi_prune.PruneInputError, match="created before openpi-prune was enabled"):
            model.compute_loss(jax.random.key(0), observation, actions, train=True)
    # saliency_every is a cost, not a schedule: a method without saliency trains as it would anyway.
    with openpi_prune.enabled(method="keep_all", saliency_every=4, telemetry=False), warnings.catch_warnings():
        warnings.simplefilter("error", UncountedStepsWarning)
        assert np.isfinite(model.compute_loss(jax.random.key(0), observation, actions, train=True)).all()


def test_saliency_every_on_a_model_without_its_step():
    """A model that counts no steps (here: its count removed) gets its saliency on every step, with
    a warning that says how to get the cheaper step."""
    cfg = small.config(pi05=True, max_token_len=48)
    with openpi_prune.enabled(method="relevance"):
        model = small.create(cfg)
    delattr(model, training.STEP)
    observation, actions = small.observation(cfg, batch_size=1, prompt_tokens=4), small.actions(cfg, batch_size=1)
    with (
        openpi_prune.enabled(method="relevance", saliency_every=4, telemetry=False),
        telemetry.collect() as reports,
        pytest.warns(UncountedStepsWarning, match="its saliency runs on every step. Enable openpi-prune first"),
    ):
        for _ in range(2):
            model.compute_loss(jax.random.key(0), observation, actions, train=True)
    distill = [float(np.mean(report["distill_loss"])) for report in reports]
    assert len(distill) == 2 and min(distill) > 0  # saliency on both steps, not on every 4th


def test_setting_bad_siglip_layer():
    for value in (-1, True, 2.5, "4"):
        with pytest.raises(SettingsError, match=r"siglip_layer must be an integer >= 0 .*or None"):
            PruneSettings(siglip_layer=value)
    with pytest.raises(SettingsError, match="siglip_layer must be an integer; got 'early'"):
        parse("siglip_layer=early")
    assert parse("siglip_layer=none").siglip_layer is None and parse("siglip_layer=4").siglip_layer == 4
    assert parse("siglip_layer=0").siglip_layer == 0  # before SigLIP's first layer


def test_siglip_layer_beyond_the_encoder(pi05):
    cfg, model = pi05  # SigLIP mu/14: one layer
    with openpi_prune.enabled(siglip_layer=2, telemetry=False):
        with pytest.raises(openpi_prune.PruneInputError, match="has 1 layers: choose 0..1"):
            _sample(model, small.observation(cfg))


def test_siglip_layer_with_a_mixing_method_in_training(pi05):
    cfg, model = pi05
    observation, actions = small.observation(cfg, batch_size=1), small.actions(cfg, batch_size=1)
    with openpi_prune.enabled(method="language_only", siglip_layer=1, telemetry=False):
        assert np.isfinite(_sample(model, observation)).all()  # at inference each camera votes on its own
        with pytest.raises(openpi_prune.PruneInputError, match="siglip_layer in training needs a method that keeps"):
            model.compute_loss(jax.random.key(0), observation, actions, train=True)
