"""Checkpoints made without Scheme B load with it on, the way OpenPI's serving and training load them."""

import jax
import numpy as np
import pytest
from flax import nnx
from openpi.shared import array_typing as at
from openpi.training import weight_loaders

import openpi_prune
from openpi_prune.errors import UntrainedParametersWarning
from openpi_prune.pruner import methods
from openpi_prune.tools import small


def test_serving_loads_a_plain_checkpoint_with_a_fresh_projector(plain_checkpoint):
    cfg, params, _ = plain_checkpoint
    assert methods.PROJECTOR not in params
    with openpi_prune.enabled(method="scheme_b"):
        with small.siglip_variant("mu/14"), pytest.warns(UntrainedParametersWarning, match="no prune_action_proj"):
            model = cfg.load(params)  # what openpi's create_trained_policy does
        actions = model.sample_actions(jax.random.key(0), small.observation(cfg), num_steps=1)
    assert np.isfinite(np.asarray(actions)).all()
    kernel = getattr(model, methods.PROJECTOR).kernel.value
    assert kernel.shape == (cfg.action_dim + 1, 64) and float(abs(kernel).sum()) > 0


def test_training_weight_loader_keeps_the_new_projector(plain_checkpoint):
    cfg, _, folder = plain_checkpoint
    with openpi_prune.enabled(method="scheme_b"):
        # What openpi's train script does: the model's shapes, the checkpoint, then a strict check.
        with small.siglip_variant("mu/14"):
            params_shape = nnx.state(nnx.eval_shape(cfg.create, jax.random.key(0)), nnx.Param).to_pure_dict()
        loaded = weight_loaders.CheckpointWeightLoader(str(folder / "params")).load(params_shape)
    at.check_pytree_equality(expected=params_shape, got=loaded, check_shapes=True, check_dtypes=True)
    assert isinstance(loaded[methods.PROJECTOR]["kernel"], jax.ShapeDtypeStruct)  # left to the model's init
    assert not isinstance(loaded["PaliGemma"]["img"]["head"]["kernel"], jax.ShapeDtypeStruct)
