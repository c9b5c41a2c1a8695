"""Multi-process launches on CPU (torchrun): two processes that share each step's examples must train what
one process trains, and checkpoints must hold every process's state."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from instrugo import runio, training
from instrugo.cli import main
from instrugo.runio import InputError
from test_reward import synthetic_rankings
from test_sft import write_demonstrations


def launch(args, cwd, processes=2, module=True, timeout=300):
    """Run `instrugo ARGS` (or, without `module`, the Python script ARGS) in `processes` processes under
    torchrun; return the launch's output."""
    target = ["-m", "instrugo.cli", *args] if module else args
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *target]
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def assert_same_weights(a, b, atol):
    first, second = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=atol, msg=name)


def test_two_processes_train_sft_as_one(tmp_path):
    """Steps of 4, 4 and 1 examples split over two processes (2 + 2, and 1 + none: the empty process runs a
    zero-weighted pass so the gradient all-reduce lines up) give the loss and gradient of one process holding
    the whole step: same logged losses, same weights after 9 steps (fp32; only the sums' order differs)."""
    data = write_demonstrations(tmp_path / "demos.jsonl", n=9)
    args = ["sft", "--model", "tiny", "--data", str(data), "--epochs", "3", "--lr", "1e-2", "--batch-size", "4",
            "--micro-batch-size", "2", "--max-length", "96", "--precision", "fp32"]
    launch(args + ["--out", str(tmp_path / "two")], tmp_path)
    launch(args + ["--out", str(tmp_path / "one")], tmp_path, processes=1)
    assert runio.read_json(tmp_path / "two" / "complete.json")["processes"] == 2
    assert runio.read_json(tmp_path / "one" / "complete.json")["processes"] == 1
    two, one = (runio.read_metrics(tmp_path / name / "metrics.jsonl") for name in ("two", "one"))
    assert [r["step"] for r in two] == list(range(1, 10))  # logged once, by the main process
    for a, b in zip(two, one):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
    assert_same_weights(tmp_path / "two", tmp_path / "one", atol=1e-4)


def test_two_processes_train_the_reward_model_as_one(tmp_path):
    """16 training prompts in steps of 5, 5, 5 and 1: split 3 + 2 (each prompt still weighs 1/5 of its step)
    and 1 + none."""
    data = synthetic_rankings(tmp_path / "ranked.jsonl", n_prompts=21, k=4)
    args = ["rm", "--model", "tiny", "--comparisons", str(data), "--epochs", "1", "--lr", "2e-3",
            "--prompts-per-batch", "5", "--micro-batch-prompts", "1", "--max-length", "64",
            "--heldout-fraction", "0.25", "--normalize-data", "", "--precision", "fp32"]
    launch(args + ["--out", str(tmp_path / "two" / "rm")], tmp_path)
    launch(args + ["--out", str(tmp_path / "one" / "rm")], tmp_path, processes=1)
    two, one = (runio.read_metrics(tmp_path / name / "rm" / "metrics.jsonl") for name in ("two", "one"))
    assert len(two) == len(one) == 4 + 1  # the steps, then the final summary
    assert [r["prompts"] for r in two[:-1]] == [r["prompts"] for r in one[:-1]] and sorted(
        r["prompts"] for r in one[:-1]) == [1, 5, 5, 5]
    for a, b in zip(two[:-1], one[:-1]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["train_accuracy"] == pytest.approx(b["train_accuracy"], abs=1e-6)
    assert two[-1]["processes"] == 2 and one[-1]["processes"] == 1
    assert_same_weights(tmp_path / "two" / "rm", tmp_path / "one" / "rm", atol=1e-4)


CHECKPOINT_SCRIPT = """
import sys, torch
from pathlib import Path
from instrugo import training

out = Path(sys.argv[1])
accelerator = training.make_accelerator("fp32")
training.seed_everything(0, accelerator.process_index)
model = torch.nn.Linear(4, 2)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
model, optimizer = accelerator.prepare(model, optimizer)
training.save_checkpoint(accelerator, out, {"step": 1})
expected = torch.rand(3)
torch.manual_seed(12345)  # as if this process had restarted
assert training.load_checkpoint(accelerator, out) == {"step": 1}
resumed = torch.rand(3)
(out / f"draws_{accelerator.process_index}.json").write_text(
    __import__("json").dumps({"expected": expected.tolist(), "resumed": resumed.tolist(),
                              "processes": accelerator.num_processes}))
"""


def test_a_checkpoint_restores_every_processs_random_state(tmp_path):
    """PPO's rollouts draw from each process's own generator, so a resumed run continues every process's
    stream where it stopped, not only the main process's."""
    script = tmp_path / "checkpoint_script.py"
    script.write_text(textwrap.dedent(CHECKPOINT_SCRIPT))
    launch([str(script), str(tmp_path)], tmp_path, module=False)
    draws = [json.loads((tmp_path / f"draws_{rank}.json").read_text()) for rank in range(2)]
    assert all(d["processes"] == 2 for d in draws)
    assert draws[0]["expected"] != draws[1]["expected"]  # per-process seeds
    for d in draws:
        assert d["resumed"] == d["expected"]
    assert sorted(p.name for p in (tmp_path / "checkpoint").glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]
    # One process cannot continue it: the second process's share and random stream would be lost.
    with pytest.raises(InputError, match="field 'processes': saved by 2 process"):
        training.load_checkpoint(training.make_accelerator("fp32"), tmp_path)


UNEQUAL_FORWARDS_SCRIPT = """
import torch
from instrugo import models, training

accelerator = training.make_accelerator("fp32")
model = accelerator.prepare(models.load_causal_lm("tiny"))  # its rotary frequencies are a buffer
ids = torch.randint(100, 1000, (2, 6))
# Process 0 makes two forward calls before its backward pass, process 1 one: as the reward model's response
# passes, split by length, do. A collective inside forward (DDP's buffer broadcast) would wait forever.
calls = 2 if accelerator.process_index == 0 else 1
accelerator.backward(sum(model(input_ids=ids).logits.float().mean() for _ in range(calls)))
print(f"process {accelerator.process_index}: backward done")
"""


def test_processes_may_make_different_numbers_of_forward_calls_per_backward(tmp_path):
    script = tmp_path / "unequal_forwards.py"
    script.write_text(UNEQUAL_FORWARDS_SCRIPT)
    log = launch([str(script)], tmp_path, module=False, timeout=120)
    assert "process 0: backward done" in log and "process 1: backward done" in log


def test_run_trains_on_every_process_and_evaluates_once(tmp_path):
    out = tmp_path / "run"
    log = launch(["run", "--preset", "tiny", "--variants", "ppo", "--best-of", "0", "--out", str(out)], tmp_path)
    for stage in ("sft", "round1/rm", "round1/ppo"):
        assert runio.read_json(out / stage / "complete.json")["processes"] == 2, stage
    assert log.count("run: done.") == 1 and log.count("eval: wrote") == 1
    evaluation = runio.read_json(out / "eval.json")
    assert {"base", "sft", "ppo"} <= set(evaluation["policies"])
    assert (out / "report.html").exists() and (out / "round1" / "labeled.jsonl").exists()


def test_single_process_commands_refuse_a_multi_process_launch(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(sys, "argv", ["instrugo", "eval", "--policies", "sft=tiny", "--out", str(tmp_path / "e")])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    assert "eval: runs in one process, not under a launch of 2 (WORLD_SIZE)" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
