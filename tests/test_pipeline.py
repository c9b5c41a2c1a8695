"""`instrugo run --preset tiny --rounds 2` end to end through the CLI: every stage, eval.json, report.html.
Each stage runs in its own process (the default), so these tests also cover that path."""

import contextlib
import json
import os
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from instrugo import pipeline, runio
from instrugo.cli import app
from instrugo.runio import InputError


def test_tiny_run_two_rounds_produces_eval_and_report(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "--preset", "tiny", "--rounds", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)

    for stage in ("sft", "round1/rm", "round1/ppo", "round1/ppo_ptx", "round2/rm", "round2/ppo", "round2/ppo_ptx"):
        assert runio.is_complete(out / stage), stage
    # Round 2 samples from the newest policy and its reward model trains on all comparisons so far.
    round2_tasks = runio.read_json(out / "round2" / "rm" / "rm_config.json")["comparisons"]
    assert [p.split("/")[-2] for p in round2_tasks] == ["round1", "round2"]
    assert {json.loads(line)["policy"] for line in (out / "round2" / "tasks.jsonl").read_text().splitlines()} == {
        str(out / "round1" / "ppo_ptx")}

    report = runio.read_json(out / "eval.json")
    for split in ("eval", "eval_unseen"):
        by_policy = report["splits"][split]
        assert set(by_policy) == {"base", "sft", "ppo", "ppo_ptx", "bon_4"}
        for name, summary in by_policy.items():
            assert 0.0 <= summary["constraint_pass_rate"] <= 1.0 and summary["n"] == 12
            assert ("win_rate_vs_sft" in summary) == (name != "sft")
            assert ("kl_to_sft" in summary) == (name not in ("sft", "base"))
        assert abs(by_policy["bon_4"]["kl_to_sft"] - (1.3862943611198906 - 0.75)) < 1e-9
    assert set(report["pretrain_loss"]) == {"base", "sft", "ppo", "ppo_ptx"}
    assert report["reward_model"]["n_comparisons"] > 0
    assert {"sft", "eval", "round1/rm", "round2/ppo_ptx"} <= set(report["seconds"])
    assert (out / "report.html").stat().st_size > 10_000
    # Every stage ran in its own process, whose own peak memory is recorded: a process that loaded torch and a
    # model holds more than 0.2 GiB; the labels' process (no torch) much less.
    peaks = report["peak_rss_gib"]
    assert set(peaks) == set(report["seconds"])
    assert all(peaks[stage] > 0.2 for stage in peaks if not stage.endswith("/label")), peaks
    assert all(0.005 < gib < 16 for gib in peaks.values()) and peaks["round1/label"] < 0.2, peaks
    assert "peak RSS" in (out / "report.html").read_text()
    # The run decided bf16 or fp32 once; no stage probed again on its own.
    decided = {runio.read_json(out / stage / f"{stage.rsplit('/', 1)[-1].replace('_ptx', '')}_config.json")["precision"]
               for stage in ("sft", "round1/rm", "round1/ppo", "round2/ppo_ptx")}
    assert len(decided) == 1 and decided <= {"bf16", "fp32"}, decided

    # Re-running the same command finds every stage complete and only re-evaluates (from cached generations).
    again = CliRunner().invoke(app, ["run", "--preset", "tiny", "--rounds", "2", "--out", str(out)])
    assert again.exit_code == 0
    assert "sft already complete" in again.output and "round2/ppo_ptx already complete" in again.output


def test_an_input_error_in_a_stage_process_reaches_the_command_intact(tmp_path):
    # The SFT stage's process finds no model at that path; the error crosses back to `instrugo run` with its
    # parts (the CLI prints it as one line) and the stage is not marked complete.
    missing = tmp_path / "no-model-here"
    result = CliRunner().invoke(app, ["run", "--preset", "tiny", "--model", str(missing), "--out", str(tmp_path / "run")])
    assert isinstance(result.exception, InputError), repr(result.exception)
    assert result.exception.path == str(missing) and "not a model" in str(result.exception)
    assert "in the process of stage sft" in result.exception.__notes__[0]  # raised there, its traceback kept
    assert not runio.is_complete(tmp_path / "run" / "sft")


def test_a_stage_process_that_dies_ends_the_run_with_one_line():
    with pytest.raises(SystemExit, match=r"stage round1/rm ended abruptly \(exit code 9"):
        pipeline.in_fresh_process("round1/rm", os._exit, 9)


class TwoPartError(Exception):
    def __init__(self, what: str, where: str):
        super().__init__(f"{what} at {where}")


def raise_two_part_error():
    raise TwoPartError("bad", "here")


def test_an_exception_pickle_cannot_rebuild_arrives_as_a_named_error():
    with pytest.raises(RuntimeError, match="TwoPartError: bad at here") as error:
        pipeline.in_fresh_process("eval", raise_two_part_error)
    assert "raise TwoPartError" in error.value.__notes__[0]


def test_a_stage_process_ends_when_the_run_is_killed(tmp_path):
    # A killed `instrugo run` must not leave its stage running on, writing into the run directory. The
    # stage here is a shell (os.system) that records its parent, the stage's process, then sleeps.
    pid_file = tmp_path / "stage.pid"
    code = ("import os; from instrugo import pipeline; "
            f"pipeline.in_fresh_process('sft', os.system, 'echo $PPID $$ > {pid_file}; exec sleep 60')")
    run = subprocess.Popen([sys.executable, "-c", code])
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text().strip()) and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        pids = [int(pid) for pid in pid_file.read_text().split()]
        run.kill()
        run.wait()

        def alive(pid: int) -> bool:
            try:
                return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
            except FileNotFoundError:
                return False
        deadline = time.monotonic() + 20
        while alive(pids[0]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(pids[0])
    finally:
        run.kill()
        for pid in pids:  # the stage process (when the test fails) and its shell
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
