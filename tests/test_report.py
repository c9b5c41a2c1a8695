"""The run report: a synthetic run directory in, one self-contained, escaped report.html out."""

import json
import re

import pytest

from instrugo.report import read_ppo_curves, write_report, main
from instrugo.runio import InputError

KINDS = ("lowercase", "postscript", "title")
INJECTED = "<script>alert('x')</script>"


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def summary(pass_rate, gold, win=None, kl=None, rm=None):
    row = {"n": 8, "constraint_pass_rate": pass_rate, "gold_score": gold, "mean_length_tokens": 41.5,
           "no_eos_rate": 0.125, "pass_rate_by_kind": {k: pass_rate for k in KINDS}}
    row.update({k: v for k, v in (("win_rate_vs_sft", win), ("kl_to_sft", kl), ("rm_score", rm)) if v is not None})
    return row


def generations(run, policy, text):
    rows = [{"id": f"eval-{i:06d}", "prompt": f"Prompt number {i} <b>bold</b>", "response": f"{text} {i}",
             "n_tokens": 5, "constraints": [{"kind": "title", "args": {}}], "constraint_results": [i % 2 == 0],
             "all_passed": i % 2 == 0, "gold_score": 0.5} for i in range(8)]
    write_jsonl(run / "generations" / "eval" / f"{policy}.jsonl", rows)


def ppo_rows(n, kl_start):
    return [{"step": s, "episodes": 8 * s, "rm_score": 0.1 * s, "gold_score": 0.2 + 0.01 * s, "kl": kl_start + s,
             "sqrt_kl": (kl_start + s) ** 0.5, "kl_coef": 0.02, "entropy": 3.0} for s in range(1, n + 1)]


@pytest.fixture
def full_run(tmp_path):
    run = tmp_path / "demo"
    policies = ("base", "sft", "ppo", "ppo_ptx", "bon_4")
    splits = {split: {"base": summary(0.125, 0.111, win=0.25),
                      "sft": summary(0.25, 0.222, rm=-0.05),
                      "ppo": summary(0.5, 0.612, win=0.75, kl=3.21, rm=0.4)
                      | {"constraint_fraction": 0.8125, "topicality": 0.6875, "quality": 0.9375},
                      "ppo_ptx": summary(0.375, 0.444, win=0.625, kl=1.5, rm=0.3),
                      "bon_4": summary(0.375, 0.4, win=0.5625, kl=0.636, rm=0.35)} for split in ("eval", "eval_unseen")}
    (run).mkdir()
    (run / "eval.json").write_text(json.dumps({
        "splits": splits, "policies": {p: {"path": f"runs/demo/{p}"} for p in policies},
        "pretrain_loss": {"base": 3.9876, "sft": 4.1234, "ppo": 4.5678, "ppo_ptx": 4.2},
        "reward_model": {"heldout_accuracy_vs_labels": 0.66, "heldout_accuracy_vs_gold": 0.71, "n_comparisons": 480,
                         "path": "runs/demo/round2/rm"},
        "labelers": {"round1": {"gold_agreement": 0.65, "inter_annotator_agreement": 0.61}},
        "seconds": {"sft": 83.0, "round1/rm": 12.5, "eval": 140.0}}))
    for number in (1, 2):
        for variant in ("ppo", "ppo_ptx"):
            write_jsonl(run / f"round{number}" / variant / "metrics.jsonl", ppo_rows(3, kl_start=3 * (number - 1)))
        write_jsonl(run / f"round{number}" / "rm" / "metrics.jsonl", [
            {"step": 1, "loss": 0.69, "train_accuracy": 0.5}, {"step": 2, "loss": 0.6, "train_accuracy": 0.6},
            {"step": 2, "final": True, "heldout_accuracy_vs_labels": 0.6 + number / 100,
             "heldout_accuracy_vs_gold": 0.7, "n_comparisons": 240 * number}])
    write_jsonl(run / "sft" / "metrics.jsonl", [{"step": s, "loss": 3.0 - 0.1 * s, "lr": 1e-4} for s in range(1, 6)])
    for policy in ("base", "sft", "ppo_ptx"):
        generations(run, policy, f"answer of {policy}")
    generations(run, "ppo", INJECTED)
    return run


def test_full_report_has_every_section_number_and_plot(full_run):
    path = write_report(full_run)
    assert path == full_run / "report.html" and path.exists()
    page = path.read_text()
    for anchor in ("headline", "ppo", "overoptimisation", "win-rates", "constraints", "samples", "training"):
        assert f'<section id="{anchor}">' in page
    assert 'class="missing"' not in page  # everything was present
    for policy in ("base", "sft", "ppo_ptx", "bon_4"):
        assert f"{policy}</td>" in page
    # Headline numbers, formatted: gold 0.612 and its terms 0.812 / 0.688 / 0.938, win 75.0%, KL 3.21,
    # RM +0.400, pretrain loss 4.568, no-EOS 12%.
    for number in ("0.612", "0.812", "0.688", "0.938", "75.0%", "3.21", "+0.400", "4.568", "12%", "56.2%"):
        assert number in page
    # RM accuracy per round from the metrics' final lines; labeler agreement from eval.json; timings with a total.
    assert "61.0%" in page and "62.0%" in page and "65.0%" in page and "480" in page
    assert "1m 23s" in page and "3m 56s" in page
    # PPO curves, overoptimisation, win rates, pass rate by kind, SFT/RM losses.
    assert page.count("data:image/png;base64,") == 5
    # Six prompts by default, each with the four sample policies side by side.
    assert page.count('class="sample"') == 6 and "Prompt number 5" in page and "Prompt number 6" not in page


def test_model_text_is_escaped_and_nothing_is_external(full_run):
    page = write_report(full_run).read_text()
    assert "<script" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; 0" in page
    assert "<b>bold</b>" not in page and "&lt;b&gt;bold&lt;/b&gt;" in page
    links = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page)
    assert links and all(link.startswith(("data:image/png;base64,", "#")) for link in links)
    assert not re.search(r"(?:src|href)\s*=\s*[\"']?\s*(?:https?:)?//", page)
    assert "<link" not in page and "@import" not in page


def test_rounds_are_concatenated_by_cumulative_episodes(full_run):
    curves = read_ppo_curves(full_run)
    assert set(curves) == {"ppo", "ppo_ptx"}
    assert [r["total_episodes"] for r in curves["ppo"]] == [8, 16, 24, 32, 40, 48]
    assert [r["round"] for r in curves["ppo"]] == [1, 1, 1, 2, 2, 2]


def test_run_with_only_sft_and_base_reports_what_exists(tmp_path):
    run = tmp_path / "early"
    run.mkdir()
    (run / "eval.json").write_text(json.dumps({
        "splits": {"eval": {"sft": summary(0.25, 0.222), "base": summary(0.125, 0.111, win=0.375)}},
        "policies": {"sft": {"path": "runs/early/sft"}, "base": {"path": "default"}}, "pretrain_loss": {}}))
    generations(run, "sft", "only sft")
    page = write_report(run).read_text()
    assert "0.222" in page and "37.5%" in page and "only sft 0" in page
    assert "No PPO metrics" in page and "No reward model yet." in page and "No SFT or RM metrics." in page
    assert "Needs PPO metrics" in page and "No stage timings recorded." in page
    assert page.count("data:image/png;base64,") == 2  # win rates and pass rate by kind
    assert "ppo_ptx</td>" not in page and "<b>ppo</b>" not in page


def test_nan_rates_show_as_dashes(tmp_path):
    run = tmp_path / "nan"
    run.mkdir()
    (run / "eval.json").write_text('{"splits": {"eval": {"ppo": {"n": 0, "win_rate_vs_sft": NaN}}}}')
    page = write_report(run).read_text()
    assert "ppo</td><td>0</td><td>–</td>" in page


def test_malformed_inputs_name_file_line_and_field(tmp_path):
    run = tmp_path / "bad"
    run.mkdir()
    (run / "eval.json").write_text(json.dumps({"splits": {"eval": {"sft": {"gold_score": "high"}}}}))
    with pytest.raises(InputError) as error:
        write_report(run)
    assert error.value.field == "splits.eval.sft.gold_score" and error.value.path.endswith("eval.json")

    (run / "eval.json").write_text("{}")
    write_jsonl(run / "round1" / "ppo" / "metrics.jsonl", [{"step": 1, "episodes": 8}, {"step": 2, "kl": "big"}])
    with pytest.raises(InputError) as error:
        write_report(run)
    assert error.value.line == 2 and error.value.field in ("episodes", "kl")

    with pytest.raises(InputError, match="nothing to report"):
        write_report(tmp_path / "bad" / "round1")
    with pytest.raises(InputError, match="not found"):
        write_report(tmp_path / "absent")


def test_module_entry_point(full_run, capsys):
    assert main([str(full_run)]) == 0
    assert "report.html" in capsys.readouterr().out
    assert main([str(full_run / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
