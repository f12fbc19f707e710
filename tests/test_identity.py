"""With a keep-everything method, and after disable(), pi0 and pi0.5 match unpatched OpenPI bit for bit."""

import inspect

import jax
import numpy as np
import pytest
from openpi.models import pi0 as openpi_pi0
from openpi.shared import nnx_utils

import openpi_prune
from openpi_prune.tools import small

ORIGINALS = {
    name: inspect.getattr_static(openpi_pi0.Pi0, name)
    for name in ("__init__", "embed_prefix", "compute_loss", "sample_actions")
}
ORIGINAL_MASK = openpi_pi0.make_attn_mask


def _outputs(cfg, model, obs, actions):
    rng = jax.random.key(3)
    return {
        "loss": model.compute_loss(rng, obs, actions, train=False),
        "loss_train": model.compute_loss(rng, obs, actions, train=True),
        "actions": model.sample_actions(rng, obs, num_steps=2),
        # The way OpenPI's Policy runs it: module_jit of the bound method.
        "actions_jit": nnx_utils.module_jit(model.sample_actions, static_argnames=("num_steps",))(
            rng, obs, num_steps=2
        ),
    }


@pytest.mark.parametrize(
    "settings", [dict(mode="masked"), dict(mode="compact", capacity=768)], ids=["masked", "compact"]
)
def test_keep_all_is_bit_identical_to_openpi(any_model, settings):
    cfg, model = any_model
    # Camera 2 of sample 1 is masked, as OpenPI does for missing cameras.
    obs = small.observation(cfg, batch_size=2, prompt_tokens=[9, 4], camera_masks={"right_wrist_0_rgb": [True, False]})
    actions = small.actions(cfg, batch_size=2)
    upstream = _outputs(cfg, model, obs, actions)
    with openpi_prune.enabled(method="keep_all", **settings):
        patched = _outputs(cfg, model, obs, actions)
    for key, value in upstream.items():
        assert np.array_equal(np.asarray(value), np.asarray(patched[key])), key
    assert np.isfinite(np.asarray(upstream["actions"])).all()


def test_disable_restores_openpi_exactly(pi05):
    cfg, model = pi05
    obs, actions = small.observation(cfg, batch_size=1), small.actions(cfg)
    before = _outputs(cfg, model, obs, actions)
    openpi_prune.enable(method="language_only", mode="compact", capacity=32)
    pruned = model.sample_actions(jax.random.key(3), obs, num_steps=2)
    assert not np.array_equal(np.asarray(pruned), np.asarray(before["actions"])), "pruning changed nothing"
    openpi_prune.disable()
    for name, original in ORIGINALS.items():
        assert inspect.getattr_static(openpi_pi0.Pi0, name) is original, name
    assert openpi_pi0.make_attn_mask is ORIGINAL_MASK
    after = _outputs(cfg, model, obs, actions)
    for key, value in before.items():
        assert np.array_equal(np.asarray(value), np.asarray(after[key])), key
