"""Step 1 of InstructGPT: supervised fine-tuning on demonstrations.

The policy learns to continue a chat-formatted prompt with the labeler's demonstration. The loss is the
mean negative log-likelihood of the **response tokens only** (prompt and padding contribute nothing), with
a cosine learning rate decaying to 10% and no warm-up, Adam β = (0.9, 0.95), dropout off (REFERENCE §1).

    instrugo sft --model default --data instrugo:sft --out runs/sft

Output: `out/` holds a model that `AutoModelForCausalLM.from_pretrained(out)` loads (tokenizer included),
`metrics.jsonl` (one line per optimiser step), `config.json`'s sibling `sft_config.json`, and
`complete.json` once finished. A killed run resumes from `out/checkpoint/` at the step it had reached.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from instrugo import models, training
from instrugo.config import option, require, to_dict
from instrugo.generation import chat_prompt, pad_batch, positions_skipping_padding
from instrugo.runio import InputError, MetricsLog, is_complete, mark_complete


@dataclass
class SFTConfig:
    """Supervised fine-tuning. Batch sizes are in examples: `batch_size` per optimiser step, split into
    micro-batches of `micro_batch_size` (gradient accumulation) across all processes."""

    model: str = option("default", "Model to fine-tune: 'default', 'tiny', a .gguf file or a HF directory.")
    data: str = option("instrugo:sft", "Demonstrations: 'instrugo:sft' or a JSONL of {prompt, response} / {messages}.")
    out: str = option("runs/sft", "Output directory (model, metrics.jsonl, checkpoint).")
    epochs: float = option(2.0, "Passes over the data (InstructGPT: 16; its PPO init: 2).")
    lr: float = option(2e-5, "Peak learning rate.")
    lr_final_fraction: float = option(0.1, "Cosine decay ends at this fraction of lr (InstructGPT: 10%).")
    warmup_steps: int = option(0, "Linear warm-up steps (InstructGPT: none).")
    batch_size: int = option(16, "Examples per optimiser step.")
    micro_batch_size: int = option(8, "Examples per forward/backward pass (gradient accumulation).")
    max_length: int = option(384, "Maximum tokens of prompt + response; longer responses are cut.")
    max_examples: int = option(0, "Use only the first N examples (0 = all).")
    adam_beta1: float = option(0.9, "Adam β1.")
    adam_beta2: float = option(0.95, "Adam β2 (InstructGPT: 0.95).")
    adam_eps: float = option(1e-8, "Adam ε.")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    max_grad_norm: float = option(1.0, "Gradient clipping (0 = off).")
    dropout: float = option(0.0, "Residual/attention dropout (off by default: N+ details).")
    lora_rank: int = option(0, "Train a LoRA adapter of this rank instead of all weights (0 = full).")
    lora_alpha: float = option(32.0, "LoRA α.")
    precision: str = option("auto", "auto (probe bf16 speed), bf16 (autocast) or fp32.")
    compile: bool = option(False, training.COMPILE_HELP)
    save_every: int = option(50, "Checkpoint every N optimiser steps (for resume).")
    seed: int = option(0, "Random seed (data order, initialisation of LoRA).")

    presets: ClassVar[dict[str, dict]] = {
        "tiny": dict(model="tiny", epochs=1.0, lr=1e-3, batch_size=8, micro_batch_size=8, max_length=256,
                     max_examples=64, save_every=4),
    }

    def validate(self) -> None:
        require(self.epochs > 0, "epochs", "must be positive")
        require(self.batch_size > 0 and self.micro_batch_size > 0, "batch_size", "must be positive")
        require(self.batch_size % self.micro_batch_size == 0, "micro_batch_size",
                f"must divide batch_size ({self.batch_size})")
        require(self.max_length >= 16, "max_length", "must be at least 16")


def tokenize_example(tokenizer, messages: list[dict], response: str, max_length: int) -> tuple[list[int], list[int]] | None:
    """Token ids of prompt + response + EOS, and a mask that is 1 on the response and its EOS.

    Prompt and response are tokenized separately, exactly as generation later sees them (the prompt ends
    with the opened assistant turn). Returns None when the prompt alone leaves no room for a response.
    """
    prompt_ids = tokenizer(chat_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    room = max_length - len(prompt_ids)
    if room < 4:
        return None
    response_ids = response_ids[:room]
    return prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids)


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int, pad_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad a micro-batch; padding is masked out of attention and loss, and position ids skip it.

    Padding on the left ends every row at the right edge, so the responses of a micro-batch share its
    last columns and the LM head needs to run only there (`response_logits_width`)."""
    input_ids, attention_mask = pad_batch([ids for ids, _ in examples], pad_id, pad_side)
    loss_mask = pad_batch([mask for _, mask in examples], 0, pad_side)[0].float()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": positions_skipping_padding(attention_mask),
            "loss_mask": loss_mask}


def response_logits_width(loss_mask: torch.Tensor) -> int:
    """How many of a left-padded micro-batch's last positions need logits: the longest response, plus
    the position before it (it predicts the response's first token). The rest of the LM head's work
    (full-vocabulary logits over every prompt token) would be thrown away by the loss mask."""
    scored_columns = loss_mask.any(0).nonzero()
    first = int(scored_columns[0]) if len(scored_columns) else loss_mask.shape[1] - 1
    return loss_mask.shape[1] - max(0, first - 1)


def run_sft(config: SFTConfig) -> Path:
    """Fine-tune `config.model` on `config.data`; returns the output directory."""
    from instrugo.data import load_examples

    out = Path(config.out)
    if is_complete(out):
        print(f"sft: {out} is complete; nothing to do")
        return out
    precision = training.agreed_precision(config.precision)
    accelerator = training.make_accelerator(precision)
    world = accelerator.num_processes
    training.seed_everything(config.seed, accelerator.process_index)

    tokenizer = models.load_tokenizer(config.model)
    records = load_examples(config.data)
    if config.max_examples:
        records = records[:config.max_examples]
    examples = [tokenize_example(tokenizer, r["messages"], r["response"], config.max_length) for r in records]
    skipped = sum(e is None for e in examples)
    examples = [e for e in examples if e is not None]
    lengths = [len(ids) for ids, _ in examples]
    if not examples:
        raise InputError(config.data, f"no usable examples: every prompt is longer than max_length ({config.max_length})")

    model = models.load_causal_lm(config.model, tokenizer, dropout=config.dropout, max_tokens=config.max_length)
    if config.lora_rank:
        model = models.apply_lora(model, config.lora_rank, config.lora_alpha)
        models.frozen_linears_to_bf16(model, precision)
    optimizer = training.adamw(model.parameters(), config.lr, (config.adam_beta1, config.adam_beta2),
                               config.adam_eps, config.weight_decay)
    steps_per_epoch = math.ceil(len(examples) / config.batch_size)
    total_steps = max(1, round(steps_per_epoch * config.epochs))
    scheduler = training.cosine_schedule(optimizer, total_steps, config.warmup_steps, config.lr_final_fraction)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    training.record_settings(out, "sft", to_dict(config), accelerator.is_main_process)
    state = training.load_checkpoint(accelerator, out) or {"step": 0}
    start_step = state["step"]
    if accelerator.is_main_process:
        total, trainable = training.count_parameters(model)
        per_process = config.batch_size // world
        print(f"sft: {len(examples)} examples ({skipped} skipped: prompt too long), {config.epochs:g} epochs "
              f"= {total_steps} steps of {config.batch_size} examples ({per_process} per process x {world} "
              f"processes, micro-batches of {config.micro_batch_size} -> "
              f"{max(1, per_process // config.micro_batch_size)} accumulation steps); "
              f"{trainable:,}/{total:,} parameters train; precision {models.describe_precision(precision)}"
              + models.describe_compile(config.compile)
              + (f"; resuming at step {start_step}" if start_step else ""))
    metrics = MetricsLog(out / "metrics.jsonl", resume_step=start_step if start_step else None,
                         enabled=accelerator.is_main_process)

    model.train()
    bar = tqdm(total=total_steps, initial=start_step, desc="sft", disable=not accelerator.is_main_process,
               dynamic_ncols=True)
    for step in range(start_step, total_steps):
        started = time.perf_counter()
        step_batch = [examples[i] for i in training.step_examples(step, lengths, config.batch_size, config.seed)]
        # Every process knows the whole step, so each weighs its micro-batches by the step's token count:
        # the gradient is the token mean over the step whatever the processes' shares.
        n_tokens = sum(sum(mask) for _, mask in step_batch)
        # Sorted by length, so micro-batches pad little.
        batch, weight = training.process_share(step_batch, accelerator.process_index, world)
        micro_batches = [batch[i:i + config.micro_batch_size] for i in range(0, len(batch), config.micro_batch_size)]
        step_loss = 0.0
        for index, micro in enumerate(micro_batches):
            tensors = {k: v.to(accelerator.device) for k, v in collate(micro, tokenizer.pad_token_id, "left").items()}
            width = response_logits_width(tensors["loss_mask"])
            last = index == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last else accelerator.no_sync(model)
            with sync, accelerator.autocast(), models.compiled_layers(model, config.compile):
                loss = training.language_model_loss(
                    model, tensors["input_ids"][:, -width:], tensors["loss_mask"][:, -width:],
                    input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"],
                    position_ids=tensors["position_ids"], logits_to_keep=width)
                share = weight * tensors["loss_mask"][:, 1:].sum().item() / max(1, n_tokens)
                accelerator.backward(loss * share * world)  # processes' gradients are averaged, not summed
            step_loss += loss.item() * share
        if world > 1:
            step_loss = accelerator.reduce(torch.tensor(step_loss, device=accelerator.device), "sum").item()
        if not math.isfinite(step_loss):
            raise SystemExit(f"sft: loss is {step_loss} at step {step}; last checkpoint kept in {out}")
        grad_norm = (accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                     if config.max_grad_norm else torch.tensor(0.0))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        seconds = time.perf_counter() - started
        row = {"step": step + 1, "epoch": round((step + 1) / steps_per_epoch, 4), "loss": round(step_loss, 5),
               "lr": scheduler.get_last_lr()[0], "grad_norm": round(float(grad_norm), 4),
               "response_tokens": n_tokens, "tokens_per_second": round(n_tokens / seconds, 1)}
        metrics.log(row)
        bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{row['lr']:.2e}")
        bar.update(1)
        if (step + 1) % config.save_every == 0 and step + 1 < total_steps:
            training.save_checkpoint(accelerator, out, {"step": step + 1})
    bar.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        training.save_pretrained_files(accelerator.unwrap_model(model), tokenizer, out)
        mark_complete(out, {"stage": "sft", "steps": total_steps, "examples": len(examples), "processes": world,
                            "base_model": str(models.resolve_model(config.model))})
        training.remove_checkpoint(out)
        print(f"sft: model written to {out}")
    return out
