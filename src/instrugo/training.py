"""Plumbing shared by the training stages (SFT, reward model, PPO): the Accelerator, the optimiser and
its schedule, resumable checkpoints, and the final model directory that plain transformers loads.

Kept out of the stage modules so that each of them reads top to bottom as its step of the paper.
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from instrugo import models
from instrugo.runio import InputError, atomic_directory, atomic_write_json, read_json, replace_directory

CHECKPOINT_DIR = "checkpoint"
TRAINER_STATE = "trainer_state.json"


def epoch_order(n_examples: int, epoch: int, seed: int) -> list[int]:
    """A fixed shuffle per epoch, so a resumed run sees exactly the examples it had not seen."""
    order = list(range(n_examples))
    random.Random(seed * 7919 + epoch).shuffle(order)
    return order


def length_grouped_steps(lengths: list[int], per_step: int, epoch: int, seed: int, group_steps: int = 8) -> list[list[int]]:
    """One epoch's optimiser steps as lists of example indices, each list sorted by length.

    The epoch's shuffle is cut into groups of `group_steps` steps; each group is sorted by length and cut
    into steps, and the steps are shuffled (as transformers' `group_by_length`). A step then holds examples
    of similar lengths, so its micro-batches pad little (on the InstruGo `sft` split at the demo's settings,
    1.04x the real tokens against 1.24x for a shuffled step sorted within itself: bench/sft_padding.py),
    while which examples meet in a step stays random beyond their length. Deterministic in (epoch, seed),
    so a resumed run takes exactly the steps it had not taken."""
    order = epoch_order(len(lengths), epoch, seed)
    steps = []
    for start in range(0, len(order), group_steps * per_step):
        group = sorted(order[start:start + group_steps * per_step], key=lambda i: lengths[i])
        steps += [group[i:i + per_step] for i in range(0, len(group), per_step)]
    random.Random(f"steps-{seed}-{epoch}").shuffle(steps)
    return steps


def step_examples(step: int, lengths: list[int], per_step: int, seed: int) -> list[int]:
    """The examples of optimiser step `step`, counted across epochs (`length_grouped_steps`). The epoch's
    grouping is recomputed each step: a sort of the example lengths, negligible beside a step."""
    epoch, position = divmod(step, math.ceil(len(lengths) / per_step))
    return length_grouped_steps(lengths, per_step, epoch, seed)[position]


def process_share(step_items: list, rank: int, world: int) -> tuple[list, float]:
    """This process's share of an optimiser step's items and the weight its losses get: 1, or, when the step
    has fewer items than processes and this one gets none, one stand-in item weighted 0, because every
    process must run a forward and backward pass for the gradient all-reduce to line up."""
    share = step_items[rank::world]
    return (share, 1.0) if share else (step_items[:1], 0.0)


def process_state():
    """This process's place in a multi-process launch (`torchrun --nproc_per_node N`); one process otherwise.

    Without a GPU, accelerate joins the launched processes only when told the run is on CPU; otherwise each
    would train alone, believing itself the main one. The first call sets up the process group; its 24-hour
    timeout lets the other processes wait while the main one runs a stage alone (sampling, evaluation)."""
    from datetime import timedelta

    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(hours=24))


def agreed_precision(requested: str) -> str:
    """`models.setup_compute` for a training stage: under a multi-process launch the main process's probe
    decides 'auto' for all (probes timed at once on shared cores could disagree, and the processes must
    compute alike)."""
    from accelerate.utils import broadcast_object_list

    state = process_state()
    precision = models.setup_compute(requested if state.is_main_process or requested != "auto" else "fp32")
    return broadcast_object_list([precision])[0] if state.num_processes > 1 else precision


def make_accelerator(precision: str, gradient_accumulation_steps: int = 1):
    """An Accelerator with bf16 autocast when `precision == "bf16"` (fp32 master weights either way)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState, GradientState

    # Stages run one after another in one process (`instrugo run`, tests) and may ask for different
    # precisions; accelerate keeps one global state, so start each stage from a fresh one. The
    # process-level state (the distributed setup) is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    state = process_state()
    # Schedules are defined per optimiser step; accelerate would otherwise step them once per process.
    # No buffer broadcast at each forward: the models' buffers (rotary frequencies) are constants, and the
    # broadcast is a collective, so processes making different numbers of forward calls per backward pass
    # (the reward model's response passes are split by length) would wait on each other forever.
    return Accelerator(mixed_precision="bf16" if precision == "bf16" else "no", cpu=state.device.type == "cpu",
                       gradient_accumulation_steps=gradient_accumulation_steps, step_scheduler_with_optimizer=False,
                       kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])


COMPILE_HELP = ("Compile the decoder layers for the training passes (torch.compile; needs a C++ compiler, "
                "else runs eager): ~35 s on a cold cache, then 1.2-1.4x faster steps on CPU (docs/BENCHMARKS.md).")


def language_model_loss(model, labels: torch.Tensor, loss_mask: torch.Tensor, **inputs) -> torch.Tensor:
    """`losses.response_lm_loss` of `model(**inputs)` (a causal LM, possibly wrapped for distributed training)
    against `labels` under `loss_mask`, positions aligned with the outputs
    (`logits_to_keep` cuts both to the last columns). The output layer is applied by the loss, in chunks over
    the scored positions only, where it is a plain linear layer (`models.head_applied_by_loss`): SFT's and
    PPO-ptx's logits over the vocabulary never exist for a whole micro-batch."""
    from instrugo import losses

    with models.head_applied_by_loss(model) as head:
        outputs = model(**inputs, use_cache=False).logits
        if head is None:
            return losses.response_lm_loss(outputs, labels, loss_mask)
        return losses.chunked_response_nll(outputs, head, labels, loss_mask)


def seed_everything(seed: int, rank: int = 0) -> int:
    """Per-process seed `seed + rank·100003` (N+ details), applied to python, numpy-free torch RNGs."""
    process_seed = seed + rank * 100003
    random.seed(process_seed)
    torch.manual_seed(process_seed)
    return process_seed


def adamw(params, lr: float, betas: tuple[float, float], eps: float, weight_decay: float = 0.0):
    """AdamW over the trainable parameters, with the fused kernel (one pass over all tensors): on the
    reference CPU a step over 133M parameters takes 0.053 s against 0.121 s for PyTorch's CPU default."""
    trainable = [p for p in params if p.requires_grad]
    fused = bool(trainable) and all(p.device.type in ("cpu", "cuda") for p in trainable)
    return torch.optim.AdamW(trainable, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused or None)


def cosine_schedule(optimizer, total_steps: int, warmup_steps: int = 0, final_fraction: float = 0.1):
    """Linear warm-up, then cosine decay from the LR to `final_fraction` of it (InstructGPT: 10%)."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def save_checkpoint(accelerator, out_dir: str | os.PathLike, state: dict[str, Any]) -> None:
    """Save model, optimiser, scheduler and RNG states plus `state` (step counters) atomically.

    Every process takes part: accelerate writes the model and optimiser from the main process and each
    process's RNG state from that process, into one staging directory the main process then swaps in."""
    final = Path(out_dir) / CHECKPOINT_DIR
    staging = final.with_name(f".{CHECKPOINT_DIR}.staging")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)  # left by a kill during an earlier save
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    # accelerate warns on every save that tied embeddings are stored once; that is expected here.
    tied_weights_warning = logging.getLogger("accelerate.utils.other")
    level = tied_weights_warning.level
    tied_weights_warning.setLevel(logging.ERROR)
    try:
        accelerator.save_state(str(staging))
    finally:
        tied_weights_warning.setLevel(level)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(staging / TRAINER_STATE, {**state, "processes": accelerator.num_processes})
        replace_directory(staging, final)
    accelerator.wait_for_everyone()


# Settings that may change between a killed run and its resumption without changing what it computes.
RESUME_MAY_CHANGE = {"save_every", "precision", "compile", "out", "eval_json"}


def record_settings(out_dir: str | os.PathLike, stage: str, settings: dict[str, Any], write: bool) -> None:
    """Write `<stage>_config.json` into the run directory. When a checkpoint is there, the run resumes it,
    which is only sound with the same settings: a changed one stops with the field named."""
    path = Path(out_dir) / f"{stage}_config.json"
    resuming = any((Path(out_dir) / name / TRAINER_STATE).exists() for name in (CHECKPOINT_DIR, f".{CHECKPOINT_DIR}.old"))
    if resuming and path.exists():
        before = read_json(path)
        for key, value in settings.items():
            if key not in RESUME_MAY_CHANGE and key in before and before[key] != value:
                raise InputError(path, f"the checkpoint here was trained with {key}={before[key]!r}, not {value!r}; "
                                 "resume with the same settings or choose another --out", field=key)
    if write:
        atomic_write_json(path, settings)


def load_checkpoint(accelerator, out_dir: str | os.PathLike) -> dict[str, Any] | None:
    """Restore the last checkpoint in `out_dir` into the prepared objects; None when there is none.

    A kill between the two renames of `replace_directory` leaves only the previous checkpoint, under
    its `.old` name: that one is used then. A checkpoint resumes only in as many processes as saved it:
    each process's share of the data and its random state depend on the count."""
    checkpoint = Path(out_dir) / CHECKPOINT_DIR
    if not (checkpoint / TRAINER_STATE).exists():
        checkpoint = Path(out_dir) / f".{CHECKPOINT_DIR}.old"
    if not (checkpoint / TRAINER_STATE).exists():
        return None
    state = read_json(checkpoint / TRAINER_STATE)
    saved_by = state.pop("processes", 1)
    if saved_by != accelerator.num_processes:
        raise InputError(checkpoint / TRAINER_STATE, f"saved by {saved_by} process(es); resume it with as many, "
                         f"not {accelerator.num_processes}, or choose another --out", field="processes")
    accelerator.load_state(str(checkpoint))
    return state


def remove_checkpoint(out_dir: str | os.PathLike) -> None:
    shutil.rmtree(Path(out_dir) / CHECKPOINT_DIR, ignore_errors=True)


def save_pretrained_files(model, tokenizer, out_dir: str | os.PathLike) -> None:
    """Write a model directory plain `from_pretrained(out_dir)` loads (LoRA merged), file by file
    atomically; the stage's completion marker, written after this, says the set is whole."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = models.merge_lora(model)
    with atomic_directory(out_dir / ".model-staging") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    staging = out_dir / ".model-staging"
    for path in staging.iterdir():
        os.replace(path, out_dir / path.name)
    staging.rmdir()


def count_parameters(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
