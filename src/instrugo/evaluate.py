"""Evaluation: does the model follow instructions better? Measured by code, not by eye.

For each policy (base, sft, later ppo, ppo_ptx) and each held-out split, generate one response per prompt,
apply the noise-free gold judge, and write to `eval.json`:

    {"splits": {SPLIT: {POLICY: {"constraint_pass_rate", "gold_score", "win_rate_vs_sft", "kl_to_sft",
                                 "constraint_fraction", "topicality", "quality",
                                 "mean_length_tokens", "n", "pass_rate_by_kind", "no_eos_rate"}}},
     "policies": {POLICY: {"path": ...}}, "pretrain_loss": {POLICY: ...}, "seconds": {STAGE: ...}}

- `win_rate_vs_sft`: share of prompts where the policy's gold score beats SFT's (ties count half).
- `constraint_fraction`, `topicality`, `quality`: the means of the gold score's terms (`judge/gold.py`), so a
  win can be read as more constraints met, more on topic, or less degenerate (e.g. less repetitive) text.
- `kl_to_sft`: nats per response, Σ_t KL(π(·|x, y<t) ‖ π_sft(·|x, y<t)) over the policy's own response
  tokens, averaged over prompts (exact per-token KL over the vocabulary: no sampling noise).
- `pretrain_loss`: mean token NLL on the held-out part of the `pretrain` split, topics left out of PPO-ptx's
  pretraining text (the alignment tax probe).

Generations are kept in `OUT/generations/SPLIT/POLICY.jsonl` (with verdicts) for the report, and reused
when the same model and settings are evaluated again.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from instrugo import losses, models
from instrugo.config import option, require
from instrugo.generation import DECODE_BATCH_SIZE, SamplingConfig, encode_prompts, sample_responses
from instrugo.runio import InputError, atomic_write_jsonl, iter_jsonl, update_json

REFERENCE_POLICY = "sft"
NO_KL_POLICIES = ("sft", "base")
GOLD_TERMS = ("constraint_fraction", "topicality", "quality")  # GoldVerdict fields the score is made of


@dataclass
class EvalConfig:
    """Generate on held-out splits with each policy and score the responses with the gold judge."""

    out: str = option("runs/eval", "Directory for eval.json and the generations.")
    policies: list[str] = option(["base=default", "sft=runs/sft"],
                                 "Policies as NAME=MODEL (comma-separated); 'sft' is the reference.")
    splits: list[str] = option(["eval", "eval_unseen"], "InstruGo splits (or JSONL files) to evaluate on.")
    max_prompts: int = option(0, "Evaluate only the first N prompts of each split (0 = all).")
    max_new_tokens: int = option(192, "Response length limit in tokens.")
    temperature: float = option(0.0, "Sampling temperature (0 = greedy, the default: a noise-free comparison).")
    batch_size: int = option(DECODE_BATCH_SIZE, "Sequences generated together.")
    kl_batch_size: int = option(8, "Sequences per forward pass when measuring KL and pretraining loss.")
    pretrain_examples: int = option(200, "Held-out pretraining texts for pretrain_loss (0 = skip).")
    reward_model: str = option("", "Reward model: adds each policy's mean rm_score, and enables best-of-n.")
    best_of: int = option(0, "Best-of-n baseline: sample N from sft at temperature 1, keep the RM's favourite (0 = off).")
    precision: str = option("auto", "auto (probe bf16 speed), bf16 or fp32.")
    seed: int = option(0, "Sampling seed (when temperature > 0, and for best-of-n).")

    presets: ClassVar[dict[str, dict]] = {"tiny": dict(max_prompts=16, max_new_tokens=48, pretrain_examples=16)}

    def validate(self) -> None:
        require(bool(self.policies), "policies", "name at least one policy as NAME=MODEL")
        for spec in self.policies:
            require("=" in spec and all(spec.split("=", 1)), "policies", f"'{spec}' is not NAME=MODEL")
        require(self.max_new_tokens > 0, "max_new_tokens", "must be positive")
        require(not self.best_of or bool(self.reward_model), "best_of", "needs --reward-model")


def parse_policies(specs: list[str]) -> dict[str, str]:
    return dict(spec.split("=", 1) for spec in specs)


def load_prompts(split: str, max_prompts: int) -> list[dict]:
    """Records of an InstruGo split (with constraints) or of a user JSONL file."""
    from instrugo.data import SPLITS, load_examples, load_split

    records = load_split(split) if split in SPLITS else load_examples(split)
    return records[:max_prompts] if max_prompts else records


def win_rate(scores: list[float | None], reference: list[float | None]) -> float | None:
    """Share of prompts where `scores` beats `reference`; ties count half. Prompts the gold judge cannot
    score (no constraints: a user's own prompts) are left out; None when none is left."""
    pairs = [(a, b) for a, b in zip(scores, reference) if a is not None and b is not None]
    if not pairs:
        return None
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)


def mean_term(rows: list[dict], key: str) -> float | None:
    """Mean of the gold score or one of its terms; None when no row has it (no judged prompt, or generations
    saved before the terms were kept)."""
    values = [r[key] for r in rows if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def summarize(rows: list[dict]) -> dict:
    """Aggregate judged generations of one policy on one split."""
    n = len(rows)
    judged = [r for r in rows if r["gold_score"] is not None]  # prompts with constraints
    by_kind: dict[str, list[bool]] = {}
    for row in rows:
        for constraint, passed in zip(row.get("constraints", []), row["constraint_results"]):
            by_kind.setdefault(constraint["kind"], []).append(passed)
    return {
        "n": n,
        "n_judged": len(judged),
        "constraint_pass_rate": sum(r["all_passed"] for r in judged) / len(judged) if judged else None,
        "gold_score": mean_term(judged, "gold_score"),
        **{term: mean_term(judged, term) for term in GOLD_TERMS},
        "mean_length_tokens": sum(r["n_tokens"] for r in rows) / n,
        "no_eos_rate": sum(not r["has_eos"] for r in rows) / n,
        "pass_rate_by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
    }


@torch.no_grad()
def response_kl(policy, reference, prompt_ids: list[list[int]], response_ids: list[list[int]],
                precision: str, batch_size: int) -> list[float]:
    """Σ over response tokens of KL(π ‖ π_ref) at each position, one number (nats) per response."""
    from instrugo.sft import collate, response_logits_width

    results: list[float] = []
    device = next(policy.parameters()).device
    for start in range(0, len(prompt_ids), batch_size):
        pairs = [(p + r, [0] * len(p) + [1] * len(r))
                 for p, r in zip(prompt_ids[start:start + batch_size], response_ids[start:start + batch_size])]
        batch = {k: v.to(device) for k, v in collate(pairs, 0, "left").items()}
        width = response_logits_width(batch["loss_mask"])
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                  "position_ids": batch["position_ids"], "logits_to_keep": width}
        with models.autocast(precision), models.inference_attention(policy, reference):
            logits = policy(**inputs).logits
            ref_logits = reference(**inputs).logits
        # Position t predicts token t+1: the distributions over response tokens sit one step earlier.
        mask = batch["loss_mask"][:, -width + 1:]
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        ref_logp = torch.log_softmax(ref_logits[:, :-1].float(), dim=-1)
        kl = (logp.exp() * (logp - ref_logp)).sum(-1)
        results.extend((kl * mask).sum(-1).tolist())
    return results


@torch.no_grad()
def pretrain_loss(model, tokenizer, texts: list[str], precision: str, batch_size: int, max_length: int = 256) -> float:
    """Mean token NLL of plain texts: the language-modelling ability PPO may tax."""
    from instrugo.sft import collate

    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        encoded = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_length] for t in texts[start:start + batch_size]]
        batch = {k: v.to(device) for k, v in collate([(ids, [1] * len(ids)) for ids in encoded], 0).items()}
        with models.autocast(precision), models.inference_attention(model):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        tokens = batch["loss_mask"][:, 1:].sum().item()
        total += losses.response_lm_loss(logits.float(), batch["input_ids"], batch["loss_mask"]).item() * tokens
        count += tokens
    return total / max(1, count)


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n ‖ π) = log n − (n−1)/n nats (Stiennon et al.; REFERENCE §6)."""
    return math.log(n) - (n - 1) / n


def best_of_n_rows(model, tokenizer, records: list[dict], rows_key: str, config: EvalConfig, precision: str,
                   reward) -> list[dict]:
    """Sample `best_of` responses per prompt at temperature 1; keep the one the reward model scores highest."""
    from instrugo.judge import gold_judge
    from instrugo.reward import score_texts

    reward_model, reward_tokenizer = reward
    n = config.best_of
    sampling = SamplingConfig(config.max_new_tokens, 1.0, 1.0, config.batch_size)
    with tqdm(total=len(records) * n, desc=f"eval bon_{n}", dynamic_ncols=True) as bar:
        groups = sample_responses(model, tokenizer, [r["messages"] for r in records], n=n, config=sampling,
                                  precision=precision, seed=config.seed + 1, progress=bar.update)
    # One call for every sample, so score_texts batches them by length across prompts.
    all_scores = score_texts(reward_model, reward_tokenizer, [r["messages"] for r in records for _ in range(n)],
                             [s.text for group in groups for s in group], precision)
    rows = []
    for index, (record, group) in enumerate(zip(records, groups)):
        scores = all_scores[index * n:(index + 1) * n]
        best = group[max(range(n), key=scores.__getitem__)]
        rows.append(judged_row(rows_key, record, best, gold_judge) | {"rm_score": max(scores)})
    return rows


def judged_row(key: str, record: dict, sample, gold_judge) -> dict:
    verdict = gold_judge(record, sample.text) if record.get("constraints") is not None else None
    return {
        "key": key, "id": record.get("id"), "prompt": record["prompt"], "response": sample.text,
        "response_ids": sample.token_ids, "n_tokens": len(sample.token_ids), "has_eos": sample.has_eos,
        "constraints": record.get("constraints", []),
        "constraint_results": verdict.constraint_results if verdict else [],
        "all_passed": verdict.all_passed if verdict else None,  # None: nothing to check
        "gold_score": verdict.score if verdict else None,
        **{term: getattr(verdict, term) if verdict else None for term in GOLD_TERMS},
        "reasons": verdict.reasons if verdict else [],
    }


def generation_key(model_path: str, split: str, config: EvalConfig) -> str:
    """Identifies a model's generations: its directory and weights (a retrained model at the same path gets
    new generations) and the sampling settings."""
    directory = models.resolve_model(model_path).resolve()
    weights = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in directory.glob("*.safetensors"))
    scorer = config.reward_model and models.resolve_model(config.reward_model).resolve()
    scorer_weights = scorer and sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in scorer.glob("*.safetensors"))
    settings = (str(directory), weights, split, config.max_prompts, config.max_new_tokens, config.temperature,
                config.seed, str(scorer), scorer_weights)
    return hashlib.sha1(json.dumps(settings).encode()).hexdigest()[:16]


def read_cached(path: Path, key: str) -> list[dict] | None:
    if not path.exists():
        return None
    rows = [row for _, row in iter_jsonl(path)]
    return rows if rows and all(r.get("key") == key for r in rows) else None


def generate_and_judge(model, tokenizer, records: list[dict], config: EvalConfig, precision: str,
                       key: str, desc: str) -> list[dict]:
    from instrugo.judge import gold_judge

    with tqdm(total=len(records), desc=desc, dynamic_ncols=True) as bar:
        samples = sample_responses(model, tokenizer, [r["messages"] for r in records], n=1,
                                   config=SamplingConfig(config.max_new_tokens, config.temperature, 1.0, config.batch_size),
                                   precision=precision, seed=config.seed, progress=bar.update)
    return [judged_row(key, record, sample, gold_judge) for record, (sample,) in zip(records, samples)]


def run_eval(config: EvalConfig) -> dict:
    """Evaluate every policy on every split; merge the results into OUT/eval.json and return it."""
    from instrugo.data import load_split
    from instrugo.reward import load_reward_model, score_texts

    started = time.perf_counter()
    out = Path(config.out)
    policies = parse_policies(config.policies)
    check_policies_exist(policies)
    precision = models.setup_compute(config.precision)
    splits = {split: load_prompts(split, config.max_prompts) for split in config.splits}
    pretrain_texts = []
    if config.pretrain_examples:
        pretrain_texts = [r["text"] for r in load_split("pretrain") if r.get("heldout")][:config.pretrain_examples]
    reward = load_reward_model(models.resolve_model(config.reward_model)) if config.reward_model else None
    # The reference goes first: every other policy's KL and win rate are measured against it.
    order = sorted(policies, key=lambda name: name != REFERENCE_POLICY)
    reference_model = None
    generations: dict[str, dict[str, list[dict]]] = {split: {} for split in splits}
    results: dict = {"splits": {split: {} for split in splits}, "policies": {}, "pretrain_loss": {}}
    print(f"eval: {', '.join(order)}{f' + bon_{config.best_of}' if config.best_of else ''} on "
          f"{', '.join(f'{s} ({len(r)} prompts)' for s, r in splits.items())}; "
          f"precision {models.describe_precision(precision)}")

    def record(name: str, split: str, rows: list[dict], kl_to_sft: float | None) -> None:
        generations[split][name] = rows
        summary = summarize(rows)
        if name != REFERENCE_POLICY and REFERENCE_POLICY in generations[split]:
            reference_scores = [r["gold_score"] for r in generations[split][REFERENCE_POLICY]]
            summary["win_rate_vs_sft"] = win_rate([r["gold_score"] for r in rows], reference_scores)
        if kl_to_sft is not None:
            summary["kl_to_sft"] = kl_to_sft
        if rows and "rm_score" in rows[0]:
            summary["rm_score"] = sum(r["rm_score"] for r in rows) / len(rows)
        results["splits"][split][name] = summary

    def cached(name: str, split: str, path: str, produce) -> list[dict]:
        cache = out / "generations" / split / f"{name}.jsonl"
        key = generation_key(path, split, config) + (f"-bon{config.best_of}" if name.startswith("bon_") else "")
        rows = read_cached(cache, key)
        if rows is None:
            rows = produce(key)
            if reward is not None and any("rm_score" not in r for r in rows):
                scores = score_texts(*reward, [r["prompt"] for r in rows], [r["response"] for r in rows], precision)
                rows = [r | {"rm_score": s} for r, s in zip(rows, scores)]
            atomic_write_jsonl(cache, rows)
        return rows

    for name in order:
        path = policies[name]
        tokenizer = models.load_tokenizer(path)
        model = models.load_causal_lm(path, tokenizer).eval()
        results["policies"][name] = {"path": str(path)}
        for split, records in splits.items():
            rows = cached(name, split, path, lambda key: generate_and_judge(
                model, tokenizer, records, config, precision, key, f"eval {name}/{split}"))
            kl = None
            if name not in NO_KL_POLICIES and reference_model is not None:
                prompt_ids = encode_prompts(tokenizer, [r["messages"] for r in records])
                per_response = response_kl(model, reference_model, prompt_ids, [r["response_ids"] for r in rows],
                                           precision, config.kl_batch_size)
                kl = sum(per_response) / len(per_response)
            record(name, split, rows, kl)
        if pretrain_texts:
            results["pretrain_loss"][name] = pretrain_loss(model, tokenizer, pretrain_texts, precision,
                                                           config.kl_batch_size)
        if name == REFERENCE_POLICY:
            reference_model = model
            if config.best_of:
                bon = f"bon_{config.best_of}"
                results["policies"][bon] = {"path": str(path), "best_of": config.best_of,
                                            "reward_model": config.reward_model}
                for split, records in splits.items():
                    rows = cached(bon, split, path, lambda key: best_of_n_rows(
                        model, tokenizer, records, key, config, precision, reward))
                    record(bon, split, rows, best_of_n_kl(config.best_of))
    results["seconds"] = {"eval": round(time.perf_counter() - started, 1)}
    merged = update_json(out / "eval.json", results)
    print_summary(results)
    print(f"eval: wrote {out / 'eval.json'}")
    return merged


def print_summary(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    for split, by_policy in results["splits"].items():
        table = Table(title=f"eval on {split}")
        for column in ("policy", "n", "pass rate", "gold score", "win vs sft", "KL to sft", "RM score", "length",
                       "pretrain loss"):
            table.add_column(column, justify="right")
        for name, s in by_policy.items():
            fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
            table.add_row(name, str(s["n"]), fmt(s["constraint_pass_rate"], ".3f"), fmt(s["gold_score"], ".3f"),
                          fmt(s.get("win_rate_vs_sft"), ".3f"), fmt(s.get("kl_to_sft"), ".2f"),
                          fmt(s.get("rm_score"), ".3f"),
                          fmt(s["mean_length_tokens"], ".1f"), fmt(results["pretrain_loss"].get(name), ".3f"))
        Console().print(table)


def check_policies_exist(policies: dict[str, str]) -> None:
    for name, path in policies.items():
        try:
            models.resolve_model(path)
        except InputError as e:
            raise InputError(e.path, f"policy '{name}': {e.message}") from None
