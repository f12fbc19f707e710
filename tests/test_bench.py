"""`openpi-prune bench` runs every variant on one model and reports what each one ran."""

import pytest

from openpi_prune import bench

pytestmark = pytest.mark.slow  # compiles sample_actions for each variant: about two minutes


def test_bench_rows_describe_the_prefix_each_variant_runs():
    rows = {
        r.name: r
        for r in bench.run(siglip="mu/14", paligemma="dummy", batch_size=1, num_steps=2, repeats=1, capacities=[96])
    }
    upstream = rows["upstream OpenPI"]
    assert upstream.prefix == 768 + 48 and upstream.kept == 768
    default = rows["relevance compact (default)"]
    assert default.prefix == 154 + 48 and default.kept == 154  # 20 % of 768 live tokens, every slot used
    assert rows["relevance compact, telemetry off"].prefix == default.prefix
    assert rows["relevance masked"].prefix == upstream.prefix and rows["relevance masked"].kept == 154
    assert rows["scheme_b compact 96"].prefix == 96 + 48
    assert default.flops < 0.6 * upstream.flops  # XLA's count, a scanned layer once: a lower bound on the saving
    assert all(r.latency_ms > 0 for r in rows.values())


def test_serving_times_openpi_s_policy_with_telemetry_off_and_on():
    times = dict(bench.serving_times(siglip="mu/14", paligemma="dummy", num_steps=1, repeats=2))
    assert list(times) == [name for name, _ in bench.SERVING_VARIANTS]
    assert all(ms > 0 for ms in times.values())
