"""`openpi-prune bench` runs every variant on one model and reports what each one ran."""

import pytest

import openpi_prune
from openpi_prune.tools import flops
from openpi_prune.tools.bench import at_size, small_model

pytestmark = pytest.mark.slow  # compiles sample_actions for each variant: about two minutes


def test_bench_rows_describe_the_prefix_each_variant_runs():
    rows = {
        r.name: r
        for r in small_model.run(
            siglip="mu/14", paligemma="dummy", batch_size=1, num_steps=2, repeats=1, capacities=[96]
        )
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
    rows = small_model.serving_times(siglip="mu/14", paligemma="dummy", num_steps=1, repeats=2)
    assert [name for name, _, _ in rows] == [name for name, _ in small_model.SERVING_VARIANTS]
    figures = {name: f for name, _, f in rows}
    # Upstream and telemetry off send none; on, the response says what this call kept (20 % of 768).
    assert figures["upstream OpenPI"] is None and figures["relevance, telemetry off"] is None
    on = figures["relevance, telemetry on (default)"]
    assert (on["method"], on["kept"], on["live_image_tokens"]) == ("relevance", 154, 768)


def test_training_steps_are_timed_in_cycles_that_carry_the_model_s_step():
    cheaper = dict(small_model.TRAIN_VARIANTS)[small_model.DEFAULT]
    variants = (small_model.TRAIN_VARIANTS[0], ("cheaper", cheaper))
    rows = small_model.train_step_times(siglip="mu/14", paligemma="dummy", batch_size=2, repeats=4, variants=variants)
    assert [name for name, _ in rows] == ["upstream OpenPI", "cheaper"]
    assert all(ms > 0 for _, ms in rows)


def test_at_size_rows_compact_the_masked_camera_and_the_prompt_padding(tmp_path):
    rows = at_size.run_at_size(
        paligemma="dummy",
        action_expert="dummy",
        siglip="mu/14",
        dtype="bfloat16",
        batch_sizes=[2],
        num_steps=2,
        repeats=1,
        prompt_tokens=24,
        siglip_layers=(1, 0),
    )
    by_name = {r.name: r for r in rows}
    assert list(by_name) == [name for name, _ in at_size.size_variants((1, 0))]
    upstream = by_name["upstream OpenPI"]
    assert (upstream.prefix, upstream.live) == (3 * 256 + 200, 2 * 256 + 24)
    default = by_name["relevance (defaults)"]
    # 20 % of the 768 slots of three cameras, then the prompt cut to its 32-token bucket.
    assert (default.prefix, default.kept) == (154 + 32, 103)
    dropped = by_name["relevance, LIBERO's unused camera dropped, telemetry off"]
    assert (dropped.prefix, dropped.kept) == (103 + 32, 103)
    assert dropped.flops.siglip == pytest.approx(upstream.flops.siglip * 2 / 3)
    assert dropped.flops.prefix_llm < 0.2 * upstream.flops.prefix_llm
    # Inside SigLIP (mu/14 has one layer): each live camera keeps its own 52 of 256.
    inside = by_name["same, pruned inside SigLIP after layer 1"]
    assert (inside.prefix, inside.kept) == (2 * 52 + 32, 104)
    # batch 2, two cameras each
    assert inside.flops.siglip == pytest.approx(2 * flops.siglip("mu/14", images=2, out_width=64, layer=1, kept=52))
    # Before its first layer: SigLIP's one block runs on the kept patches alone.
    before = by_name["same, pruned before SigLIP"]
    assert (before.prefix, before.kept) == (2 * 52 + 32, 104)
    assert before.flops.siglip == pytest.approx(2 * flops.siglip("mu/14", images=2, out_width=64, layer=0, kept=52))
    assert before.flops.siglip < 0.51 * inside.flops.siglip  # its block now over 52 patches, not 256
    assert all(r.min_ms > 0 and r.median_ms >= r.min_ms for r in rows)
    assert all(0 < r.pruner_ms < r.prefix_ms for r in rows if r.name != "upstream OpenPI")
    assert upstream.prefix_ms > 0 and upstream.pruner_ms is None  # the floor is named for every row
    at_size.show_at_size(rows, "title", str(tmp_path))
    table = (tmp_path / "bench.md").read_text().splitlines()
    assert table[0] == "title" and len(table) == 2 + 2 + len(rows)
    assert "| 2 | upstream OpenPI | 968 (536) | 512 |" in table[4]
    assert "ms after the prefix pass (floor)" in table[2]


def test_options_of_the_other_bench_are_refused_not_ignored():
    from openpi_prune.tools import cli

    with pytest.raises(SystemExit, match="--serving times the small model only: add --small"):
        cli.main(["bench", "--serving"])
    with pytest.raises(SystemExit, match="--out applies to the full-size bench only"):
        cli.main(["bench", "--small", "--out", "somewhere"])


def test_the_training_row_marked_default_trains_as_the_defaults_do():
    marked = [settings for name, settings in small_model.TRAIN_VARIANTS if name.endswith("(default)")]
    assert len(marked) == 1
    shipped = openpi_prune.PruneSettings(method="relevance")
    assert (marked[0]["saliency_every"], marked[0]["compact_training"]) == (
        shipped.saliency_every,
        shipped.compact_training,
    )
    # --train-short keeps what a whole fine-tune's average needs, beside upstream and the earlier rule.
    assert [name for name, _ in small_model.TRAIN_SHORT] == [
        "upstream OpenPI",
        "relevance, saliency every step, full length",
        "relevance, compact after the ramp, saliency every 4th step (default)",
        "  the same, during the ramp (full length)",
    ]
