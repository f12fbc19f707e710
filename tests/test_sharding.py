"""Pruning under OpenPI's FSDP sharding, on 8 emulated CPU devices (a fresh interpreter: the device
count is fixed when JAX starts)."""

import pytest
from conftest import run_child

pytestmark = pytest.mark.slow  # a fresh interpreter compiling for 8 devices: about two minutes

CHILD = r"""
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import json
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
import openpi_prune
from openpi.training import sharding
from openpi_prune.tools import small
from openpi_prune import telemetry

openpi_prune.enable(warn_below=0, telemetry=False)  # the default method
cfg = small.config(pi05=True)
model = small.create(cfg)
obs = small.observation(cfg, batch_size=8, prompt_tokens=[12, 7, 20, 3, 9, 16, 5, 11])
actions = small.actions(cfg, batch_size=8)
noise = jax.random.normal(jax.random.key(3), actions.shape)
graphdef, state = nnx.split(model)


def step(state, obs, actions):
    # The parameters only, as OpenPI's train step differentiates (the model's step is an integer).
    params, rest = state.split(nnx.Param, ...)

    def loss(params):
        m = nnx.merge(graphdef, params, rest)
        with telemetry.collect() as reports:
            value = jnp.mean(m.compute_loss(jax.random.key(0), obs, actions, train=True))
        return value, reports[0]["kept_mask"]

    (value, kept), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return value, kept, optax_norm(grads)


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def sample(state, obs):
    m = nnx.merge(graphdef, state)
    with telemetry.collect() as reports:
        out = m.sample_actions(jax.random.key(0), obs, num_steps=2, noise=noise)
    return out, reports[0]["kept_mask"]


single = jax.device_get((jax.jit(step)(state, obs, actions), jax.jit(sample)(state, obs)))

mesh = sharding.make_mesh(num_fsdp_devices=4)  # 2 x 4: batch and FSDP, as OpenPI's train.py builds it
data = NamedSharding(mesh, PartitionSpec(sharding.DATA_AXIS))
state_sharding = sharding.fsdp_sharding(state, mesh, min_size_mbytes=0)  # shard even this small model
sharded_params = sum(
    any(axis is not None for axis in s.spec) for s in jax.tree.leaves(state_sharding, is_leaf=lambda x: isinstance(x, NamedSharding))
)
state_s = jax.device_put(state, state_sharding)
obs_s, actions_s = jax.device_put(obs, data), jax.device_put(actions, data)
with sharding.set_mesh(mesh):
    sharded = jax.device_get((jax.jit(step)(state_s, obs_s, actions_s), jax.jit(sample)(state_s, obs_s)))

(loss1, kept1, norm1), (act1, ikept1) = single
(loss8, kept8, norm8), (act8, ikept8) = sharded
print(json.dumps({
    "devices": jax.device_count(),
    "sharded_params": int(sharded_params),
    "loss": [float(loss1), float(loss8)],
    "grad_norm": [float(norm1), float(norm8)],
    "train_kept_equal": bool(np.array_equal(kept1, kept8)),
    "kept_equal": bool(np.array_equal(ikept1, ikept8)),
    "kept": int(np.asarray(ikept1).sum()),
    "actions_max_diff": float(np.abs(np.asarray(act1) - np.asarray(act8)).max()),
}))
"""


def test_pruned_train_step_and_inference_agree_on_8_devices_with_openpi_s_fsdp():
    result = run_child(CHILD, timeout=900, drop=("XLA_FLAGS",))
    assert result["devices"] == 8 and result["sharded_params"] > 10
    assert result["train_kept_equal"] and result["kept_equal"] and result["kept"] > 0
    single, sharded = result["loss"]
    assert abs(single - sharded) <= 1e-5 * abs(single), result["loss"]
    single, sharded = result["grad_norm"]
    assert abs(single - sharded) <= 1e-4 * abs(single), result["grad_norm"]
    assert result["actions_max_diff"] < 1e-4, result
