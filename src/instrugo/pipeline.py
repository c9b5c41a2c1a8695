"""`instrugo run`: the whole InstructGPT loop in one command, resumable.

    SFT → [sample K responses from the newest policy → label → reward model on all comparisons so far
           → PPO (and PPO-ptx) from the newest policy] × rounds → evaluate → report

Stages talk only through files in the run directory, so this module is nothing but their sequence: a
stage whose output is complete is skipped, a killed stage resumes from its checkpoint.

    runs/demo/sft/                  the SFT policy            (stage: sft)
    runs/demo/round1/tasks.jsonl    K responses per prompt    (stage: sample)
    runs/demo/round1/labeled.jsonl  rankings                  (stage: label, simulated or human)
    runs/demo/round1/rm/            the reward model          (stage: rm, on rounds 1..r)
    runs/demo/round1/ppo_ptx/       the policies              (stage: ppo, one per variant)
    runs/demo/eval.json, report.html

A YAML file given with `--config` may set this command's flags at the top level and any stage's settings
under `sft:`, `sample:`, `label:`, `rm:`, `ppo:` and `eval:`.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import pickle
import resource
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from instrugo.config import from_dict, option, require
from instrugo.runio import InputError, is_complete, update_json

STAGE_SECTIONS = ("sft", "sample", "label", "rm", "ppo", "eval")
VARIANTS = ("ppo", "ppo_ptx")
WAITING_FOR_LABELS = 3  # exit status of a run that stopped to wait for human labels


@dataclass
class RunConfig:
    """The whole loop. Stage settings come from the preset's sections, then the YAML file's sections."""

    out: str = option("runs/demo", "Run directory.")
    model: str = option("default", "Starting model ('default', 'tiny', a .gguf file or a HF directory).")
    rounds: int = option(1, "Rounds of sample → label → RM → PPO in all; round 1 samples from SFT, each "
                            "later round from the newest policy.")
    labels: str = option("simulated", "Who ranks the samples: 'simulated' (the labeler pool) or 'human' (the app).")
    k: int = option(9, "Responses ranked per prompt (2..9; InstructGPT: 4..9).")
    prompts_per_round: int = option(86, "Prompts sampled for labeling in each round.")
    variants: list[str] = option(["ppo_ptx", "ppo"], "PPO variants to train: ppo_ptx, ppo (the first is the one "
                                                     "later rounds sample from and continue).")
    best_of: int = option(16, "Best-of-n baseline in the final evaluation (0 = skip).")
    eval_prompts: int = option(100, "Prompts per evaluation split (0 = all).")
    seed: int = option(0, "Seed for every stage.")
    stage_processes: bool = option(True, "Run each stage in a fresh process (single-process runs; under a "
                                         "multi-process launch the launched processes run the stages).")

    presets: ClassVar[dict[str, dict]] = {
        "tiny": dict(model="tiny", k=4, prompts_per_round=24, best_of=4, eval_prompts=12),
    }

    def validate(self) -> None:
        require(self.rounds >= 1, "rounds", "must be at least 1")
        require(self.labels in ("simulated", "human"), "labels", "must be 'simulated' or 'human'")
        require(bool(self.variants) and set(self.variants) <= set(VARIANTS), "variants", f"choose from {', '.join(VARIANTS)}")
        require(2 <= self.k <= 9, "k", "must be 2..9")


# Stage sizes of the main job (`make demo`), chosen for 2 CPU cores: one SFT epoch over the 2,000
# demonstrations, 86 prompts x K=9 ranked per round, 320 PPO episodes per variant (the first 64 train only the
# value network), 100 eval prompts per split. K=9 on 86 prompts samples as many responses as K=4 on 192 and
# gives ~3,060 comparisons instead of ~1,140: on a disjoint test set its RM agreed with the gold judge on 60.0%
# of pairs against 54.4% and 58.6% for two K=4 draws (docs/EXPERIMENTS.md, "At equal sampling cost").
# Deviations from InstructGPT's values (REFERENCE.md), because a 135M model gets minutes, not days: SFT lr 5e-5
# for 1 epoch (paper: 16 epochs); RM lr 5e-5 in batches of 4 prompts, 19 steps at K=9 (paper: 9e-6, 64 prompts, far
# more steps; at 16 prompts and 3e-5 the RM took 11 steps and stayed at chance); PPO lr 2e-5 for 32 optimiser
# steps (paper swept 2.55e-6..2.55e-5, and plain PPO diverged above 8.05e-6 at 1.3B over 256k episodes);
# 1 pretraining sequence per episode for PPO-ptx (paper: 8), which halves the ptx cost. SFT and PPO compile their
# decoder layers (`--compile`): ~35 s on a cold cache, then training passes 1.2-1.4x as fast
# (docs/BENCHMARKS.md); where torch.compile cannot build kernels they run eager.
STAGE_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "default": {
        "sft": dict(epochs=1.0, lr=5e-5, batch_size=16, micro_batch_size=8, max_length=320, compile=True),
        "sample": dict(max_new_tokens=128, temperature=1.0),
        "rm": dict(lr=5e-5, prompts_per_batch=4, micro_batch_prompts=2, max_length=320, heldout_fraction=0.15,
                   normalize_examples=128),
        "ppo": dict(total_episodes=320, episodes_per_batch=32, minibatches=4, micro_batch_size=8,
                    max_new_tokens=96, lr=2e-5, value_lr=3e-5, warmup_iterations=2, value_warmup_iterations=2,
                    ptx_ratio=1.0, compile=True),
        "eval": dict(max_new_tokens=192, pretrain_examples=200),
    },
    "tiny": {
        "sft": dict(epochs=1.0, max_examples=32, lr=1e-3, batch_size=8, micro_batch_size=8, max_length=192),
        "sample": dict(max_new_tokens=24),
        "rm": dict(lr=1e-3, prompts_per_batch=8, micro_batch_prompts=4, max_length=192, normalize_examples=8),
        "ppo": dict(total_episodes=16, episodes_per_batch=8, minibatches=1, micro_batch_size=8, max_new_tokens=16,
                    lr=1e-4, value_lr=1e-4, warmup_iterations=0, value_warmup_iterations=0, ptx_ratio=0.5,
                    ptx_max_length=48, save_every=1),
        "eval": dict(max_new_tokens=24, pretrain_examples=8, batch_size=16),
    },
}


def stage_config(cls: type, preset: dict, overrides: dict, fixed: dict, source: str, precision: str = "auto"):
    """A stage's config: its preset, then the YAML section, then what the pipeline must decide; a stage left
    at precision 'auto' gets the run's `precision`."""
    values = {**preset, **overrides, **fixed}
    if values.get("precision", "auto") == "auto" and "precision" in {f.name for f in dataclasses.fields(cls)}:
        values["precision"] = precision
    return from_dict(cls, values, source=source)


def run_pipeline(config: RunConfig, preset: str = "default", sections: dict[str, dict] | None = None,
                 source: str = "config") -> Path:
    """Run (or resume) the loop in `config.out`; returns the run directory.

    Under a multi-process launch (`torchrun --nproc_per_node N`) every process trains (SFT, RM, PPO), and
    the main process alone samples, labels, evaluates and writes the report while the others wait. Called
    from a script of your own, call it under `if __name__ == "__main__":`: the stages' processes are spawned,
    and spawning imports the main module again."""
    from instrugo import evaluate, labelers, ppo, reward, sample, sft, training

    sections = sections or {}
    unknown = set(sections) - set(STAGE_SECTIONS)
    if unknown:
        raise InputError(source, f"unknown section (known: {', '.join(STAGE_SECTIONS)})", field=sorted(unknown)[0])
    presets = STAGE_PRESETS[preset]
    run_dir = Path(config.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    processes = training.process_state()
    main = processes.is_main_process
    fresh_processes = config.stage_processes and processes.num_processes == 1
    # One bf16-or-fp32 decision for the whole run: in their own processes the stages would each time the probe
    # again, and on a CPU near its threshold they could disagree.
    precision = training.agreed_precision("auto")

    def timed(name: str, stage_dir: Path | None, fn, *args, every_process: bool = False):
        """Run a stage (on every process when it trains, else on the main one) and record its seconds."""
        if stage_dir is not None and is_complete(stage_dir):
            if main:
                print(f"run: {name} already complete ({stage_dir})")
            return stage_dir
        if main:
            print(f"run: {name}")
        started = time.perf_counter()
        result, peak_gib = None, None
        if fresh_processes:
            result, peak_gib = in_fresh_process(name, fn, *args)
        elif every_process or main:
            result = fn(*args)
        processes.wait_for_everyone()
        if main:
            update_json(run_dir / "eval.json", {"seconds": {name: round(time.perf_counter() - started, 1)}}
                        | ({"peak_rss_gib": {name: round(peak_gib, 2)}} if peak_gib is not None else {}))
        return result

    def make(name: str, cls: type, **fixed):
        return stage_config(cls, presets.get(name, {}), sections.get(name, {}), fixed, f"{source} [{name}]", precision)

    sft_dir = run_dir / "sft"
    timed("sft", sft_dir, sft.run_sft, make("sft", sft.SFTConfig, model=config.model, out=str(sft_dir), seed=config.seed),
          every_process=True)

    labeled_files: list[str] = []
    newest = {variant: str(sft_dir) for variant in config.variants}
    main_variant = config.variants[0]
    for round_number in range(1, config.rounds + 1):
        round_dir = run_dir / f"round{round_number}"
        tasks = round_dir / "tasks.jsonl"
        labeled = round_dir / "labeled.jsonl"
        if not labeled.exists() and not tasks.exists():
            timed(f"round{round_number}/sample", None, sample.run_sample, make(
                "sample", sample.SampleConfig, policy=newest[main_variant], prompts="instrugo:rm", out=str(tasks),
                k=config.k, n_prompts=config.prompts_per_round, offset=(round_number - 1) * config.prompts_per_round,
                seed=config.seed + round_number, id_prefix=f"r{round_number}"))
        if not labeled.exists():
            if config.labels == "human":
                wait_for_human_labels(tasks, labeled, main)
            label_config = make("label", labelers.LabelerConfig, seed=config.seed + round_number)
            report = timed(f"round{round_number}/label", None, labelers.simulate_command, str(tasks), str(labeled),
                           label_config)
            if main:
                update_json(run_dir / "eval.json", {"labelers": {f"round{round_number}": report}})
        labeled_files.append(str(labeled))

        rm_dir = round_dir / "rm"
        timed(f"round{round_number}/rm", rm_dir, reward.run_reward, make(
            "rm", reward.RewardConfig, model=str(sft_dir), comparisons=list(labeled_files), out=str(rm_dir),
            eval_json=str(run_dir / "eval.json"), seed=config.seed), every_process=True)
        for variant in config.variants:
            ppo_dir = round_dir / variant
            ptx = {} if variant == "ppo_ptx" else {"ptx_coef": 0.0}
            ppo_preset = {**presets.get("ppo", {}), **({"ptx_coef": 27.8} if variant == "ppo_ptx" else {})}
            ppo_config = stage_config(ppo.PPOConfig, ppo_preset, sections.get("ppo", {}),
                                      dict(policy=newest[variant], reference=str(sft_dir), reward_model=str(rm_dir),
                                           out=str(ppo_dir), seed=config.seed + round_number, **ptx),
                                      f"{source} [ppo]", precision)
            timed(f"round{round_number}/{variant}", ppo_dir, ppo.run_ppo, ppo_config, every_process=True)
            newest[variant] = str(ppo_dir)

    policies = [f"base={config.model}", f"sft={sft_dir}"] + [f"{v}={newest[v]}" for v in config.variants]
    eval_config = make("eval", evaluate.EvalConfig, out=str(run_dir), policies=policies,
                       max_prompts=config.eval_prompts, seed=config.seed,
                       best_of=config.best_of, reward_model=str(run_dir / f"round{config.rounds}" / "rm"))
    timed("eval", None, evaluate.run_eval, eval_config)
    if main:
        from instrugo.report import write_report

        report = write_report(run_dir)
        print(f"run: done. Report: {report}\n     Numbers: {run_dir / 'eval.json'}\n"
              f"     Talk to the newest policy: instrugo chat --policy {run_dir}  (or serve it: instrugo serve --policy {run_dir})")
    return run_dir


def end_with_parent(parent: int) -> None:
    """Have the kernel end this process when its parent, process `parent`, does (Linux; elsewhere nothing):
    a stage's process must not outlive a killed `instrugo run` and write on into the run directory while the
    command is started again. Also ends it now if the parent died while it started."""
    if not sys.platform.startswith("linux"):
        return
    if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM) != 0:  # 1: PR_SET_PDEATHSIG
        return
    if os.getppid() != parent:
        os._exit(1)


def peak_rss_gib() -> float:
    """This process's peak resident memory: VmHWM on Linux (ru_maxrss would include the parent's at spawn)."""
    try:
        with open("/proc/self/status") as status:
            kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
        return kib / 2**20
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (2**30 if sys.platform == "darwin" else 2**20)


def run_stage_process(send, parent: int, fn, args: tuple) -> None:
    """The stage process: `fn(*args)`, then ("result", value, peak GiB) or ("error", exception, traceback)
    to the parent. An exception that would not survive the trip (pickle rebuilds it from its arguments)
    goes as a RuntimeError naming it."""
    end_with_parent(parent)
    try:
        outcome = ("result", fn(*args), peak_rss_gib())
    except BaseException as error:  # SystemExit and KeyboardInterrupt too: the parent decides
        details = traceback.format_exc()
        try:
            pickle.loads(pickle.dumps(error))
        except Exception:
            error = RuntimeError(f"{type(error).__name__}: {error}")
        outcome = ("error", error, details)
    send.send(outcome)


def in_fresh_process(name: str, fn, *args) -> tuple[Any, float]:
    """`fn(*args)` in a new Python process (multiprocessing's spawn: nothing inherited but the arguments):
    its result and the process's peak resident memory in GiB, or its exception raised here with the stage's
    traceback as a note. A stage run after others in the same process ran up to 2x slower on the reference
    CPU (docs/BENCHMARKS.md, cause not found), and a stage's memory goes back to the system when its process
    ends. The price is ~4 s of imports per stage."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=run_stage_process, args=(send, os.getpid(), fn, args), name=f"instrugo {name}")
    process.start()
    send.close()  # the child holds the other copy: its exit ends the pipe
    try:
        outcome = receive.recv()
    except EOFError:
        outcome = None
    except BaseException:  # an interrupt that reached this process only: the stage must not run on
        process.terminate()
        raise
    finally:
        process.join()
        receive.close()
    if outcome is None:
        raise SystemExit(f"run: the process of stage {name} ended abruptly (exit code {process.exitcode}; killed, "
                         "or out of memory?); run the same command again to resume from the stage's last checkpoint")
    kind, value, extra = outcome
    if kind == "error":
        value.add_note(f"in the process of stage {name}:\n{extra}")
        raise value
    return value, extra


def wait_for_human_labels(tasks: Path, labeled: Path, say: bool = True) -> None:
    """Stop the run with instructions (every process stops; `say`: this one prints them); re-running the
    same command continues once labels exist."""
    db = tasks.parent / "labels.sqlite"
    if say:
        print(f"""run: waiting for human labels of {tasks}.
  1. instrugo label import --db {db} {tasks}
  2. instrugo label add-labeler --db {db} NAME      (prints the labeler's token; one per person)
  3. instrugo label serve --db {db}                 (labelers open http://127.0.0.1:8000 and rank)
  4. instrugo label export --db {db} --out {labeled}
  5. re-run this same `instrugo run ...` command: it continues from here.""")
    raise SystemExit(WAITING_FOR_LABELS)


def config_sections(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict]]:
    """Split a YAML mapping into top-level run settings and per-stage sections."""
    top = {k: v for k, v in values.items() if k not in STAGE_SECTIONS}
    return top, {k: v for k, v in values.items() if k in STAGE_SECTIONS}
