"""The stock SigLIP So400m/14 that OpenPI hard-codes (about 400M parameters), once."""

import jax
import numpy as np
import pytest
from conftest import last_report

import openpi_prune
from openpi_prune.tools import small


@pytest.mark.slow
def test_so400m_pi05_prunes_and_keep_all_matches_openpi():
    cfg = small.config(pi05=True)
    with openpi_prune.enabled(method="scheme_b"):
        model = small.create(cfg, siglip=None)
    assert model.PaliGemma.img.module.width == 1152  # So400m, not the small variant
    obs = small.observation(cfg, batch_size=1)
    with openpi_prune.disabled():
        upstream = model.sample_actions(jax.random.key(0), obs, num_steps=1)
    with openpi_prune.enabled(method="keep_all", mode="masked"):
        same = model.sample_actions(jax.random.key(0), obs, num_steps=1)
    assert np.array_equal(np.asarray(upstream), np.asarray(same))
    with openpi_prune.enabled(method="scheme_b", mode="compact"):
        pruned = model.sample_actions(jax.random.key(0), obs, num_steps=1)
        report = last_report()
    assert np.isfinite(np.asarray(pruned)).all()
    assert report.capacity == 192 and 0 < report.kept[0] <= 192
