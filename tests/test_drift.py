"""A changed OpenPI, target by target: the named error in strict mode, a logged skip otherwise, and
OpenPI left exactly as it was (every attribute the same object)."""

import functools
import importlib.util
import inspect
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import openpi_prune
from openpi_prune import IncompatibleOpenPIError
from openpi_prune.adapter import install, table
from openpi_prune.adapter.patches import Patch
from openpi_prune.tools import small

ALL = (*table.CORE, table.SERVING, *table.PYTORCH)


def _attributes() -> dict:
    install.import_openpi()
    importlib.import_module(table.SERVING.module)
    return {t.qualname: inspect.getattr_static(t.owner_object(), t.name, None) for t in ALL}


def _statements_moved(target: Patch, folder):
    """A function with the target's parameters whose source has its statements in reverse order
    (or, with only one, without it)."""
    statements = target.source[::-1] if len(target.source) > 1 else ()
    body = "\n".join(statements)
    (folder / "moved.py").write_text(f"def {target.name}({', '.join(target.parameters)}):\n    '''\n{body}\n    '''\n")
    spec = importlib.util.spec_from_file_location(f"moved_{target.key.replace('.', '_')}", folder / "moved.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, target.name)


def _changed_signature(*args, new_argument=None, **kwargs):
    raise AssertionError("never called: enable() must refuse it")


def _drift(kind: str, target: Patch, monkeypatch, folder) -> re.Pattern:
    install.import_openpi()
    owner = target.owner_object()
    name = re.escape(target.qualname)
    if kind == "renamed":
        monkeypatch.delattr(owner, target.name)
        return re.compile(rf"{name} is missing")
    if kind == "signature":
        monkeypatch.setattr(owner, target.name, _changed_signature)
        return re.compile(rf"{name} takes \(args, new_argument, kwargs\), expected \(")
    monkeypatch.setattr(owner, target.name, _statements_moved(target, folder))
    return re.compile(rf"{name} no longer has `.*` \(in this order\)")


CASES = [
    pytest.param(kind, target, id=f"{target.key}-{kind}")
    for target in table.CORE + table.PYTORCH
    for kind in ("renamed", "signature", "moved")
    if kind != "moved" or target.source
]


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "lenient"])
@pytest.mark.parametrize(("kind", "target"), CASES)
def test_a_changed_target_is_named_and_nothing_is_patched(kind, target, strict, monkeypatch, tmp_path, caplog):
    expected = _drift(kind, target, monkeypatch, tmp_path)
    before = _attributes()
    if strict:
        with pytest.raises(IncompatibleOpenPIError, match=expected) as raised:
            openpi_prune.enable(method="language_only")
        assert "Nothing was patched" in str(raised.value)
    else:
        with caplog.at_level(logging.WARNING, "openpi_prune"):
            assert openpi_prune.enable(method="language_only", strict=False) is None
        assert expected.search(caplog.text) and "Pruning is off" in caplog.text
    assert not openpi_prune.is_enabled()
    assert all(now is before[name] for name, now in _attributes().items())


def _returns(monkeypatch, target: Patch, change):
    """Make `target` return `change(original, args, kwargs)`, its signature and source as they are."""
    owner = target.owner_object()
    original = inspect.getattr_static(owner, target.name)

    @functools.wraps(original)
    def drifted(*args, **kwargs):
        return change(original, args, kwargs)

    monkeypatch.setattr(owner, target.name, drifted)


def _target(key):
    return next(t for t in ALL if t.key == key)


def _call_embed_prefix(pi05):
    cfg, model = pi05
    return model.embed_prefix(small.observation(cfg))


def _call_make_attn_mask(pi05):
    from openpi.models import pi0

    return pi0.make_attn_mask(jnp.ones((1, 4), bool), jnp.zeros((4,), bool))


def _call_compute_loss(pi05):
    cfg, model = pi05
    return model.compute_loss(jax.random.key(0), small.observation(cfg, batch_size=2), small.actions(cfg, batch_size=2))


def _call_checkpoint_load(pi05):
    from openpi.training import weight_loaders

    return weight_loaders.CheckpointWeightLoader("unused").load({"w": np.zeros(2)})


def _call_policy_infer(pi05):
    from openpi.policies import policy

    cfg, model = pi05
    obs = small.observation(cfg)
    inputs = {"image": obs.images, "image_mask": obs.image_masks, "state": obs.state[0]}
    inputs |= {"tokenized_prompt": obs.tokenized_prompt[0], "tokenized_prompt_mask": obs.tokenized_prompt_mask[0]}
    inputs["image"] = {k: np.asarray(v[0]) for k, v in inputs["image"].items()}
    inputs["image_mask"] = {k: np.asarray(v[0]) for k, v in inputs["image_mask"].items()}
    return policy.Policy(model, sample_kwargs={"num_steps": 1}).infer(inputs)


def _form(value):
    return value.shape if hasattr(value, "shape") else len(value)


def _result(original, args, kwargs):
    return original(*args, **kwargs)


RETURNS = {  # target -> (what it returns now, what calls it, what the message says)
    "Pi0.embed_prefix": (lambda *a: _result(*a)[:2], _call_embed_prefix, "returned a tuple of 2"),
    "make_attn_mask": (lambda *a: _result(*a)[0], _call_make_attn_mask, r"returned an array of shape \(4, 4\)"),
    "Pi0.compute_loss": (lambda *a: jnp.mean(_result(*a)), _call_compute_loss, r"returned an array of shape \(\)"),
    # (The original would read a checkpoint.)
    "CheckpointWeightLoader.load": (lambda o, a, k: [a[-1]], _call_checkpoint_load, "returned a list"),
    "Policy.infer": (lambda *a: list(_result(*a).items()), _call_policy_infer, "returned a list"),
}


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "lenient"])
@pytest.mark.parametrize("key", RETURNS)
def test_another_return_shape_is_named_and_left_as_openpi_gave_it(key, strict, pi05, monkeypatch, caplog):
    change, call, message = RETURNS[key]
    target = _target(key)
    _returns(monkeypatch, target, change)
    before = _attributes()
    openpi_prune.enable(method="language_only", strict=strict)
    expected = rf"OpenPI's {re.escape(target.qualname)} {message}"
    if strict:
        with pytest.raises(IncompatibleOpenPIError, match=expected):
            call(pi05)
    else:
        with caplog.at_level(logging.WARNING, "openpi_prune"):
            result = call(pi05)
        assert re.search(expected + ".*this call runs unpruned", caplog.text)
        with openpi_prune.disabled():
            upstream = call(pi05)
        assert type(result) is type(upstream) and _form(result) == _form(upstream)
    openpi_prune.disable()
    assert all(now is before[name] for name, now in _attributes().items())
