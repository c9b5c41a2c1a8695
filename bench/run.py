"""Side-by-side benchmark: instrugo vs TRL 1.12 on the same machine, models, data and settings.

    make bench-quick            # tiny model, 1 repeat: a smoke check in a few minutes
    make bench                  # default model (SmolLM2-135M): the numbers in docs/BENCHMARKS.md
    .venv/bin/python bench/run.py --mode quick --out results.json

One invocation measures, in order: the matmul ceiling (bf16 and fp32 GFLOP/s), then PPO updates (split
into generation, scoring and training), generation against plain `model.generate`, reward-model epochs
on K-way rankings against TRL's RewardTrainer on the same rankings expanded into pairs, and SFT
throughput against SFTTrainer. Every measured job runs in its own process (bench/instrugo_jobs.py in
the project venv, bench/trl_jobs.py in bench/.venv-trl, which this script creates), so each job's peak
RSS is its own; the table shows medians over repeats (`--repeats` for PPO and generation; SFT and RM
epochs run `train_repeats` times, once in both modes, as they take minutes each) and instrugo ÷ TRL ratios.
"""

from __future__ import annotations

import argparse
import ctypes.util
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from instrugo.__main__ import tcmalloc_environment
from measure import (Row, ceiling_fraction, markdown_table, median, ppo_phase_flops, train_flops,
                     write_json_atomic)

BENCH = Path(__file__).resolve().parent
TRL_VENV = BENCH / ".venv-trl"
# torch pinned: this machine has the 2.13.0 CPU wheel on disk; an unpinned torch pulls a CUDA build.
# transformers pinned to the project's, so that both sides run the same model code (unpinned, TRL 1.12
# resolved to a newer one by 2026-12-07).
TRANSFORMERS_VERSION = importlib.metadata.version("transformers")
TRL_REQUIREMENTS = ["torch==2.13.0", "trl==1.12.*", f"transformers=={TRANSFORMERS_VERSION}"]


@dataclass
class Settings:
    """What one mode measures. Batch sizes are identical on both sides for every benchmark."""

    models: list[str]                 # models for SFT, RM and generation ('tiny' or 'default')
    ppo_models: list[str]             # PPO is measured at each of these
    repeats: int                      # PPO and generation jobs run this many times; the table shows medians
    train_repeats: int = 1            # SFT epochs (minutes each at the default model)
    rm_seeds: int = 1                 # reward-model epochs per side and lr, seeds seed, seed + 1, ...: rows show medians
    ppo_batch: int = 8                # episodes per update (one minibatch, one micro-batch)
    ppo_response_length: int = 32     # max new tokens per response
    ppo_updates: int = 3              # measured updates per run, after one warm-up update
    ppo_epochs: int = 4               # PPO epochs per update (TRL's default)
    ppo_prompts: int = 128            # PPO's prompts, and generation's: one per row of a `sample_batch`
    ppo_lora_rank: int = 8            # also measure instrugo's PPO with LoRA adapters (0 = skip)
    compile_variant: bool = True      # also measure instrugo's PPO and SFT with --compile (cold inductor cache)
    command_malloc_variant: bool = True  # also measure instrugo's PPO, RM and SFT under tcmalloc, where the system has it
    sft_examples: int = 256
    sft_batch: int = 16
    sft_micro_batch: int = 8
    sft_lr: float = 2e-5
    max_length: int = 384             # tokens of prompt + response (SFT and RM)
    rm_prompts: dict[int, int] = field(default_factory=lambda: {4: 96, 9: 32})  # per K: TRL's pairs grow as K²
    rm_sequences_per_forward: int = 16  # both sides: ~16 sequences per forward pass and per optimiser step
    rm_trl_sequences_per_forward: int | None = None  # TRL's, where it differs from instrugo's
    rm_lrs: tuple[float, ...] = (2e-5,)  # both sides train at each; several: also each side at its best
    heldout_fraction: float = 0.1
    rm_test_prompts: int = 100        # per K: further prompts whose rankings only measure accuracy, both sides
    generate_rounds: int = 3
    sample_batch: int = 128           # generation is also measured at batch 128 (the stages' decode batch from
                                      # 2026-11-25 to 2026-12-06; kept so that rows compare across runs)
    sample_response_length: int = 128
    matmul_size: int = 2048
    seed: int = 0


MODES = {
    "quick": Settings(models=["tiny"], ppo_models=["tiny"], repeats=1, ppo_response_length=16, ppo_updates=1,
                      ppo_prompts=16, sft_examples=64, sft_batch=8, sft_micro_batch=8, sft_lr=1e-3, max_length=256,
                      rm_prompts={4: 48, 9: 48}, rm_lrs=(1e-3,), heldout_fraction=0.25, rm_test_prompts=16,
                      generate_rounds=2, compile_variant=False,  # tiny layers: compiling does not pay there
                      sample_batch=16, sample_response_length=32,
                      matmul_size=1024),
    # One repeat: on 2 cores the full mode then takes about half an hour (TRL's K = 9 epoch alone ~7 min).
    # The PPO rows are already means over `ppo_updates` measured updates; pass --repeats 3 for medians.
    "full": Settings(models=["default"], ppo_models=["default", "tiny"], repeats=1, sft_examples=128,
                     rm_prompts={4: 96, 9: 24}),
}


# --------------------------------------------------------------------------------------------- processes

@dataclass
class JobResult:
    result: dict | None          # what the job returned; None when it failed
    peak_rss_mib: float          # the job process's own peak resident memory
    error: str = ""              # the end of its log when it failed


def run_job(python: Path, script: str, job: dict, workdir: Path, name: str, env: dict[str, str] | None = None) -> JobResult:
    """Run one job in a fresh process (in `env`, default this one's); peak_rss.py records that process's own
    peak RSS (VmHWM)."""
    job_file, result_file, log_file, rss_file = (workdir / f"{name}.{suffix}"
                                                 for suffix in ("job.json", "result.json", "log", "rss"))
    write_json_atomic(job_file, job)
    rss_file.unlink(missing_ok=True)
    with open(log_file, "w") as log:
        process = subprocess.Popen([str(python), str(BENCH / "peak_rss.py"), str(rss_file), str(BENCH / script),
                                    str(job_file), str(result_file)],
                                   stdout=log, stderr=subprocess.STDOUT, cwd=BENCH.parent, env=env)
        process.wait()
    peak = int(rss_file.read_text()) / 1024 if rss_file.exists() else float("nan")
    if process.returncode != 0 or not result_file.exists():
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-15:])
        return JobResult(None, peak, f"{name} exited with {process.returncode}; log {log_file}:\n{tail}")
    return JobResult(json.loads(result_file.read_text()), peak)


def ensure_trl_venv() -> tuple[Path | None, str]:
    """bench/.venv-trl with TRL 1.12 and the project's transformers (created once, brought to the project's
    transformers when that changed); returns (python, "") or (None, why not)."""
    python = TRL_VENV / "bin" / "python"
    probe = [str(python), "-c", "import trl, trl.experimental.ppo, transformers; "
             f"assert transformers.__version__ == {TRANSFORMERS_VERSION!r}, transformers.__version__"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python, ""
    steps = [[sys.executable, "-m", "venv", str(TRL_VENV)],
             [str(python), "-m", "pip", "install", "-q", *TRL_REQUIREMENTS]]
    for step in steps:
        print("bench:", " ".join(step), flush=True)
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            return None, f"`{' '.join(step)}` failed: {(done.stderr or done.stdout).strip()[-800:]}"
    done = subprocess.run(probe, capture_output=True, text=True)
    return (python, "") if done.returncode == 0 else (None, f"TRL does not import: {done.stderr.strip()[-800:]}")


class Harness:
    """Runs jobs, repeats them, and keeps every raw result for --out."""

    def __init__(self, settings: Settings, workdir: Path, trl_python: Path | None):
        self.settings, self.workdir, self.trl_python = settings, workdir, trl_python
        self.raw: dict[str, list[dict]] = {}
        self.errors: list[str] = []

    def measure(self, side: str, name: str, job: dict, repeats: int | None = None,
                env: dict[str, str] | None = None, vary_seed: bool = False) -> list[dict]:
        """Run a job `repeats` times on one side ('instrugo' or 'trl'); each run gets a fresh out dir, and with
        `vary_seed` the job's seed plus its repeat number."""
        if side == "trl" and self.trl_python is None:
            return []
        python, script = (Path(sys.executable), "instrugo_jobs.py") if side == "instrugo" else (self.trl_python, "trl_jobs.py")
        runs = []
        for repeat in range(repeats or self.settings.repeats):
            label = f"{side}-{name}-{repeat}"
            print(f"bench: {label}", flush=True)
            seed = {"seed": job["seed"] + repeat} if vary_seed else {}
            outcome = run_job(python, script, {**job, **seed, "out": str(self.workdir / label)}, self.workdir, label, env)
            if outcome.result is None:
                self.errors.append(outcome.error)
                print(outcome.error, file=sys.stderr, flush=True)
                continue
            runs.append({**outcome.result, "peak_rss_mib": outcome.peak_rss_mib})
        self.raw[f"{side}/{name}"] = runs
        return runs


def eager_if_not_compiled(runs: list[dict]) -> list[dict]:
    """A `--compile` job's runs, or none when they ran eager (torch.compile could not build kernels on this
    machine, which the job's log says): their rows then stay empty rather than labelled compiled."""
    if any(not run.get("compiled") for run in runs):
        print("bench: --compile ran eager on this machine; its rows are left empty", file=sys.stderr, flush=True)
        return []
    return runs


def med(runs: list[dict], key: str) -> float | None:
    return median([r.get(key) for r in runs])


# ------------------------------------------------------------------------------------------- benchmarks

def command_malloc_environment(settings: Settings) -> dict[str, str] | None:
    """The environment the `instrugo` command runs a stage in, tcmalloc preloaded (instrugo.__main__), for the
    rows "instrugo with tcmalloc, as the `instrugo` command runs"; None where those rows are off or the system
    has no tcmalloc. Both sides' main rows run under glibc's malloc, so that they differ in the library only."""
    if not settings.command_malloc_variant:
        return None
    return tcmalloc_environment(dict(os.environ), ctypes.util.find_library)


COMMAND_MALLOC = "instrugo with tcmalloc, as the `instrugo` command runs"


def update_and_rss_rows(bench: str, ours: list[dict], theirs: list[dict]) -> list[Row]:
    """A variant of instrugo's PPO job (another setting or malloc) against TRL's main run: update time, peak RSS."""
    return [Row(bench, "update s/update", med(ours, "update_seconds"), med(theirs, "update_seconds"), unit="s"),
            Row(bench, "peak RSS", med(ours, "peak_rss_mib"), med(theirs, "peak_rss_mib"), unit="MiB")]


def bench_ppo(h: Harness, model: str, inputs: dict, precision: str, ceiling: float) -> list[Row]:
    from instrugo.ppo import PPOConfig, reuses_sampler_logprobs

    s = h.settings
    job = {"kind": "ppo", "model": inputs["model"], "reward_model": inputs["reward_model"],
           "pad_token": inputs["pad_token"], "batch_size": s.ppo_batch, "response_length": s.ppo_response_length,
           "updates": s.ppo_updates, "ppo_epochs": s.ppo_epochs, "precision": precision, "seed": s.seed, "lr": 1e-5}
    ours = h.measure("instrugo", f"ppo-{model}", {**job, "prompts": inputs["ppo"]})
    theirs = h.measure("trl", f"ppo-{model}", {**job, "prompts": inputs["ppo_trl"]})
    n = inputs["flop_parameters"]
    tokens = inputs["ppo_prompt_tokens"] + (med(ours, "response_tokens") or 0)
    flops = ppo_phase_flops(n["policy"], n["scalar_head"], n["scalar_head"], s.ppo_batch, tokens, s.ppo_epochs,
                            recomputes_logprobs=not reuses_sampler_logprobs(PPOConfig.rollout_logprobs, precision))
    flops["update"] = sum(flops.values())
    bench = f"PPO {model} (batch {s.ppo_batch}, {s.ppo_response_length} tokens, {s.ppo_epochs} epochs)"
    rows = [Row(bench, f"{phase} s/update", med(ours, f"{phase}_seconds"), med(theirs, f"{phase}_seconds"),
                goal="≤ 0.33" if phase == "update" else "", unit="s",
                ceiling=ceiling_fraction(flops[phase], med(ours, f"{phase}_seconds"), ceiling))
            for phase in ("update", "generate", "score", "train")]
    rows.append(Row(bench, "peak RSS", med(ours, "peak_rss_mib"), med(theirs, "peak_rss_mib"), goal="≤ 0.5", unit="MiB"))
    if s.ppo_lora_rank:
        # instrugo's memory option: LoRA, the frozen models shared with the trained ones. Not the same
        # settings as the TRL column (full fine-tuning), so no goal is checked against it.
        lora = h.measure("instrugo", f"ppo-lora-{model}", {**job, "prompts": inputs["ppo"], "lora_rank": s.ppo_lora_rank})
        rows += update_and_rss_rows(f"PPO {model} as above, instrugo with LoRA r={s.ppo_lora_rank} ('TRL' column: "
                                    "TRL full)", lora, theirs)
    if command_malloc := command_malloc_environment(s):
        malloc = h.measure("instrugo", f"ppo-tcmalloc-{model}", {**job, "prompts": inputs["ppo"]}, env=command_malloc)
        rows += update_and_rss_rows(f"PPO {model} as above, {COMMAND_MALLOC}", malloc, theirs)
    if s.compile_variant:
        # The same settings with the decoder layers compiled for the training passes. The compilation falls in
        # the warm-up update, which no mean counts; its row compares that update with the uncompiled one.
        compiled = eager_if_not_compiled(h.measure("instrugo", f"ppo-compile-{model}",
                                                   {**job, "prompts": inputs["ppo"], "compile": True}))
        compiled_bench = f"PPO {model} as above, instrugo with --compile"
        rows += [Row(compiled_bench, f"{phase} s/update", med(compiled, f"{phase}_seconds"), med(theirs, f"{phase}_seconds"),
                     unit="s", ceiling=ceiling_fraction(flops[phase], med(compiled, f"{phase}_seconds"), ceiling))
                 for phase in ("update", "train")]
        rows += [Row(f"{compiled_bench}: first update, cold compile ('TRL' column: instrugo without --compile)",
                     "warm-up s", med(compiled, "warmup_seconds"), med(ours, "warmup_seconds"), unit="s"),
                 Row(compiled_bench, "peak RSS", med(compiled, "peak_rss_mib"), med(theirs, "peak_rss_mib"), unit="MiB")]
    return rows


def bench_generate(h: Harness, model: str, inputs: dict, precision: str) -> list[Row]:
    """At the PPO rollout's batch and length, and at the sampling/evaluation stages' (where responses of
    very different lengths share a batch)."""
    s = h.settings
    rows = []
    for batch, length in ((s.ppo_batch, s.ppo_response_length), (s.sample_batch, s.sample_response_length)):
        job = {"kind": "generate", "model": inputs["model"], "prompts": inputs["ppo"], "batch_size": batch,
               "response_length": length, "rounds": s.generate_rounds, "precision": precision}
        ours = h.measure("instrugo", f"generate-{model}-b{batch}", {**job, "impl": "instrugo"})
        plain = h.measure("instrugo", f"plain-generate-{model}-b{batch}", {**job, "impl": "plain"})
        # The baseline here is plain `model.generate` (what TRL's rollout calls), in the same venv.
        rows.append(Row(f"generation {model} (batch {batch}, up to {length} tokens; 'TRL' column: plain model.generate)",
                        "tokens/s", med(ours, "tokens_per_second"), med(plain, "tokens_per_second"), goal="≥ 2"))
    return rows


def bench_rm(h: Harness, model: str, inputs: dict, precision: str, ceiling: float) -> list[Row]:
    s = h.settings
    rows = []
    for k in s.rm_prompts:
        data = inputs[f"rm_k{k}"]
        # An optimiser step over ~16 sequences on both sides: TRL's 8 pairs, instrugo's 16/K prompts of K.
        prompts_per_batch = max(1, round(s.rm_sequences_per_forward / k))
        micro = max(1, s.rm_sequences_per_forward // k)
        while prompts_per_batch % micro:
            micro -= 1
        bench = f"RM {model} K={k} ({data['train_prompts']} prompts = {data['train_pairs']} pairs, 1 epoch)"
        goal = {4: "≤ 0.33", 9: "≤ 0.17"}.get(k, "")
        tried: dict[str, list[tuple[float, float, float, float]]] = {}  # side -> (held-out, test, epoch s, lr)
        for lr in s.rm_lrs:
            tag = f"-lr{lr:g}" if len(s.rm_lrs) > 1 else ""
            common = {"kind": "rm", "model": inputs["model"], "pad_token": inputs["pad_token"], "lr": lr,
                      "max_length": s.max_length, "precision": precision, "seed": s.seed}
            ours_job = {**common, "tasks": data["tasks"], "prompts_per_batch": prompts_per_batch,
                        "micro_batch_prompts": micro, "heldout_fraction": s.heldout_fraction, "split_seed": s.seed}
            ours = h.measure("instrugo", f"rm-k{k}{tag}-{model}", ours_job, s.rm_seeds, vary_seed=True)
            trl_sequences = s.rm_trl_sequences_per_forward or s.rm_sequences_per_forward
            theirs = h.measure("trl", f"rm-k{k}{tag}-{model}", {**common, "pairs": data["pairs_trl"],
                                                               "pairs_per_batch": trl_sequences // 2},
                               s.rm_seeds, vary_seed=True)
            # Both models judged by instrugo's evaluator on the same tasks: the held-out prompts of the training
            # set (~10 prompts: one standard error ~6 points) and the larger test set of unseen prompts.
            for side, runs in (("instrugo", ours), ("trl", theirs)):
                for run in runs:
                    for split in ("heldout", "test"):
                        evaluated = h.measure("instrugo", f"rm-eval-{split}-k{k}{tag}-{side}-{model}", {
                            "kind": "rm_eval", "model_dir": run["model_dir"], "heldout": data[split],
                            "precision": precision, "max_length": s.max_length}, repeats=1)
                        run[f"{split}_accuracy"] = evaluated[0]["heldout_accuracy"] if evaluated else None
                if s.rm_seeds > 1:
                    print(f"bench: {side} RM K={k} lr {lr:g}, test accuracy per seed: "
                          + ", ".join(f"{run['test_accuracy']:.1%}" if run.get("test_accuracy") is not None else "-"
                                      for run in runs), flush=True)
                # Each side's learning rate is chosen on its held-out prompts; the test set only reports.
                chosen_by, accuracy, seconds = (med(runs, key) for key in ("heldout_accuracy", "test_accuracy",
                                                                           "train_seconds"))
                if None not in (chosen_by, accuracy, seconds):
                    tried.setdefault(side, []).append((chosen_by, accuracy, seconds, lr))
            at = f"{bench[:-1]}, lr {lr:g})" if tag else bench
            flops = train_flops(inputs["flop_parameters"]["scalar_head"], med(ours, "tokens") or 0)
            rows += [Row(at, "epoch s", med(ours, "train_seconds"), med(theirs, "train_seconds"), goal=goal, unit="s",
                         ceiling=ceiling_fraction(flops, med(ours, "train_seconds"), ceiling)),
                     Row(at, f"held-out accuracy ({data['heldout_pairs']} pairs)", med(ours, "heldout_accuracy"),
                         med(theirs, "heldout_accuracy"), unit="%"),
                     Row(at, f"test accuracy ({data['test_prompts']} unseen prompts = {data['test_pairs']} pairs)",
                         med(ours, "test_accuracy"), med(theirs, "test_accuracy"), goal="≥ 1", unit="%"),
                     Row(at, "peak RSS", med(ours, "peak_rss_mib"), med(theirs, "peak_rss_mib"), unit="MiB")]
            # At the first learning rate only: the allocator changes time and memory, not the model.
            if lr == s.rm_lrs[0] and (command_malloc := command_malloc_environment(s)):
                malloc = h.measure("instrugo", f"rm-k{k}-tcmalloc-{model}", ours_job, 1, env=command_malloc)
                rows += [Row(f"{at}, {COMMAND_MALLOC}", "epoch s", med(malloc, "train_seconds"),
                             med(theirs, "train_seconds"), unit="s"),
                         Row(f"{at}, {COMMAND_MALLOC}", "peak RSS", med(malloc, "peak_rss_mib"),
                             med(theirs, "peak_rss_mib"), unit="MiB")]
        if len(s.rm_lrs) > 1 and len(tried) < 2:
            print(f"bench: RM K={k}: no best-learning-rate rows (a side has no complete run)", file=sys.stderr)
        elif len(s.rm_lrs) > 1:
            # The goal's "equal or better accuracy" asked of each side at its own best learning rate (the
            # first of equal held-out accuracies).
            (_, ours_test, ours_s, ours_lr), (_, trl_test, trl_s, trl_lr) = (
                max(tried[side], key=lambda run: run[0]) for side in ("instrugo", "trl"))
            at = (f"{bench[:-1]}, each side at the lr of {', '.join(f'{lr:g}' for lr in s.rm_lrs)} best on its "
                  f"held-out prompts: instrugo {ours_lr:g}, TRL {trl_lr:g})")
            rows += [Row(at, "epoch s", ours_s, trl_s, goal=goal, unit="s"),
                     Row(at, "test accuracy", ours_test, trl_test, goal="≥ 1", unit="%")]
    return rows


def bench_sft(h: Harness, model: str, inputs: dict, precision: str, ceiling: float) -> list[Row]:
    s = h.settings
    job = {"kind": "sft", "model": inputs["model"], "pad_token": inputs["pad_token"], "batch_size": s.sft_batch,
           "micro_batch_size": s.sft_micro_batch, "max_length": s.max_length, "lr": s.sft_lr,
           "precision": precision, "seed": s.seed}
    ours = h.measure("instrugo", f"sft-{model}", {**job, "data": inputs["sft"]}, s.train_repeats)
    theirs = h.measure("trl", f"sft-{model}", {**job, "data": inputs["sft_trl"]}, s.train_repeats)
    flops = train_flops(inputs["flop_parameters"]["policy"], med(ours, "tokens") or 0)

    def rate_and_rss(bench: str, runs: list[dict], goal: str = "") -> list[Row]:
        return [Row(bench, "tokens/s", med(runs, "tokens_per_second"), med(theirs, "tokens_per_second"), goal=goal,
                    ceiling=ceiling_fraction(flops, med(runs, "train_seconds"), ceiling)),
                Row(bench, "peak RSS", med(runs, "peak_rss_mib"), med(theirs, "peak_rss_mib"), unit="MiB")]

    rows = rate_and_rss(f"SFT {model} ({s.sft_examples} examples, batch {s.sft_batch})", ours, goal="≥ 1")
    if command_malloc := command_malloc_environment(s):
        malloc = h.measure("instrugo", f"sft-tcmalloc-{model}", {**job, "data": inputs["sft"]}, s.train_repeats,
                           env=command_malloc)
        rows += rate_and_rss(f"SFT {model} as above, {COMMAND_MALLOC}", malloc)
    if s.compile_variant:  # tokens/s over the whole epoch, its cold compilation included
        compiled = eager_if_not_compiled(h.measure("instrugo", f"sft-compile-{model}",
                                                   {**job, "data": inputs["sft"], "compile": True}, s.train_repeats))
        rows += rate_and_rss(f"SFT {model} as above, instrugo with --compile (cold compile included)", compiled)
    return rows


# ------------------------------------------------------------------------------------------------- main

BENCHMARKS = ("ppo", "generation", "rm", "sft")


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}, "
            f"torch {importlib.metadata.version('torch')}, transformers {TRANSFORMERS_VERSION}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=sorted(MODES), default="quick")
    parser.add_argument("--repeats", type=int, help="override the mode's number of repeats")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="both sides use this; auto = bf16 where the measured bf16 matmul is ≥1.3x fp32")
    parser.add_argument("--no-trl", action="store_true", help="measure instrugo only")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS),
                        help="run only these benchmarks (the matmul ceiling is always measured)")
    parser.add_argument("--rm-k", type=int, nargs="+", help="reward-model benchmark only at these K (of the mode's)")
    parser.add_argument("--rm-lrs", type=float, nargs="+",
                        help="train both reward models at each learning rate and compare each side at its best")
    parser.add_argument("--rm-sequences", type=int, nargs="+", metavar="N",
                        help="sequences per reward-model step (instrugo: N / K prompts; TRL: N / 2 pairs); a second "
                             "value sets TRL's apart, e.g. '4 8' for each side's best at K = 4")
    parser.add_argument("--rm-seeds", type=int, help="reward-model runs per side and lr, each with its own seed (medians)")
    parser.add_argument("--out", help="write every raw result and the table to this JSON file")
    parser.add_argument("--keep", help="keep run directories and job logs here instead of a temp dir")
    args = parser.parse_args(argv)
    settings = MODES[args.mode]
    if args.repeats:
        settings = dataclasses.replace(settings, repeats=args.repeats)
    if args.rm_k:
        unknown = set(args.rm_k) - set(settings.rm_prompts)
        if unknown:
            parser.error(f"--rm-k: mode {args.mode} measures K in {sorted(settings.rm_prompts)}, not {sorted(unknown)}")
        settings = dataclasses.replace(settings, rm_prompts={k: settings.rm_prompts[k] for k in args.rm_k})
    if args.rm_lrs:
        settings = dataclasses.replace(settings, rm_lrs=tuple(args.rm_lrs))
    if args.rm_sequences:
        if len(args.rm_sequences) > 2:
            parser.error("--rm-sequences: one value for both sides, or instrugo's and TRL's")
        instrugo_sequences, *trl_sequences = args.rm_sequences
        settings = dataclasses.replace(settings, rm_sequences_per_forward=instrugo_sequences,
                                       rm_trl_sequences_per_forward=trl_sequences[0] if trl_sequences else None)
    if args.rm_seeds:
        settings = dataclasses.replace(settings, rm_seeds=args.rm_seeds)

    trl_python, trl_missing = (None, "--no-trl given") if args.no_trl else ensure_trl_venv()
    if trl_python is None:
        print(f"bench: TRL unavailable, measuring instrugo only ({trl_missing})", file=sys.stderr)

    workdir = Path(args.keep or tempfile.mkdtemp(prefix="instrugo-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    harness = Harness(settings, workdir, trl_python)
    started = datetime.datetime.now(datetime.timezone.utc)

    hardware = harness.measure("instrugo", "matmul", {"kind": "matmul", "size": settings.matmul_size, "seconds": 3.0},
                               repeats=1)
    if not hardware:
        print("\n\n".join(harness.errors), file=sys.stderr)
        return 1
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if hardware[0]["bf16_gflops"] >= 1.3 * hardware[0]["fp32_gflops"] else "fp32"
    # The ceiling is the matmul rate of the precision both sides run in: on a CPU without bf16 units, bf16
    # is emulated (~1 GFLOP/s on an AVX2-only EPYC) and fp32 is what the hardware allows.
    ceiling = hardware[0][f"{precision}_gflops"]

    rows: list[Row] = []
    for model in dict.fromkeys(settings.ppo_models + settings.models):
        prepared = harness.measure("instrugo", f"prepare-{model}", {
            "kind": "prepare", "model": model, "dir": str(workdir / f"inputs-{model}"), "seed": settings.seed,
            "sft_examples": settings.sft_examples, "ppo_prompts": settings.ppo_prompts, "rm_prompts": settings.rm_prompts, "heldout_fraction": settings.heldout_fraction,
            "rm_test_prompts": settings.rm_test_prompts}, repeats=1)
        if not prepared:
            continue
        inputs = prepared[0]
        if model in settings.ppo_models and "ppo" in args.only:
            rows += bench_ppo(harness, model, inputs, precision, ceiling)
        if model in settings.models:
            rows += bench_generate(harness, model, inputs, precision) if "generation" in args.only else []
            rows += bench_rm(harness, model, inputs, precision, ceiling) if "rm" in args.only else []
            rows += bench_sft(harness, model, inputs, precision, ceiling) if "sft" in args.only else []

    subset = "" if args.only == list(BENCHMARKS) else f" ({', '.join(args.only)} only)"
    bf16_ceiling = (f"{hardware[0]['bf16_gflops']:.0f}" if hardware[0]["bf16_size"] == settings.matmul_size else
                    f"{hardware[0]['bf16_gflops']:.2g} (emulated: measured at {hardware[0]['bf16_size']}²)")
    trl_sequences = ("" if settings.rm_trl_sequences_per_forward is None
                     else f", TRL {settings.rm_trl_sequences_per_forward}")
    header = (f"mode {args.mode}{subset}, {settings.repeats} repeat(s) of PPO and generation, {settings.train_repeats} of "
              f"SFT epochs, {settings.rm_seeds} seed(s) of RM epochs ({settings.rm_sequences_per_forward} sequences "
              f"per step{trl_sequences}), precision {precision} on both sides; "
              f"matmul ceiling bf16 {bf16_ceiling} GFLOP/s, fp32 {hardware[0]['fp32_gflops']:.0f} "
              f"GFLOP/s ({hardware[0]['threads']} threads; the FLOP/s column divides by {precision}'s); "
              f"{machine_description()}; {started:%Y-%m-%d %H:%M} UTC"
              + ("" if trl_python else f"; TRL unavailable: {trl_missing}"))
    table = markdown_table(rows)
    print(f"\n{header}\n\n{table}")
    if harness.errors:
        print(f"\n{len(harness.errors)} job(s) failed; the table shows — for them:", file=sys.stderr)
        print("\n\n".join(harness.errors), file=sys.stderr)
    if args.out:
        write_json_atomic(args.out, {"header": header, "settings": dataclasses.asdict(settings), "precision": precision,
                                     "hardware": hardware[0], "trl_unavailable": trl_missing or None,
                                     "rows": [{**dataclasses.asdict(r), "ratio": r.ratio} for r in rows],
                                     "table": table, "raw": harness.raw, "errors": harness.errors})
    return 1 if harness.errors else 0


if __name__ == "__main__":
    sys.exit(main())
