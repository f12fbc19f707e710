"""The analytic FLOP counts agree with the parameters they multiply: a weight matrix costs 2 FLOPs
per parameter per token, and the rest (attention scores) is counted apart."""

import jax
import numpy as np
import pytest
from flax import nnx, traverse_util
from openpi.models import gemma, pi0_config

import openpi_prune
from openpi_prune.tools import flops


@pytest.fixture(scope="module")
def full_size_parameters():
    """Parameter counts of OpenPI's pi05_libero model by part, from its shapes alone."""
    config = pi0_config.Pi0Config(pi05=True, action_horizon=10, discrete_state_input=False)
    with openpi_prune.disabled():
        abstract = nnx.eval_shape(config.create, jax.random.key(0))
    flat = traverse_util.flatten_dict(nnx.state(abstract, nnx.Param).to_pure_dict())
    counts = {"llm_layers": 0, "expert_layers": 0, "siglip": 0}
    for path, leaf in flat.items():
        size = int(np.prod(leaf.shape))
        if path[:3] == ("PaliGemma", "llm", "layers") and len(leaf.shape) >= 3 and "Dense_0" not in path:
            # Weight matrices, stacked over layers (pi0.5's adaptive norms are counted apart).
            expert = any(str(part).endswith("_1") for part in path)
            counts["expert_layers" if expert else "llm_layers"] += size
        elif path[:2] == ("PaliGemma", "img") and len(leaf.shape) >= 2:
            counts["siglip"] += size
    return config, counts


def test_a_gemma_layer_costs_two_flops_per_weight_per_token(full_size_parameters):
    config, counts = full_size_parameters
    for variant, weights in (("gemma_2b", counts["llm_layers"]), ("gemma_300m", counts["expert_layers"])):
        per_token = flops.gemma_layers(gemma.get_config(variant), tokens=1, keys=0)
        assert per_token == pytest.approx(2 * weights, rel=1e-3), variant


def test_siglip_without_attention_scores_costs_two_flops_per_weight_per_patch(full_size_parameters):
    _, counts = full_size_parameters
    tokens, width, depth = 256, 1152, 27
    scores = depth * 4 * tokens * tokens * width
    # The position embedding is added, not multiplied.
    weights = counts["siglip"] - tokens * width
    assert flops.siglip("So400m/14", images=1, out_width=2048) - scores == pytest.approx(2 * tokens * weights, rel=1e-3)


def test_the_full_pi05_prefix_dominates_and_shrinks_with_it(full_size_parameters):
    config, _ = full_size_parameters
    upstream = flops.sample_actions(config, batch=1, cameras=3, prefix=968, num_steps=10)
    pruned = flops.sample_actions(config, batch=1, cameras=2, prefix=135, num_steps=10)
    assert upstream.prefix_llm > 0.8 * upstream.total
    assert pruned.total < 0.3 * upstream.total
    assert flops.sample_actions(config, batch=8, cameras=3, prefix=968, num_steps=10).total == pytest.approx(
        8 * upstream.total
    )


def test_pruned_inside_siglip_the_later_layers_count_only_the_kept_tokens():
    full = flops.siglip("So400m/14", images=1, out_width=2048)
    head = 256 * 2 * 1152 * 2048  # run twice: on the early tokens, and on the late ones
    assert flops.siglip("So400m/14", images=1, out_width=2048, layer=27, kept=52) == pytest.approx(full + head)
    assert flops.siglip("So400m/14", images=1, out_width=2048, layer=9, kept=256) == pytest.approx(full + head)
    early = flops.siglip("So400m/14", images=1, out_width=2048, layer=9, kept=52)
    assert 9 / 27 * full < early < (9 / 27 + 18 / 27 * 52 / 256) * full + 2 * head
