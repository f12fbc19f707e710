"""The patch layer: guarded, all or nothing, undoable, and honest about compiled functions."""

import importlib.metadata
import inspect
import logging
import sys
import types

import jax
import pytest
import wrapt
from openpi.models import pi0 as openpi_pi0
from openpi.shared import nnx_utils

import openpi_prune
from openpi_prune import IncompatibleOpenPIError, errors, hookspecs
from openpi_prune.adapter import install, table
from openpi_prune.pruner import plugins
from openpi_prune.tools import small


def _ours(name):
    return isinstance(inspect.getattr_static(openpi_pi0.Pi0, name), install.PruneFunctionWrapper)


def _none_of_ours():
    return not any(
        isinstance(inspect.getattr_static(t.owner_object(), t.name), install.PruneFunctionWrapper) for t in table.CORE
    )


def test_enable_wraps_every_target_and_disable_removes_only_ours():
    def theirs(wrapped, instance, args, kwargs):
        return wrapped(*args, **kwargs)

    openpi_prune.enable()
    assert all(install.installed().values()) and len(install.installed()) == len(table.CORE)
    # Someone else wraps embed_prefix on top of us; disabling us must leave theirs in place.
    handle = wrapt.wrap_function_wrapper(openpi_pi0.Pi0, "embed_prefix", theirs)
    openpi_prune.disable()
    assert inspect.getattr_static(openpi_pi0.Pi0, "embed_prefix") is handle
    assert not isinstance(handle.__wrapped__, install.PruneFunctionWrapper)
    wrapt.unwrap_object(openpi_pi0.Pi0, "embed_prefix", handle)
    assert _none_of_ours()


def test_incompatible_openpi_is_named_and_nothing_is_patched(monkeypatch, caplog):
    def compute_loss(self, rng, observation, actions, *, train=False):
        return None  # an upstream rewrite that no longer draws x_t the way the wrapper mirrors

    monkeypatch.setattr(openpi_pi0.Pi0, "compute_loss", compute_loss)
    with pytest.raises(IncompatibleOpenPIError, match=r"Pi0.compute_loss no longer has `preprocess_rng, noise_rng"):
        openpi_prune.enable()
    assert not openpi_prune.is_enabled() and not _ours("embed_prefix")
    with caplog.at_level(logging.WARNING, logger="openpi_prune"):
        openpi_prune.enable(strict=False)
    assert "does not match" in caplog.text and not openpi_prune.is_enabled() and not _ours("embed_prefix")


def test_signature_change_is_reported(monkeypatch):
    monkeypatch.setattr(openpi_pi0, "make_attn_mask", lambda input_mask, mask_ar, extra=None: None)
    problems = install.check_openpi()
    assert problems == [
        "openpi.models.pi0.make_attn_mask takes (input_mask, mask_ar, extra), expected (input_mask, mask_ar)"
    ]


def test_a_failing_wrap_rolls_back_the_others(monkeypatch):
    real_wrap = wrapt.wrap_object

    def wrap_object(owner, name, factory, args):
        if getattr(owner, "__name__", "") == "CheckpointWeightLoader":  # the last target
            raise RuntimeError("cannot wrap CheckpointWeightLoader.load")
        return real_wrap(owner, name, factory, args)

    monkeypatch.setattr(install.wrapt, "wrap_object", wrap_object)
    with pytest.raises(RuntimeError, match="cannot wrap CheckpointWeightLoader.load"):
        openpi_prune.enable()
    assert not openpi_prune.is_enabled()
    assert _none_of_ours()


def test_changes_after_tracing_warn(pi05):
    cfg, model = pi05
    obs = small.observation(cfg)
    openpi_prune.enable(method="language_only")
    jitted = nnx_utils.module_jit(model.sample_actions, static_argnames=("num_steps",))
    jitted(jax.random.key(0), obs, num_steps=1)
    with pytest.warns(
        errors.TracedBeforeChangeWarning, match="settings changed after a pruned model function was jit-compiled"
    ):
        openpi_prune.enable(method="scheme_b")
    openpi_prune.disable()
    # Enabling after a Policy-style function was compiled unpruned: those functions stay unpruned.
    late = nnx_utils.module_jit(model.sample_actions, static_argnames=("num_steps",))
    late(jax.random.key(0), obs, num_steps=1)
    with pytest.warns(errors.TracedBeforeChangeWarning, match="enabled after Pi0.sample_actions was jit-compiled"):
        openpi_prune.enable()
    del jitted, late


class _MaskSpy:
    def __init__(self):
        self.calls = 0

    @hookspecs.hookimpl
    def openpi_prune_attn_mask(self, attn_mask, input_mask, mask_ar, settings):
        self.calls += 1
        return None


def test_attn_mask_hook_sees_every_mask_openpi_builds(pi0, register_plugin):
    cfg, model = pi0
    spy = register_plugin(_MaskSpy())
    with openpi_prune.enabled(method="keep_all"):
        model.sample_actions(jax.random.key(0), small.observation(cfg), num_steps=2)
    # sample_actions builds one prefix mask, then one suffix mask per denoising step (traced once
    # in OpenPI's while_loop).
    assert spy.calls == 2


class _FakeDistribution(importlib.metadata.Distribution):
    """An installed distribution with one `openpi_prune` entry point, as pluggy's own tests fake it."""

    def read_text(self, filename):
        if filename == "METADATA":
            return "Metadata-Version: 2.1\nName: fake-prune-plugin\nVersion: 1.0\n"
        if filename == "entry_points.txt":
            return "[openpi_prune]\nfake = fake_prune_plugin\n"
        return None

    def locate_file(self, path):
        return path


@pytest.fixture
def fake_plugin(monkeypatch):
    module = types.ModuleType("fake_prune_plugin")
    module.openpi_prune_methods = hookspecs.hookimpl(lambda: ["fake_method"])
    monkeypatch.setitem(sys.modules, "fake_prune_plugin", module)
    monkeypatch.setattr(importlib.metadata, "distributions", lambda **kwargs: iter([_FakeDistribution()]))


@pytest.mark.parametrize(
    "env, loaded",
    [
        ({}, True),
        ({plugins.BLOCK_VAR: "fake"}, False),
        ({plugins.ALLOW_VAR: "other"}, False),
        ({plugins.ALLOW_VAR: "fake"}, True),
    ],
    ids=["default", "blocked", "not-allowed", "allowed"],
)
def test_plugin_manager_blocks_and_allows_by_environment(monkeypatch, fake_plugin, env, loaded):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    manager = plugins.create_manager()
    methods = plugins.known_methods(manager)
    assert {"scheme_b", "language_only", "keep_all"} <= set(methods)
    assert ("fake_method" in methods) is loaded
    assert (("fake", "fake-prune-plugin 1.0") in plugins.plugin_distributions(manager)) is loaded


def test_doctor_reports_targets_plugins_and_patches(capsys):
    from openpi_prune.tools import cli

    openpi_prune.enable()
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    openpi_dist = importlib.metadata.packages_distributions()["openpi"][0]
    assert f"OpenPI: {openpi_dist} {importlib.metadata.version(openpi_dist)}" in out
    for target in table.CORE + table.PYTORCH:
        assert target.qualname in out
    assert "scheme_b" in out and "builtin:SchemeB" in out
    assert out.count("yes") >= 2 * len(table.CORE + table.PYTORCH)  # compatible and patched, each
    assert out.count("yes, on each model built") == sum(t.per_instance for t in table.PYTORCH)
