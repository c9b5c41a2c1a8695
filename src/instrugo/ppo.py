"""Step 3 of InstructGPT: PPO against the reward model, with a per-token KL penalty and PPO-ptx.

Each iteration (REFERENCE §3–§4):
1. rollout: sample one response per prompt from the policy (temperature 1), truncated after its first EOS
   (or `samples_per_prompt` of them, whose scores can then be measured against each other: `score_baseline`);
2. score: the reward model reads the prompt and response as *text* (its own tokenizer); a response with
   no EOS gets a fixed low score; the frozen SFT reference and the value network read the policy's
   tokens in one forward pass each; the policy's own log-probs are the sampler's (in fp32; under bf16 the
   policy reads the tokens again: `rollout_logprobs`);
3. rewards: per token −β·(log π − log π_ref), plus the RM score at the last response token; β fixed
   (InstructGPT: 0.02) or adaptive towards a target KL;
4. advantages: GAE with γ = 1 and λ, whitened over the batch (masked; under a multi-process launch, over
   each process's share of it);
5. update: `ppo_epochs` passes over shuffled minibatches: clipped policy loss and clipped value loss
   (token means over the minibatch, on a separate value network initialised from the reward model), and
   with PPO-ptx a pretraining-LM gradient γ_ptx·∇ log π(x) accumulated into the same step; micro-batches
   (gradient accumulation) group episodes of similar lengths, so they carry little padding;
6. optionally an EMA of the policy weights (InstructGPT: decay 0.992).

The first `value_warmup_iterations` update only the value network, with an unclipped loss. The reward
model it starts from was trained on scores at EOS only; read at every token, its values sit far from the
returns (bench/value_calibration.py on the demo's SFT policy: +0.29 to +0.49 against −0.37 to −0.70 in
two samplings), which makes every EOS look bad after whitening, and a clipped value loss corrects that
0.2 per update while the policy learns to ramble (docs/EXPERIMENTS.md, point 2).

    instrugo ppo --policy runs/sft --reward-model runs/rm --out runs/ppo [--ptx-coef 27.8]

Output: `out/` holds the policy (AutoModelForCausalLM), `out/value/` the value model
(AutoModelForSequenceClassification, one label), `out/ema/` the EMA policy when enabled, `metrics.jsonl`
one line per iteration, and `complete.json`. A killed run resumes at the last finished iteration.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from instrugo import losses, models, training
from instrugo.config import option, require, to_dict
from instrugo.generation import (DECODE_BATCH_SIZE, SamplingConfig, encode_prompts, pad_batch,
                                 positions_skipping_padding, sample_responses)
from instrugo.runio import InputError, MetricsLog, is_complete, mark_complete


@dataclass
class PPOConfig:
    """PPO / PPO-ptx. Batch sizes are in episodes (one prompt, one response): `episodes_per_batch` are
    generated per iteration, split into `minibatches` per PPO epoch (one optimiser step each), each
    processed in micro-batches of `micro_batch_size` (gradient accumulation)."""

    policy: str = option("runs/sft", "Initial policy (the SFT model).")
    reference: str = option("", "Frozen reference for the KL penalty (default: the initial policy).")
    reward_model: str = option("runs/rm", "Reward model directory (reads text; any tokenizer).")
    value_model: str = option("", "Value network init (default: the reward model; must share the policy's tokenizer).")
    lora_rank: int = option(0, "Train LoRA adapters (policy; value network plus its head) instead of all weights: "
                               "the reference is the policy with its adapter off, and the reward model the value "
                               "network with its adapter off when they start from the same model (0 = full).")
    lora_alpha: float = option(32.0, "LoRA α.")
    prompts: str = option("instrugo:ppo", "Prompts: an InstruGo split or a JSONL file.")
    out: str = option("runs/ppo", "Output directory.")
    total_episodes: int = option(1024, "Episodes in the whole run (InstructGPT: 256k).")
    episodes_per_batch: int = option(64, "Episodes generated per iteration (InstructGPT: 512).")
    samples_per_prompt: int = option(1, "Responses sampled for each prompt of an iteration (InstructGPT: 1); "
                                        "episodes_per_batch counts responses, so it covers episodes_per_batch / "
                                        "samples_per_prompt prompts.")
    score_baseline: str = option("none", "none, or 'others': subtract from each response's score the mean score of "
                                         "the other responses to its prompt (RLOO's leave-one-out baseline; needs "
                                         "samples_per_prompt >= 2), so advantages tell which response to a prompt "
                                         "was better, not which prompt was easier. A prompt whose responses all "
                                         "score alike (e.g. all cut off without EOS) is left no score signal: "
                                         "metrics.jsonl logs their share as tied_groups.")
    minibatches: int = option(4, "Optimiser steps per PPO epoch (InstructGPT: 512/64 = 8).")
    micro_batch_size: int = option(8, "Episodes per forward/backward pass.")
    ppo_epochs: int = option(1, "Passes over each batch (InstructGPT: 1; N+: 4).")
    lr: float = option(1e-5, "Policy learning rate (InstructGPT swept 2.55e-6..2.55e-5).")
    value_lr: float = option(1e-5, "Value network learning rate.")
    value_warmup_iterations: int = option(2, "First iterations that train only the value network, the policy "
                                             "frozen: values start from the reward model's scale, which is not "
                                             "the returns' (OpenRLHF: freezing_actor_steps).")
    warmup_iterations: int = option(10, "Linear warm-up from lr/10 over this many iterations, then constant.")
    adam_eps: float = option(1e-5, "Adam ε (1e-5: PyTorch's placement makes early updates aggressive).")
    max_grad_norm: float = option(1.0, "Gradient clipping (0 = off).")
    kl_coef: float = option(0.02, "β of the per-token KL penalty (InstructGPT: 0.02).")
    adaptive_kl: bool = option(False, "Adapt β towards kl_target (Ziegler et al.).")
    kl_target: float = option(6.0, "Target KL in nats per response for adaptive β.")
    kl_horizon: int = option(10000, "Horizon in episodes for adaptive β.")
    kl_estimator: str = option("k1", "Per-token KL estimator in the reward: k1 (log ratio) or k3.")
    kl_clamp: bool = option(False, "Clamp per-token KL at >= 0 (AlpacaFarm).")
    gamma: float = option(1.0, "Discount (InstructGPT: 1).")
    # λ = 1: the score reaches every token undiscounted. At 0.95 (N+) the first of ~70 tokens gets 0.95^69 ≈ 3%
    # of it and the rest from value differences, which an RM-initialised value network gets wrong for most of
    # a short run (measured once: docs/EXPERIMENTS.md, point 4, "GAE λ = 1").
    lam: float = option(1.0, "GAE λ (lm-human-preferences / N+: 0.95).")
    clip_range: float = option(0.2, "Policy ratio clip.")
    value_clip_range: float = option(0.2, "Value clip.")
    whiten_rewards: bool = option(False, "Whiten rewards before GAE (N+ final runs: off).")
    temperature: float = option(1.0, "Rollout sampling temperature (InstructGPT: 1).")
    max_new_tokens: int = option(96, "Response length limit in tokens.")
    no_eos_score: float = option(-1.0, "RM score given to responses without EOS (N details: -1).")
    ptx_coef: float = option(0.0, "PPO-ptx: pretraining gradient coefficient γ (InstructGPT: 27.8; 0 = plain PPO).")
    ptx_ratio: float = option(8.0, "Pretraining sequences per RL episode in each step (InstructGPT: 8).")
    ptx_max_length: int = option(128, "Token limit of each pretraining sequence.")
    ema_decay: float = option(0.0, "EMA of policy weights (InstructGPT: 0.992; 0 = off).")
    gold_judge: bool = option(True, "Log the gold judge's score of each rollout (when prompts have constraints).")
    reward: str = option("model", "What scores the rollouts: the reward model, or 'gold': the gold judge, an oracle "
                                  "reward that tells the reward model's error from PPO's (prompts need constraints).")
    rollout_batch_size: int = option(DECODE_BATCH_SIZE, "Sequences generated together.")
    rollout_logprobs: str = option("auto", "Where log π_old of the rollout comes from: 'sampler' keeps what the sampler "
                                           "computed while drawing (one policy forward pass fewer per iteration), "
                                           "'recompute' runs the policy over the rollout again; auto: the sampler in "
                                           "fp32, where the two agree to ~1e-4; recompute under bf16, where the "
                                           "sampler's pass (bf16 KV cache, fused attention) and the training pass "
                                           "round differently (~0.03 apart per token, up to ~0.17), so the KL starts "
                                           "at exactly 0.")
    precision: str = option("auto", "auto (probe bf16 speed), bf16 or fp32.")
    compile: bool = option(False, training.COMPILE_HELP)
    save_every: int = option(5, "Checkpoint every N iterations (a kill loses the iterations since the last one). The default model's "
                                "checkpoint (policy, value network, their optimisers) is ~3 GB: ~10 s per save "
                                "against ~55 s per demo iteration on the reference CPU.")
    seed: int = option(0, "Seed (per process: seed + rank·100003).")

    presets: ClassVar[dict[str, dict]] = {
        "tiny": dict(total_episodes=32, episodes_per_batch=16, minibatches=2, micro_batch_size=8,
                     max_new_tokens=24, lr=1e-4, value_lr=1e-4, warmup_iterations=0, value_warmup_iterations=0,
                     ptx_ratio=1.0, save_every=1),
    }

    def validate(self) -> None:
        for name in ("total_episodes", "episodes_per_batch", "minibatches", "micro_batch_size", "ppo_epochs",
                     "max_new_tokens", "rollout_batch_size", "save_every"):
            require(getattr(self, name) > 0, name, "must be positive")
        per_minibatch = self.episodes_per_batch / max(1, self.minibatches)
        require(self.episodes_per_batch % self.minibatches == 0, "minibatches",
                f"must divide episodes_per_batch ({self.episodes_per_batch})")
        require(per_minibatch % self.micro_batch_size == 0 or self.micro_batch_size >= per_minibatch,
                "micro_batch_size", f"must divide the minibatch size ({per_minibatch:g} episodes)")
        require(self.kl_estimator in ("k1", "k3"), "kl_estimator", "must be k1 or k3")
        require(self.samples_per_prompt > 0 and self.episodes_per_batch % self.samples_per_prompt == 0,
                "samples_per_prompt", f"must be positive and divide episodes_per_batch ({self.episodes_per_batch})")
        require(self.score_baseline in ("none", "others"), "score_baseline", "must be none or others")
        require(self.score_baseline == "none" or self.samples_per_prompt >= 2, "score_baseline",
                "'others' needs samples_per_prompt >= 2")
        require(self.reward in ("model", "gold"), "reward", "must be model or gold")
        require(self.rollout_logprobs in ("auto", "sampler", "recompute"), "rollout_logprobs",
                "must be auto, sampler or recompute")
        require(self.total_episodes >= self.episodes_per_batch, "total_episodes", "must be >= episodes_per_batch")
        require(0 <= self.value_warmup_iterations < self.total_episodes // self.episodes_per_batch,
                "value_warmup_iterations", "must be >= 0 and leave at least one iteration that trains the policy")
        require(self.temperature > 0, "temperature", "must be positive for PPO rollouts")
        require(0 <= self.ema_decay < 1, "ema_decay", "must be in [0, 1)")


# ------------------------------------------------------------------------- rollout tensors and models

@dataclass
class Rollout:
    """One iteration's episodes, response-aligned: row b, column t is response token t of episode b."""

    query: torch.Tensor           # [B, P] left-padded prompt tokens
    query_mask: torch.Tensor      # [B, P]
    response: torch.Tensor        # [B, R] right-padded response tokens (pad after EOS)
    response_mask: torch.Tensor   # [B, R] float, 1 on response tokens (EOS included)
    scores: torch.Tensor          # [B] RM score (no-EOS penalty applied)
    logprobs: torch.Tensor | None = None      # [B, R] log π_old(y_t) at the sampling temperature
    ref_logprobs: torch.Tensor | None = None  # [B, R]
    values: torch.Tensor | None = None        # [B, R] V(s_t) before emitting y_t
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def select(self, index: torch.Tensor) -> "Rollout":
        """The episodes at `index`, without the columns that are padding in all of them (left of their
        longest prompt, right of their longest response): a micro-batch pays only for its own lengths.
        Padding is masked out of every pass and loss, so the cut changes no number but the cost."""
        rows = {k: (v[index] if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        first_column = int(rows["query_mask"].any(0).nonzero()[0]) if rows["query_mask"].any() else 0
        width = int(rows["response_mask"].any(0).nonzero()[-1]) + 1 if rows["response_mask"].any() else 1
        for key, value in rows.items():
            if key in ("query", "query_mask"):
                rows[key] = value[:, first_column:]
            elif isinstance(value, torch.Tensor) and value.dim() == 2:
                rows[key] = value[:, :width]
        return Rollout(**rows)


def by_response_length(rollout: Rollout, index: torch.Tensor) -> torch.Tensor:
    """`index` reordered by response length (stable), so consecutive micro-batches pad little."""
    return index[torch.argsort(rollout.response_mask[index].sum(1), stable=True)]


def reuses_sampler_logprobs(rollout_logprobs: str, precision: str) -> bool:
    """Whether log π_old comes from the sampler (`PPOConfig.rollout_logprobs`; auto: in fp32)."""
    return rollout_logprobs == "sampler" or (rollout_logprobs == "auto" and precision == "fp32")


def sequence_inputs(query: torch.Tensor, query_mask: torch.Tensor, response: torch.Tensor,
                    response_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """[left-padded prompt | right-padded response] with position ids that skip the left padding."""
    input_ids = torch.cat([query, response], dim=1)
    attention_mask = torch.cat([query_mask, (response_mask > 0).long()], dim=1)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": positions_skipping_padding(attention_mask)}


def policy_logprobs(model, inputs: dict[str, torch.Tensor], response: torch.Tensor, temperature: float,
                    with_entropy: bool = False):
    """log π(y_t) of the response tokens, from logits divided by the sampling temperature (N details),
    and with `with_entropy` the response positions' logits as the model gave them (before the division).
    Only those positions' logits are computed (`logits_to_keep`), and they stay in the model's dtype:
    `token_logprobs` casts and divides one row at a time instead of making two batch x width x vocabulary
    fp32 tensors (~150 MB each at 8 x 96 tokens)."""
    width = response.shape[1]
    logits = model(**inputs, logits_to_keep=width + 1, use_cache=False).logits[:, :-1]
    logprobs = losses.token_logprobs(logits, response, temperature)
    return (logprobs, logits) if with_entropy else logprobs


def adapter_off(model, shared: bool):
    """A frozen model that is a trained LoRA model with its adapter switched off (or itself when not shared)."""
    return model.disable_adapter() if shared else contextlib.nullcontext()


class TokenValueModel(torch.nn.Module):
    """A sequence-classification model (the reward model) read at every position: V(s_t) per token.

    Wrapping it as one module keeps the forward pass inside the (possibly distributed) module, and the
    inner model saves as a plain AutoModelForSequenceClassification."""

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, input_ids, attention_mask, position_ids, response_width: int) -> torch.Tensor:
        # Under LoRA the classifier is a peft wrapper; its model holds the (adapted) backbone and head.
        model = self.classifier.get_base_model() if hasattr(self.classifier, "get_base_model") else self.classifier
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids, use_cache=False).last_hidden_state
        states = hidden[:, -(response_width + 1):-1]  # the state before each response token
        # Start from the reward model's normalised scale: its bias makes demonstrations score 0.
        bias = float(getattr(model.config, "reward_bias", 0.0))
        return model.score(states).squeeze(-1).float() + bias


class EMA:
    """Exponential moving average of the policy's weights (InstructGPT: decay 0.992)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for key, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                self.shadow[key].mul_(self.decay).add_(value.detach().float(), alpha=1 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.shadow = state["decay"], state["shadow"]


def response_tensors(samples, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled responses as right-padded token ids [B, R] and a float mask of their tokens (EOS included)."""
    response, mask = pad_batch([s.token_ids for s in samples], pad_id, "right")
    return response, mask.float()


def sampler_logprobs(samples, width: int) -> torch.Tensor:
    """The sampler's log-probs of the responses' tokens, right-padded with 0 to [B, width]."""
    logprobs = torch.zeros(len(samples), width)
    for row, sample in enumerate(samples):
        if sample.logprobs is None or len(sample.logprobs) != len(sample.token_ids):
            raise ValueError(f"sample {row} has {'no' if sample.logprobs is None else len(sample.logprobs)} log-probs "
                             f"for {len(sample.token_ids)} tokens; use rollout_logprobs='recompute'")
        logprobs[row, :len(sample.logprobs)] = torch.tensor(sample.logprobs)
    return logprobs


def ptx_batches(texts: list[str], tokenizer, size: int, max_length: int, seed: int):
    """Endless shuffled micro-batches of pretraining text for the ptx term. Each text ends with EOS: a
    document's end is part of its likelihood, and texts without one teach the policy never to stop."""
    from instrugo.sft import collate

    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_length - 1] + [tokenizer.eos_token_id]
               for t in texts]
    encoded = [e for e in encoded if len(e) > 1]
    rng = random.Random(seed)
    while True:
        order = list(range(len(encoded)))
        rng.shuffle(order)
        for start in range(0, len(order) - size + 1, size):
            yield collate([(encoded[i], [1] * len(encoded[i])) for i in order[start:start + size]], tokenizer.pad_token_id)


# ----------------------------------------------------------------------------------------- the loop

def run_ppo(config: PPOConfig) -> Path:
    """Train the policy with PPO (PPO-ptx when ptx_coef > 0); returns the output directory."""
    from instrugo.data import load_examples, load_split
    from instrugo.judge import gold_judge
    from instrugo.reward import load_reward_model, score_texts

    out = Path(config.out)
    if is_complete(out):
        print(f"ppo: {out} is complete; nothing to do")
        return out
    precision = training.agreed_precision(config.precision)
    accelerator = training.make_accelerator(precision)
    reuse_logprobs = reuses_sampler_logprobs(config.rollout_logprobs, precision)
    world, rank = accelerator.num_processes, accelerator.process_index
    require(config.episodes_per_batch % (world * config.minibatches) == 0, "episodes_per_batch",
            f"must split evenly into {world} processes x {config.minibatches} minibatches")
    # A prompt's responses stay on one process: the leave-one-out baseline reads them together.
    require(config.episodes_per_batch % (world * config.samples_per_prompt) == 0, "episodes_per_batch",
            f"must split evenly into {world} processes x groups of {config.samples_per_prompt} responses")
    training.seed_everything(config.seed, rank)

    # Four models: the policy and the value network train; the reference and the reward model are frozen.
    # With LoRA, the frozen two are the trained two with their adapters switched off: half the weights.
    tokenizer = models.load_tokenizer(config.policy)
    records = load_examples(config.prompts)
    if config.reward == "gold":
        unjudged = next((i for i, r in enumerate(records) if r.get("constraints") is None), None)
        if unjudged is not None:
            raise InputError(config.prompts, "--reward gold needs constraints on every prompt", unjudged + 1, "constraints")
    # Decided once for the prompt set, so that every process logs (and gathers) the same columns.
    judge_rollouts = config.reward == "gold" or (config.gold_judge and all(r.get("constraints") is not None
                                                                            for r in records))
    prompt_ids = encode_prompts(tokenizer, [r["messages"] for r in records])
    # The longest sequence the four models will read picks their attention kernel (models.py).
    longest = max(len(ids) for ids in prompt_ids) + config.max_new_tokens
    policy = models.load_causal_lm(config.policy, tokenizer, max_tokens=longest)
    value_path = models.resolve_model(config.value_model or config.reward_model)
    if models.load_tokenizer(value_path).get_vocab() != tokenizer.get_vocab():
        raise InputError(value_path, "the value model must share the policy's tokenizer (it scores every policy "
                         "token); pass --value-model with a model of the policy's family", field="value_model")
    value_classifier = models.load_scalar_model(value_path, tokenizer, max_tokens=longest)
    if config.lora_rank:
        policy = models.apply_lora(policy, config.lora_rank, config.lora_alpha)
        value_classifier = models.apply_lora(value_classifier, config.lora_rank, config.lora_alpha, full_modules=["score"])
    share_reference = bool(config.lora_rank) and not config.reference
    reference = (policy if share_reference else
                 models.load_causal_lm(config.reference or config.policy, tokenizer, max_tokens=longest))
    if config.reward == "gold":
        reward_model = reward_tokenizer = None  # the reward model only initialises the value network
    elif config.lora_rank and value_path == models.resolve_model(config.reward_model):
        reward_model, reward_tokenizer = value_classifier, tokenizer
    else:
        reward_model, reward_tokenizer = load_reward_model(models.resolve_model(config.reward_model))
    if reward_model is not None and reward_model is not value_classifier:
        reward_model.eval().requires_grad_(False).to(accelerator.device)
    if reference is not policy:
        reference.eval().requires_grad_(False).to(accelerator.device)
    for model in {id(m): m for m in (policy, value_classifier, reference, reward_model) if m is not None}.values():
        models.frozen_linears_to_bf16(model, precision)  # the frozen ones and LoRA bases
    value = TokenValueModel(value_classifier)

    iterations = config.total_episodes // config.episodes_per_batch
    policy_optimizer = training.adamw(policy.parameters(), config.lr, (0.9, 0.95), config.adam_eps)
    value_optimizer = training.adamw(value.parameters(), config.value_lr, (0.9, 0.95), config.adam_eps)
    warmup = lambda step: min(1.0, 0.1 + 0.9 * step / config.warmup_iterations) if config.warmup_iterations else 1.0  # noqa: E731
    steps_per_iteration = config.ppo_epochs * config.minibatches
    policy_schedule = torch.optim.lr_scheduler.LambdaLR(policy_optimizer, lambda s: warmup(s // steps_per_iteration))
    value_schedule = torch.optim.lr_scheduler.LambdaLR(value_optimizer, lambda s: warmup(s // steps_per_iteration))
    policy, value, policy_optimizer, value_optimizer, policy_schedule, value_schedule = accelerator.prepare(
        policy, value, policy_optimizer, value_optimizer, policy_schedule, value_schedule)
    kl_control = (losses.AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
                  if config.adaptive_kl else losses.FixedKLController(config.kl_coef))
    ema = EMA(accelerator.unwrap_model(policy), config.ema_decay) if config.ema_decay else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    ptx_stream = None
    if config.ptx_coef:
        texts = [r["text"] for r in load_split("pretrain") if not r.get("heldout")]
        ptx_stream = ptx_batches(texts, tokenizer, max(1, round(config.micro_batch_size * config.ptx_ratio)),
                                 config.ptx_max_length, config.seed + rank)

    training.record_settings(out, "ppo", to_dict(config), accelerator.is_main_process)
    state = training.load_checkpoint(accelerator, out) or {"iteration": 0, "kl_coef": config.kl_coef}
    start = state["iteration"]
    kl_control.value = state["kl_coef"]
    if accelerator.is_main_process:
        minibatch = config.episodes_per_batch // config.minibatches
        print(f"ppo: {iterations} iterations x {config.episodes_per_batch} episodes = {iterations * config.episodes_per_batch} "
              f"episodes"
              + (f" ({config.episodes_per_batch // config.samples_per_prompt} prompts x {config.samples_per_prompt} responses "
                 f"per iteration, scores {'less the mean of the other responses' if config.score_baseline == 'others' else 'as they are'})"
                 if config.samples_per_prompt > 1 else "")
              + f"; each iteration {config.ppo_epochs} epoch(s) x {config.minibatches} minibatches of {minibatch} "
              f"episodes (micro-batches of {config.micro_batch_size} -> {max(1, minibatch // config.micro_batch_size)} "
              f"accumulation steps per optimiser step), "
              f"{(iterations - config.value_warmup_iterations) * steps_per_iteration} policy optimiser steps"
              + (f" after {config.value_warmup_iterations} iteration(s) that train only the value network"
                 if config.value_warmup_iterations else "") + "; "
              f"β={config.kl_coef} ({'adaptive' if config.adaptive_kl else 'fixed'}), "
              f"ptx γ={config.ptx_coef}" + (f" with {config.ptx_ratio:g} pretraining sequences per episode" if config.ptx_coef else "")
              + f"; {world} processes; precision {models.describe_precision(precision)}"
              + f"; rollout log-probs {'from the sampler' if reuse_logprobs else 'recomputed'}"
              + models.describe_compile(config.compile)
              + (f"; resuming at iteration {start}" if start else ""))
    metrics = MetricsLog(out / "metrics.jsonl", resume_step=start or None, enabled=accelerator.is_main_process)
    # No nucleus cut: PPO's log-probs are the full softmax's, so truncated rollouts would be off-policy.
    sampling = SamplingConfig(config.max_new_tokens, config.temperature, 1.0, config.rollout_batch_size)

    bar = tqdm(total=iterations, initial=start, desc="ppo", disable=not accelerator.is_main_process, dynamic_ncols=True)
    for iteration in range(start, iterations):
        timings: dict[str, float] = {}
        clock = time.perf_counter()
        # Prompts of this iteration: a deterministic slice per process, cycling through the prompt set.
        # Each prompt's samples_per_prompt episodes are neighbours (the baseline's groups).
        per_process = config.episodes_per_batch // world
        prompts_per_process = per_process // config.samples_per_prompt
        first = (iteration * world + rank) * prompts_per_process % len(records)
        prompt_indices = [(first + i) % len(records) for i in range(prompts_per_process)]
        batch_indices = [i for i in prompt_indices for _ in range(config.samples_per_prompt)]
        batch_records = [records[i] for i in batch_indices]

        # 1. rollout
        unwrapped_policy = accelerator.unwrap_model(policy)
        samples = [s for group in sample_responses(unwrapped_policy, tokenizer, [records[i]["messages"] for i in prompt_indices],
                                                   n=config.samples_per_prompt, config=sampling, precision=precision,
                                                   seed=config.seed * 1000 + iteration * world + rank)
                   for s in group]
        timings["generate"] = time.perf_counter() - clock
        clock = time.perf_counter()

        # 2. score: RM (or the gold judge) on text; policy, reference and value on the policy's tokens
        verdicts = None
        if judge_rollouts:
            verdicts = [gold_judge(r, s.text) for r, s in zip(batch_records, samples)]
        query, query_mask = pad_batch([prompt_ids[i] for i in batch_indices], tokenizer.pad_token_id)
        response, response_mask = response_tensors(samples, tokenizer.pad_token_id)
        device = accelerator.device
        query, query_mask, response, response_mask = (t.to(device) for t in (query, query_mask, response, response_mask))
        with torch.no_grad(), accelerator.autocast():
            if config.reward == "gold":
                raw_scores = torch.tensor([v.score for v in verdicts], device=device)
            else:
                with adapter_off(reward_model, reward_model is value_classifier):
                    raw_scores = torch.tensor(score_texts(
                        reward_model, reward_tokenizer, [r["messages"] for r in batch_records], [s.text for s in samples],
                        precision, batch_size=config.micro_batch_size), device=device)
            has_eos = torch.tensor([s.has_eos for s in samples], device=device)
            scores = losses.no_eos_penalty(raw_scores, has_eos, config.no_eos_score)
            rollout = Rollout(query, query_mask, response, response_mask,
                              losses.leave_one_out_baseline(scores, config.samples_per_prompt)
                              if config.score_baseline == "others" else scores)
            rollout.ref_logprobs, rollout.values = torch.zeros_like(response_mask), torch.zeros_like(response_mask)
            rollout.logprobs = (sampler_logprobs(samples, response.shape[1]).to(device) if reuse_logprobs
                                else torch.zeros_like(response_mask))
            # Micro-batches of similar response lengths, each cut to its own width (`select`).
            episodes = by_response_length(rollout, torch.arange(per_process, device=device))
            for micro_index in episodes.split(config.micro_batch_size):
                micro = rollout.select(micro_index)
                inputs = sequence_inputs(micro.query, micro.query_mask, micro.response, micro.response_mask)
                width = micro.response.shape[1]
                if not reuse_logprobs:
                    rollout.logprobs[micro_index, :width] = policy_logprobs(policy, inputs, micro.response, config.temperature)
                with adapter_off(reference, share_reference):
                    rollout.ref_logprobs[micro_index, :width] = policy_logprobs(reference, inputs, micro.response, config.temperature)
                rollout.values[micro_index, :width] = value(**inputs, response_width=width)
        timings["score"] = time.perf_counter() - clock
        clock = time.perf_counter()

        # 3-4. KL-shaped rewards and GAE advantages
        rewards, kl = losses.kl_penalized_rewards(rollout.scores, rollout.logprobs, rollout.ref_logprobs,
                                                  response_mask, kl_control.value, config.kl_estimator, config.kl_clamp)
        if config.whiten_rewards:
            rewards = losses.masked_whiten(rewards, response_mask, shift_mean=False)
        advantages, returns = losses.gae_advantages(rewards, rollout.values, response_mask, config.gamma, config.lam)
        rollout.advantages = losses.masked_whiten(advantages, response_mask)
        rollout.returns = returns

        # 5. PPO epochs over minibatches; micro-batches accumulate into one optimiser step
        train_policy = iteration >= config.value_warmup_iterations
        stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "clipfrac", "approx_kl",
                                                        "value_clipfrac", "entropy", "ptx_loss",
                                                        "policy_grad_norm", "value_grad_norm")}
        minibatch_size = per_process // config.minibatches
        policy.train(), value.train()
        for _ in range(config.ppo_epochs):
            permutation = torch.randperm(per_process, device=device)
            for m in range(config.minibatches):
                # The minibatch's losses are token means over all of it, so how its episodes are grouped
                # into micro-batches changes no gradient: group them by length, to cut padding.
                minibatch = by_response_length(rollout, permutation[m * minibatch_size:(m + 1) * minibatch_size])
                # Summed over the processes: their gradients are averaged, hence the factor world below.
                minibatch_tokens = accelerator.reduce(rollout.response_mask[minibatch].sum(), "sum")
                micro_indices = minibatch.split(config.micro_batch_size)
                for index, micro_index in enumerate(micro_indices):
                    micro = rollout.select(micro_index)
                    token_share = world * micro.response_mask.sum() / minibatch_tokens
                    episode_share = len(micro_index) / len(minibatch)
                    last = index == len(micro_indices) - 1
                    sync = contextlib.nullcontext() if last else contextlib.ExitStack()
                    if not last:
                        sync.enter_context(accelerator.no_sync(policy))
                        sync.enter_context(accelerator.no_sync(value))
                    with (sync, accelerator.autocast(), models.compiled_layers(policy, config.compile),
                          models.compiled_layers(value, config.compile)):
                        inputs = sequence_inputs(micro.query, micro.query_mask, micro.response, micro.response_mask)
                        latest = {}  # this micro-batch's losses, checked for NaN/inf below
                        if train_policy:
                            new_logprobs, logits = policy_logprobs(policy, inputs, micro.response, config.temperature, True)
                            policy_loss, policy_stats = losses.ppo_policy_loss(new_logprobs, micro.logprobs,
                                                                              micro.advantages, micro.response_mask,
                                                                              config.clip_range)
                            # Two backward passes: the policy's activations are freed before the value network's exist.
                            accelerator.backward(policy_loss * token_share)
                            latest["policy"] = policy_loss.item()
                            stats["policy_loss"].append(latest["policy"])
                            stats["clipfrac"].append(float(policy_stats["clipfrac"]))
                            stats["approx_kl"].append(float(policy_stats["approx_kl"]))
                            with torch.no_grad():
                                stats["entropy"].append(float(losses.entropy_from_logits(logits.detach(), micro.response_mask,
                                                                                    config.temperature)))
                            if ptx_stream is not None:
                                # PPO-ptx: the pretraining gradient accumulates into the same step (InstructGPT),
                                # in chunks of micro_batch_size sequences to bound the activations' memory.
                                ptx = {k: v.to(device) for k, v in next(ptx_stream).items()}
                                for chunk in range(0, len(ptx["input_ids"]), config.micro_batch_size):
                                    part = {k: v[chunk:chunk + config.micro_batch_size] for k, v in ptx.items()}
                                    ptx_loss = training.language_model_loss(
                                        policy, part["input_ids"], part["loss_mask"],
                                        input_ids=part["input_ids"], attention_mask=part["attention_mask"])
                                    chunk_share = len(part["input_ids"]) / len(ptx["input_ids"])
                                    accelerator.backward(config.ptx_coef * ptx_loss * episode_share * chunk_share)
                                    stats["ptx_loss"].append(ptx_loss.item())
                        new_values = value(**inputs, response_width=micro.response.shape[1])
                        # Warm-up lets the values travel to the returns' scale: clipping would hold them near the start.
                        value_loss, value_clipfrac = losses.ppo_value_loss(
                            new_values, micro.values, micro.returns, micro.response_mask,
                            config.value_clip_range if train_policy else None)
                        accelerator.backward(value_loss * token_share)
                    latest["value"] = value_loss.item()
                    stats["value_loss"].append(latest["value"])
                    stats["value_clipfrac"].append(value_clipfrac)
                    finite = all(math.isfinite(loss) for loss in latest.values())
                    if world > 1:  # all processes stop together, none left waiting in a collective
                        finite = accelerator.reduce(torch.tensor(float(finite), device=device), "sum").item() == world
                    if not finite:
                        raise SystemExit(f"ppo: non-finite loss at iteration {iteration + 1} ("
                                         + ", ".join(f"{name} {loss}" for name, loss in latest.items())
                                         + f"); the last checkpoint in {out}, if any (every --save-every iterations), is intact. "
                                         "Lower --lr or raise --kl-coef.")
                trained = (("policy", policy, policy_optimizer, policy_schedule),) if train_policy else ()
                for name, model, optimizer, schedule in trained + (("value", value, value_optimizer, value_schedule),):
                    if config.max_grad_norm:  # logged before clipping, to compare with max_grad_norm
                        stats[f"{name}_grad_norm"].append(
                            float(accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)))
                    optimizer.step()
                    schedule.step()
                    optimizer.zero_grad(set_to_none=True)
                if ema is not None and train_policy:
                    ema.update(accelerator.unwrap_model(policy))
        timings["train"] = time.perf_counter() - clock

        # Logging: what the run optimises (RM score), what it pays (KL), and the gold truth when known
        # (with --reward gold, the gold score is what it optimises); means over all processes' episodes.
        def batch_mean(per_episode: torch.Tensor) -> float:
            return accelerator.gather(per_episode.float().to(device)).mean().item()

        mean_kl = batch_mean((kl * response_mask).sum(-1))
        logged = [k for k, v in stats.items() if v]  # the same keys on every process: one collective for all
        stat_means = dict(zip(logged, accelerator.reduce(
            torch.tensor([sum(stats[k]) / len(stats[k]) for k in logged], device=device), "mean").tolist()))
        kl_control.update(mean_kl, config.episodes_per_batch)
        row = {"step": iteration + 1, "episodes": (iteration + 1) * config.episodes_per_batch,
               **({} if config.reward == "gold" else {"rm_score": batch_mean(raw_scores)}),
               "score_with_penalty": batch_mean(scores),
               "kl": mean_kl, "sqrt_kl": math.sqrt(max(0.0, mean_kl)),
               "kl_coef": kl_control.value, "no_eos_rate": 1 - batch_mean(has_eos),
               "response_length": batch_mean(response_mask.sum(-1)),
               "lr": policy_schedule.get_last_lr()[0],
               **stat_means,
               **{f"seconds_{k}": round(v, 3) for k, v in timings.items()}}
        if config.score_baseline == "others":
            groups = scores.view(-1, config.samples_per_prompt)
            row["tied_groups"] = batch_mean(groups.amax(dim=1) - groups.amin(dim=1) < 1e-6)
        if verdicts is not None:
            row["gold_score"] = batch_mean(torch.tensor([v.score for v in verdicts]))
            row["gold_pass_rate"] = batch_mean(torch.tensor([v.all_passed for v in verdicts]))
        metrics.log(row)
        bar.set_postfix(rm=f"{row.get('rm_score', float('nan')):.3f}", kl=f"{mean_kl:.2f}", gold=f"{row.get('gold_score', float('nan')):.3f}")
        bar.update(1)
        state = {"iteration": iteration + 1, "kl_coef": kl_control.value}
        if (iteration + 1) % config.save_every == 0 and iteration + 1 < iterations:
            training.save_checkpoint(accelerator, out, state)
    bar.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final_policy = accelerator.unwrap_model(policy)
        if ema is not None:  # before the policy is saved: saving merges (and so removes) a LoRA adapter
            ema_policy = copy.deepcopy(final_policy)
            ema_policy.load_state_dict(ema.shadow)
            training.save_pretrained_files(ema_policy, tokenizer, out / "ema")
        training.save_pretrained_files(final_policy, tokenizer, out)
        training.save_pretrained_files(accelerator.unwrap_model(value).classifier, tokenizer, out / "value")
        mark_complete(out, {"stage": "ppo", "iterations": iterations, "episodes": iterations * config.episodes_per_batch,
                            "ptx_coef": config.ptx_coef, "ema": bool(ema), "processes": world})
        training.remove_checkpoint(out)
        print(f"ppo: policy written to {out}" + (f" (EMA weights in {out / 'ema'})" if ema else ""))
    return out
