"""The benchmark harness's pure parts: medians, ratios and goals, model FLOP counting, the table, and
per-job peak RSS from a real child process."""

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import measure  # noqa: E402
from measure import (Row, best_seconds, ceiling_fraction, flop_parameters, format_number,  # noqa: E402
                     markdown_table, median, ppo_phase_flops, ratio, train_flops)


def test_best_seconds_warms_up_once_then_keeps_the_fastest_call(monkeypatch):
    clock = iter([0.0, 3.0, 10.0, 11.0, 20.0, 22.0])  # three timed calls: 3 s, 1 s, 2 s
    monkeypatch.setattr(measure.time, "perf_counter", lambda: next(clock))
    calls = []
    assert best_seconds(lambda: calls.append(1), 3) == 1.0
    assert len(calls) == 4


def test_median_skips_failed_repeats_and_ratio_needs_both_sides():
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, None, 2.0]) == 3.0
    assert median([None, None]) is None
    assert ratio(2.0, 8.0) == 0.25
    assert ratio(None, 8.0) is None and ratio(2.0, None) is None and ratio(2.0, 0.0) is None


def test_goals_are_bounds_on_instrugo_over_trl():
    assert Row("ppo", "update s", 3.0, 10.0, goal="≤ 0.33").meets_goal() is True
    assert Row("ppo", "update s", 4.0, 10.0, goal="≤ 0.33").meets_goal() is False
    assert Row("gen", "tokens/s", 300.0, 100.0, goal="≥ 2").meets_goal() is True
    assert Row("gen", "tokens/s", 150.0, 100.0, goal="≥ 2").meets_goal() is False
    assert Row("ppo", "update s", 3.0, None, goal="≤ 0.33").meets_goal() is None  # TRL missing: no verdict
    assert Row("sft", "peak RSS", 3.0, 4.0).meets_goal() is None


def test_flop_parameters_drop_the_embedding_lookup_but_count_the_lm_head():
    vocab, d = 1000, 64
    embedding = vocab * d
    blocks = 50_000
    # Tied embedding: the head's weights are the embedding's, yet its matmul still costs vocab·d per token.
    assert flop_parameters(embedding + blocks, embedding, vocab * d) == blocks + vocab * d
    # A reward/value model's scalar head adds no vocab-sized matmul.
    assert flop_parameters(embedding + blocks, embedding, 0) == blocks
    assert train_flops(10, 7) == 3 * 2 * 10 * 7


def test_ppo_phase_flops_count_each_model_pass():
    flops = ppo_phase_flops(n_policy=100, n_value=40, n_reward=40, episodes=8, tokens_per_episode=50, ppo_epochs=4,
                            recomputes_logprobs=True)
    tokens = 8 * 50
    assert flops["generate"] == 2 * 100 * tokens
    assert flops["score"] == 2 * (100 + 100 + 40 + 40) * tokens  # policy, reference, value, reward
    assert flops["train"] == 4 * 6 * (100 + 40) * tokens
    reused = ppo_phase_flops(n_policy=100, n_value=40, n_reward=40, episodes=8, tokens_per_episode=50, ppo_epochs=4,
                             recomputes_logprobs=False)
    assert reused["score"] == 2 * (100 + 40 + 40) * tokens  # the sampler's log-probs: no policy pass


def test_ceiling_fraction():
    assert ceiling_fraction(500e9, 1.0, 1000.0) == pytest.approx(0.5)
    assert ceiling_fraction(500e9, 2.0, 1000.0) == pytest.approx(0.25)
    assert ceiling_fraction(None, 1.0, 1000.0) is None
    assert ceiling_fraction(1e9, 0.0, 1000.0) is None


def test_format_number():
    assert format_number(None) == "—"
    assert format_number(0.1234) == "0.123"
    assert format_number(12.345, "s") == "12.3 s"
    assert format_number(2.0, "s") == "2.00 s"
    assert format_number(1234.4, "MiB") == "1,234 MiB"
    assert format_number(0.6789, "%") == "67.9%"


def test_markdown_table_has_a_line_per_row_with_ratio_and_verdict():
    rows = [Row("PPO tiny", "update s/update", 2.0, 8.0, goal="≤ 0.33", unit="s", ceiling=0.125),
            Row("SFT tiny", "tokens/s", 500.0, None, goal="≥ 1")]
    lines = markdown_table(rows).splitlines()
    assert len(lines) == 2 + len(rows)
    assert lines[0].startswith("| benchmark | metric | instrugo | TRL 1.12 | instrugo ÷ TRL |")
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells == ["PPO tiny", "update s/update", "2.00 s", "8.00 s", "0.250", "≤ 0.33", "yes", "12.5%"]
    cells = [c.strip() for c in lines[3].strip("|").split("|")]
    assert cells[3] == "—" and cells[4] == "—" and cells[6] == ""


def test_run_job_reports_the_childs_own_peak_rss_and_failures(tmp_path):
    from run import run_job

    script = BENCH / "_probe_job.py"
    script.write_text("import json, sys\n"
                      "job = json.load(open(sys.argv[1]))\n"
                      "block = bytearray(job['mib'] * 2**20)\n"   # touch the memory so it is resident
                      "if job.get('fail'): raise SystemExit('boom')\n"
                      "json.dump({'ok': len(block)}, open(sys.argv[2], 'w'))\n")
    try:
        small = run_job(Path(sys.executable), script.name, {"mib": 1}, tmp_path, "small")
        big = run_job(Path(sys.executable), script.name, {"mib": 200}, tmp_path, "big")
        failed = run_job(Path(sys.executable), script.name, {"mib": 1, "fail": True}, tmp_path, "failed")
    finally:
        script.unlink()
    assert small.result == {"ok": 2**20} and big.result == {"ok": 200 * 2**20}
    assert big.peak_rss_mib - small.peak_rss_mib > 150  # per child, not the maximum over all children
    assert failed.result is None and "boom" in failed.error and "exited with 1" in failed.error


@pytest.mark.parametrize("has_bf16_kernels", [True, False])
def test_matmul_ceiling_reads_emulated_bf16_at_a_small_size(monkeypatch, has_bf16_kernels):
    """Without oneDNN bf16 kernels a bf16 product at full size takes minutes: its rate is read at 256."""
    import torch

    import instrugo_jobs

    measured = []
    monkeypatch.setattr(instrugo_jobs.models, "onednn_has_bf16", lambda: has_bf16_kernels)
    monkeypatch.setattr(instrugo_jobs, "matmul_gflops",
                        lambda dtype, size, seconds: measured.append((dtype, size)) or float(size))
    result = instrugo_jobs.job_matmul({"size": 2048, "seconds": 1.0})
    bf16_size = 2048 if has_bf16_kernels else 256
    assert measured == [(torch.bfloat16, bf16_size), (torch.float32, 2048)]
    assert result["bf16_size"] == bf16_size and result["bf16_gflops"] == bf16_size and result["fp32_gflops"] == 2048
