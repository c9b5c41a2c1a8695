"""Step 2 of InstructGPT: a reward model from K-way rankings.

Labelers rank K = 4..9 responses to one prompt, which implies C(K,2) comparisons. Following the paper
(REFERENCE §2), **all comparisons of a prompt form one batch element**: the K responses go through the
model once each (K forward passes, not 2·C(K,2)), and the loss averages −log σ(r_w − r_l) over the
prompt's pairs, ties dropped. The prompt they share is read once: the K responses continue its KV cache
(`raw_scores`), with gradients flowing back through it. Shuffling pairs as independent examples makes
each response take K−1 separate updates and overfits within one epoch; `--expand-pairs` does exactly
that, for comparison.

The model is a causal LM backbone (the SFT policy by default; any causal LM, with its own tokenizer — it
reads *text*) whose unembedding is replaced by a scalar head, N(0, 1/sqrt(d+1)) initialised, read at the
last response token (EOS). One epoch, cosine LR to 10%. Afterwards a bias is chosen so that the SFT
demonstrations score 0 on average; it is stored in the model's config as `reward_bias`
(`score_texts` adds it; plain transformers returns the raw score, so add `config.reward_bias`).

    instrugo rm --model runs/sft --comparisons labeled.jsonl --out runs/rm
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from instrugo import losses, models, training
from instrugo.comparisons import ComparisonTask, read_tasks
from instrugo.config import option, require, to_dict
from instrugo.generation import chat_prompt, pad_batch, positions_skipping_padding
from instrugo.runio import InputError, MetricsLog, is_complete, mark_complete, update_json, format_percent


@dataclass
class RewardConfig:
    """Reward-model training. Batches are counted in prompts: each prompt brings all its K responses."""

    model: str = option("runs/sft", "Backbone: a causal LM ('default', 'tiny', .gguf, or a directory).")
    comparisons: list[str] = option(["comparisons.jsonl"], "Labeled comparison-task JSONL files (all are used).")
    out: str = option("runs/rm", "Output directory (model, metrics.jsonl, checkpoint).")
    eval_json: str = option("", "eval.json to add the reward_model entry to (default: OUT/../eval.json).")
    epochs: float = option(1.0, "Passes over the comparisons (InstructGPT: 1; more overfits).")
    lr: float = option(9e-6, "Peak learning rate (InstructGPT: 9e-6).")
    lr_final_fraction: float = option(0.1, "Cosine decay ends at this fraction of lr.")
    prompts_per_batch: int = option(64, "Prompts per optimiser step (InstructGPT: 64, for tens of thousands of "
                                        "prompts; on a few hundred, 1-4 learn more per epoch).")
    micro_batch_prompts: int = option(4, "Prompts per forward pass (all their responses together).")
    max_length: int = option(384, "Maximum tokens of prompt + response.")
    heldout_fraction: float = option(0.1, "Share of prompts held out to measure accuracy.")
    expand_pairs: bool = option(False, "Train on the C(K,2) pairs as independent examples (the peers' way).")
    normalize_data: str = option("instrugo:sft", "Demonstrations whose mean score is set to 0 ('' = skip).")
    normalize_examples: int = option(256, "How many demonstrations to average for the bias.")
    adam_eps: float = option(1e-5, "Adam ε.")
    max_grad_norm: float = option(1.0, "Gradient clipping (0 = off).")
    lora_rank: int = option(0, "Train a LoRA adapter (plus the head) instead of all weights (0 = full).")
    lora_alpha: float = option(32.0, "LoRA α.")
    precision: str = option("auto", "auto (probe bf16 speed), bf16 or fp32.")
    save_every: int = option(20, "Checkpoint every N optimiser steps.")
    seed: int = option(0, "Seed for the held-out split, data order and head initialisation.")

    presets: ClassVar[dict[str, dict]] = {
        "tiny": dict(model="tiny", lr=1e-3, prompts_per_batch=8, micro_batch_prompts=4, max_length=256,
                     normalize_examples=16, save_every=4),
    }

    def validate(self) -> None:
        require(bool(self.comparisons), "comparisons", "name at least one labeled comparisons file")
        require(0 <= self.heldout_fraction < 1, "heldout_fraction", "must be in [0, 1)")
        require(self.prompts_per_batch % self.micro_batch_prompts == 0, "micro_batch_prompts",
                f"must divide prompts_per_batch ({self.prompts_per_batch})")


# ------------------------------------------------------------------------------------------ the model

def init_reward_model(backbone: str | Path, tokenizer, seed: int, max_tokens: int | None = None):
    """A causal LM backbone with a fresh scalar head: N(0, 1/sqrt(d_model + 1)) (InstructGPT)."""
    model = models.load_scalar_model(backbone, tokenizer, max_tokens)
    head = model.score
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        torch.nn.init.normal_(head.weight, std=1 / math.sqrt(head.in_features + 1))
    if head.bias is not None:
        torch.nn.init.zeros_(head.bias)
    return model


def load_reward_model(path: str | Path):
    """A trained reward model and its tokenizer. The model returns raw scores; `score_texts` adds
    `config.reward_bias` so that demonstrations score 0 on average."""
    tokenizer = models.load_tokenizer(path)
    return models.load_scalar_model(path, tokenizer).eval(), tokenizer


def reward_inputs(tokenizer, prompt: str | list[dict], response: str, max_length: int) -> list[int]:
    """Token ids the RM reads: chat-formatted prompt + response + EOS (the score is read at EOS)."""
    prompt_ids = tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    response_ids = response_ids[:max(1, max_length - 1 - len(prompt_ids))]
    prompt_ids = prompt_ids[-(max_length - 1 - len(response_ids)):]  # an over-long prompt keeps its end
    return prompt_ids + response_ids + [tokenizer.eos_token_id]


def shared_prefix_length(group: list[list[int]]) -> int:
    """How many leading tokens every sequence of `group` has in common, leaving each at least its last
    token (where the score is read). A prompt's K responses share the chat-formatted prompt."""
    return min(len(os.path.commonprefix(group)), min(len(s) for s in group) - 1)


def raw_scores(model, groups: list[list[list[int]]], pad_id: int) -> torch.Tensor:
    """One scalar per sequence of `groups`, in order. Right padding with pad ≠ EOS, so transformers reads
    the score at the last real token, the response's EOS. Called through the (possibly distributed)
    model's own forward.

    Sequences of a group (the responses to one prompt) share one pass over their common prefix, whose KV
    cache each of them then continues from, with the positions and attention a full pass would have: a
    prompt of P tokens with K responses of R reads P + K·R tokens instead of K·(P + R). The responses then go
    in calls of similar lengths (`padding_chunks`). A batch of single sequences (or of groups with nothing
    in common) takes one plain pass."""
    device = next(model.parameters()).device
    prefix_lengths = [shared_prefix_length(group) for group in groups]
    if all(len(group) == 1 for group in groups) or min(prefix_lengths) == 0:
        ids, mask = (t.to(device) for t in pad_batch([s for group in groups for s in group], pad_id, "right"))
        return model(input_ids=ids, attention_mask=mask).logits[:, 0].float()
    prefix_ids, prefix_mask = (t.to(device) for t in pad_batch([g[0][:n] for g, n in zip(groups, prefix_lengths)], pad_id))
    prompt_cache = DynamicCache()
    model(input_ids=prefix_ids, attention_mask=prefix_mask, position_ids=positions_skipping_padding(prefix_mask),
          past_key_values=prompt_cache, use_cache=True)
    suffixes = [s[n:] for group, n in zip(groups, prefix_lengths) for s in group]
    group_of_row = [g for g, group in enumerate(groups) for _ in group]
    by_length = sorted(range(len(suffixes)), key=lambda row: len(suffixes[row]))
    chunk_scores = []
    for chunk in padding_chunks([len(suffixes[row]) for row in by_length]):
        rows = [by_length[i] for i in chunk]
        prompt_of_row = torch.tensor([group_of_row[row] for row in rows], device=device)
        cache = DynamicCache()  # each row continues its prompt's keys and values; gradients flow back to them
        for index, layer in enumerate(prompt_cache.layers):
            cache.update(layer.keys[prompt_of_row], layer.values[prompt_of_row], index)
        ids, mask = (t.to(device) for t in pad_batch([suffixes[row] for row in rows], pad_id, "right"))
        starts = torch.tensor([prefix_lengths[group_of_row[row]] for row in rows], device=device)
        chunk_scores.append(model(input_ids=ids, attention_mask=torch.cat([prefix_mask[prompt_of_row], mask], 1),
                                  position_ids=starts[:, None] + torch.arange(ids.shape[1], device=device),
                                  past_key_values=cache, use_cache=True).logits[:, 0].float())
    return torch.cat(chunk_scores)[torch.tensor(by_length, device=device).argsort()]


# What one more forward call is taken to cost, in padded token positions, when responses are split into
# calls by length. A round guess (a call's per-layer overhead), not tuned: the RM epochs in
# docs/BENCHMARKS.md were measured with it.
CALL_COST_TOKENS = 64


def padding_chunks(lengths: list[int]) -> list[list[int]]:
    """Split ascending `lengths` into consecutive chunks, each padded to its longest, minimising padded
    positions plus CALL_COST_TOKENS per chunk (one response of 190 tokens among 60-token ones would
    otherwise pad them all)."""
    best = [0.0] + [math.inf] * len(lengths)
    cut = [0] * (len(lengths) + 1)
    for end in range(1, len(lengths) + 1):
        for start in range(end):
            cost = best[start] + (end - start) * lengths[end - 1] + CALL_COST_TOKENS
            if cost < best[end]:
                best[end], cut[end] = cost, start
    chunks, end = [], len(lengths)
    while end:
        chunks.append(list(range(cut[end], end)))
        end = cut[end]
    return chunks[::-1]


@torch.no_grad()
def score_texts(model, tokenizer, prompts: list, responses: list[str], precision: str,
                batch_size: int = 16, max_length: int | None = None) -> list[float]:
    """Normalised rewards of (prompt, response) texts: what PPO, best-of-n and evaluation call. Texts are
    cut to the length the model was trained on (`config.reward_max_length`)."""
    bias = float(getattr(model.config, "reward_bias", 0.0))
    max_length = max_length or int(getattr(model.config, "reward_max_length", 384))
    sequences = [reward_inputs(tokenizer, p, r, max_length) for p, r in zip(prompts, responses)]
    # Responses to the same prompt are scored together (sharing the prompt's pass, `raw_scores`), in
    # batches of prompts of similar length; scores return in the callers' order.
    by_prompt: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_prompt.setdefault(repr(prompt), []).append(i)
    units = sorted((group[start:start + batch_size] for group in by_prompt.values()
                    for start in range(0, len(group), batch_size)),
                   key=lambda unit: max(len(sequences[i]) for i in unit))
    batches: list[list[list[int]]] = [[]]
    for unit in units:
        if sum(map(len, batches[-1])) + len(unit) > batch_size:
            batches.append([])
        batches[-1].append(unit)
    scores = [0.0] * len(sequences)
    for batch in batches:
        with models.autocast(precision), models.inference_attention(model):
            scored = (raw_scores(model, [[sequences[i] for i in unit] for unit in batch], tokenizer.pad_token_id)
                      + bias).tolist()
        for i, score in zip((i for unit in batch for i in unit), scored):
            scores[i] = score
    return scores


# ------------------------------------------------------------------------------------------- the data

def expand_to_pairs(tasks: list[ComparisonTask]) -> list[ComparisonTask]:
    """Each implied (better, worse) pair as its own K = 2 task: what pairwise libraries train on."""
    return [ComparisonTask(id=f"{t.id}/{i}>{j}", prompt=t.prompt, responses=[t.responses[i], t.responses[j]],
                           ranking=[[0], [1]], labeler=t.labeler, example=t.example)
            for t in tasks for i, j in t.pairs()]


def split_heldout(tasks: list[ComparisonTask], fraction: float, seed: int) -> tuple[list, list]:
    """Hold out whole prompts (never pairs of a training prompt) so accuracy measures generalisation."""
    prompts = sorted({t.prompt for t in tasks})
    random.Random(seed).shuffle(prompts)
    heldout_prompts = set(prompts[:round(len(prompts) * fraction)])
    return [t for t in tasks if t.prompt not in heldout_prompts], [t for t in tasks if t.prompt in heldout_prompts]


def batch_scores(model, tokenizer, tasks: list[ComparisonTask], max_length: int):
    """Scores [B, K_max] of every response of every task (one pass over each prompt and one over each
    response, `raw_scores`), plus levels and mask."""
    flat = raw_scores(model, [[reward_inputs(tokenizer, t.prompt, r, max_length) for r in t.responses] for t in tasks],
                      tokenizer.pad_token_id)
    k_max = max(len(t.responses) for t in tasks)
    scores = torch.zeros(len(tasks), k_max, device=flat.device)
    levels = torch.zeros(len(tasks), k_max, dtype=torch.long, device=flat.device)
    valid = torch.zeros(len(tasks), k_max, dtype=torch.bool, device=flat.device)
    offset = 0
    for row, task in enumerate(tasks):
        k = len(task.responses)
        scores[row, :k] = flat[offset:offset + k]
        levels[row, :k] = torch.tensor(task.rank_levels())
        valid[row, :k] = True
        offset += k
    return scores, levels, valid


@torch.no_grad()
def heldout_accuracy(model, tokenizer, tasks: list[ComparisonTask], precision: str, max_length: int,
                     batch_prompts: int = 8) -> dict:
    """Pairwise accuracy on held-out prompts against the labels and against the noise-free gold judge."""
    if not tasks:
        return {"heldout_accuracy_vs_labels": None, "heldout_accuracy_vs_gold": None, "heldout_pairs": 0}
    from instrugo.judge import gold_judge

    label_hits = label_pairs = gold_hits = gold_pairs = 0.0
    for start in range(0, len(tasks), batch_prompts):
        chunk = tasks[start:start + batch_prompts]
        with models.autocast(precision):
            scores, _, _ = batch_scores(model, tokenizer, chunk, max_length)
        for row, task in enumerate(chunk):
            s = scores[row].tolist()
            for i, j in task.pairs():
                label_pairs += 1
                label_hits += 1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0
            if task.example is not None:
                gold = [gold_judge(task.example, r).score for r in task.responses]
                for i in range(len(gold)):
                    for j in range(len(gold)):
                        if gold[i] > gold[j]:
                            gold_pairs += 1
                            gold_hits += 1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0
    return {"heldout_accuracy_vs_labels": label_hits / label_pairs if label_pairs else None,
            "heldout_accuracy_vs_gold": gold_hits / gold_pairs if gold_pairs else None,
            "heldout_pairs": int(label_pairs), "heldout_gold_pairs": int(gold_pairs)}


def demonstration_bias(model, tokenizer, spec: str, n: int, precision: str, max_length: int) -> float:
    """The bias that makes the demonstrations score 0 on average (InstructGPT's normalisation)."""
    from instrugo.data import load_examples

    records = load_examples(spec)[:n]
    scores = score_texts(model, tokenizer, [r["messages"] for r in records], [r["response"] for r in records],
                         precision, max_length=max_length)
    return float(getattr(model.config, "reward_bias", 0.0)) - sum(scores) / len(scores)


# ------------------------------------------------------------------------------------------- the loop

def run_reward(config: RewardConfig) -> Path:
    """Train a reward model on the labeled comparisons; returns the output directory."""
    out = Path(config.out)
    if is_complete(out):
        print(f"rm: {out} is complete; nothing to do")
        return out
    tasks = [t for path in config.comparisons for t in read_tasks(path, require_ranking=True)]
    tasks = [t for t in tasks if t.pairs()]  # all-tie rankings carry no comparison
    if not tasks:
        raise InputError(config.comparisons[0], "no labeled task with at least one strict comparison")
    train, heldout = split_heldout(tasks, config.heldout_fraction, config.seed)
    if config.expand_pairs:
        train = expand_to_pairs(train)
    precision = training.agreed_precision(config.precision)
    accelerator = training.make_accelerator(precision)
    world = accelerator.num_processes
    training.seed_everything(config.seed, accelerator.process_index)

    tokenizer = models.load_tokenizer(config.model)
    longest = [max(len(reward_inputs(tokenizer, t.prompt, r, config.max_length)) for r in t.responses) for t in train]
    model = init_reward_model(config.model, tokenizer, config.seed, config.max_length)
    if config.lora_rank:
        model = models.apply_lora(model, config.lora_rank, config.lora_alpha, full_modules=["score"])
        models.frozen_linears_to_bf16(model, precision)
    optimizer = training.adamw(model.parameters(), config.lr, (0.9, 0.95), config.adam_eps)
    steps_per_epoch = math.ceil(len(train) / config.prompts_per_batch)
    total_steps = max(1, round(steps_per_epoch * config.epochs))
    scheduler = training.cosine_schedule(optimizer, total_steps, 0, config.lr_final_fraction)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    training.record_settings(out, "rm", to_dict(config), accelerator.is_main_process)
    state = training.load_checkpoint(accelerator, out) or {"step": 0}
    start_step = state["step"]
    n_comparisons = sum(len(t.pairs()) for t in tasks)
    if accelerator.is_main_process:
        ks = sorted({len(t.responses) for t in train})
        print(f"rm: {len(tasks)} ranked prompts ({n_comparisons} comparisons, K in {ks}); {len(train)} train "
              f"{'pairs' if config.expand_pairs else 'prompts'}, {len(heldout)} held out; {total_steps} steps of "
              f"{config.prompts_per_batch} ({config.micro_batch_prompts} per forward pass, {world} processes); "
              f"precision {models.describe_precision(precision)}" + (f"; resuming at step {start_step}" if start_step else ""))
    metrics = MetricsLog(out / "metrics.jsonl", resume_step=start_step or None, enabled=accelerator.is_main_process)

    started_training = time.perf_counter()
    model.train()
    bar = tqdm(total=total_steps, initial=start_step, desc="rm", disable=not accelerator.is_main_process,
               dynamic_ncols=True)
    for step in range(start_step, total_steps):
        started = time.perf_counter()
        indices = training.step_examples(step, longest, config.prompts_per_batch, config.seed)
        batch, weight = training.process_share([train[i] for i in indices], accelerator.process_index, world)
        micro_batches = [batch[i:i + config.micro_batch_prompts] for i in range(0, len(batch), config.micro_batch_prompts)]
        step_loss = step_accuracy = 0.0
        for index, micro in enumerate(micro_batches):
            sync = contextlib.nullcontext() if index == len(micro_batches) - 1 else accelerator.no_sync(model)
            with sync, accelerator.autocast():
                scores, levels, valid = batch_scores(model, tokenizer, micro, config.max_length)
                loss, accuracy = losses.kway_ranking_loss(scores, levels, valid)
                # The step's loss is the mean over all its prompts, whatever the processes' shares (their
                # gradients are averaged, hence the factor world).
                share = weight * len(micro) / len(indices)
                accelerator.backward(loss * share * world)
            step_loss += loss.item() * share
            step_accuracy += float(accuracy) * share
        if world > 1:
            step_loss, step_accuracy = (accelerator.reduce(torch.tensor(v, device=accelerator.device), "sum").item()
                                        for v in (step_loss, step_accuracy))
        if not math.isfinite(step_loss):
            raise SystemExit(f"rm: loss is {step_loss} at step {step}; last checkpoint kept in {out}")
        if config.max_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        metrics.log({"step": step + 1, "loss": round(step_loss, 5), "train_accuracy": round(step_accuracy, 4),
                     "lr": scheduler.get_last_lr()[0], "prompts": len(indices),
                     "seconds": round(time.perf_counter() - started, 3)})
        bar.set_postfix(loss=f"{step_loss:.3f}", acc=f"{step_accuracy:.2f}")
        bar.update(1)
        if (step + 1) % config.save_every == 0 and step + 1 < total_steps:
            training.save_checkpoint(accelerator, out, {"step": step + 1})
    bar.close()
    train_seconds = time.perf_counter() - started_training

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # Evaluate the unwrapped model: a distributed wrapper's forward would wait for the other processes.
        final = models.merge_lora(accelerator.unwrap_model(model)).eval()
        result = heldout_accuracy(final, tokenizer, heldout, precision, config.max_length)
        bias = (demonstration_bias(final, tokenizer, config.normalize_data, config.normalize_examples,
                                   precision, config.max_length) if config.normalize_data else 0.0)
        final.config.reward_bias = bias
        final.config.reward_max_length = config.max_length
        training.save_pretrained_files(final, tokenizer, out)
        summary = {**result, "n_comparisons": n_comparisons, "n_prompts": len(tasks), "reward_bias": bias,
                   "train_seconds": round(train_seconds, 2), "expand_pairs": config.expand_pairs, "processes": world,
                   "path": str(out)}
        metrics.log({"step": total_steps, "final": True, **summary})
        update_json(Path(config.eval_json) if config.eval_json else out.parent / "eval.json",
                    {"reward_model": summary})
        mark_complete(out, {"stage": "rm", **summary})
        training.remove_checkpoint(out)
        print(f"rm: held-out accuracy {format_percent(result['heldout_accuracy_vs_labels'])} vs labels, "
              f"{format_percent(result['heldout_accuracy_vs_gold'])} vs gold; demonstrations normalised with bias "
              f"{bias:+.3f}; model written to {out}")
    return out

