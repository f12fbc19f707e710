"""Pruned twins of OpenPI's configs: in its registry after installation, and `with_pruning`."""

import dataclasses

import jax
import numpy as np
import pytest
from conftest import run_child, small_train_config
from openpi.models import pi0_config
from openpi.shared import normalize
from openpi.training import config as _config

import openpi_prune
from openpi_prune import configs
from openpi_prune.pruner import methods
from openpi_prune.tools import small

REGISTRY = r"""
import json, sys
import openpi.training.config as c
from openpi.models import pi0_config

twin = c.get_config("pi05_libero_prune")
plain = c.get_config("pi05_libero")
bases = [n for n, v in c._CONFIGS_DICT.items() if isinstance(v.model, pi0_config.Pi0Config) and not n.endswith("_prune")]
sys.argv = ["train", "pi05_libero_prune", "--exp-name", "x", "--model.prune.keep-fraction", "0.3"]
from_cli = c.cli()
import openpi_prune

print(json.dumps({
    "twins": sorted(n for n in c._CONFIGS_DICT if n.endswith("_prune")),
    "bases": sorted(bases),
    "twin_model": type(twin.model).__name__,
    "twin_method": twin.model.prune.method,
    "plain_model": type(plain.model).__name__,
    "same_weights": twin.weight_loader == plain.weight_loader,
    "twin_assets": twin.data.assets.assets_dir,
    "cli_keep_fraction": from_cli.model.prune.keep_fraction,
    "enabled": openpi_prune.is_enabled(),
}))
"""


def test_every_pi0_config_has_a_twin_in_openpi_s_registry_with_no_variable_set():
    result = run_child(REGISTRY)
    assert result["twins"] == sorted(f"{name}_prune" for name in result["bases"])
    assert len(result["twins"]) >= 10  # OpenPI 0.2.2 has 18
    assert result["twin_model"] == "PrunedPi0Config" and result["twin_method"] == "relevance"
    assert result["plain_model"] == "Pi0Config"
    assert result["same_weights"] and result["twin_assets"] == "assets/pi05_libero"
    assert result["cli_keep_fraction"] == 0.3
    assert result["enabled"] is False  # choosing a config prunes only once it makes a model


def _train_config(tmp_path):
    return small_train_config("mine", "robot", tmp_path)


def test_with_pruning_turns_pruning_on_when_the_twin_makes_its_model(tmp_path):
    plain = _train_config(tmp_path)
    twin = configs.with_pruning(plain, keep_fraction=0.1, mode="masked")
    assert twin.name == "mine_prune" and isinstance(twin.model, configs.PrunedPi0Config)
    # Everything OpenPI's config holds stays the same, the pruning settings come on top.
    base_fields = {f.name: getattr(plain.model, f.name) for f in dataclasses.fields(plain.model)}
    assert {k: getattr(twin.model, k) for k in base_fields} == base_fields

    with small.siglip_variant("mu/14"):
        model = plain.model.create(jax.random.key(0))
        assert not openpi_prune.is_enabled() and not hasattr(model, methods.RELEVANCE_QUERY)
        model = twin.model.create(jax.random.key(0))
    assert openpi_prune.current_settings() == twin.model.prune
    assert hasattr(model, methods.RELEVANCE_QUERY)
    again = configs.with_pruning(twin, keep_fraction=0.3)
    assert again.name == "mine_prune" and again.model.prune.keep_fraction == 0.3
    assert again.model.prune.mode == "masked"


def test_a_twin_reads_its_base_config_s_norm_stats(tmp_path):
    plain = _train_config(tmp_path)
    dim = plain.model.action_dim
    stats = normalize.NormStats(mean=np.full(dim, 3.0), std=np.ones(dim), q01=-np.ones(dim), q99=np.ones(dim))
    normalize.save(tmp_path / "mine" / "robot", {"state": stats, "actions": stats})
    twin = configs.with_pruning(plain)
    assert twin.assets_dirs != plain.assets_dirs  # OpenPI would look under the twin's own name
    data = twin.data.create(twin.assets_dirs, twin.model)
    np.testing.assert_array_equal(data.norm_stats["actions"].mean, stats.mean)


def test_a_libero_twin_drops_the_camera_libero_always_masks():
    from openpi.training import config as openpi_config

    assert openpi_config.get_config("pi05_libero_prune").model.prune.drop_cameras == ("right_wrist_0_rgb",)
    assert openpi_config.get_config("pi0_libero_prune").model.prune.drop_cameras == ("right_wrist_0_rgb",)
    assert openpi_config.get_config("pi05_droid_prune").model.prune.drop_cameras == ()


def test_only_pi0_models_can_be_pruned():
    fast = next(c for c in _config._CONFIGS if not isinstance(c.model, pi0_config.Pi0Config))
    with pytest.raises(openpi_prune.PruneInputError, match="pi0 / pi0.5"):
        configs.with_pruning(fast)


def test_train_only_pruner_freezes_everything_else(tmp_path):
    from flax import nnx

    twin = configs.with_pruning(_train_config(tmp_path), train_only_pruner=True)
    with small.siglip_variant("mu/14"):
        model = twin.model.create(jax.random.key(0))
    trainable = nnx.state(model, twin.trainable_filter).to_pure_dict()
    assert sorted(trainable) == sorted(
        [methods.RELEVANCE_HIDDEN_BIAS, methods.RELEVANCE_HIDDEN_KERNEL, methods.RELEVANCE_KEY, methods.RELEVANCE_QUERY]
    )
    plain = configs.with_pruning(_train_config(tmp_path))
    assert len(nnx.state(model, plain.trainable_filter).to_pure_dict()) > len(trainable)
