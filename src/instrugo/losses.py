"""The RLHF math as pure tensor functions: SFT loss, K-way ranking loss, KL-shaped rewards, GAE, PPO.

Nothing here knows about models, files or configs, so every formula can be checked against numbers
worked out by hand (tests/test_losses.py). Conventions:

- tensors are batch-first: [B] per sequence, [B, T] per token, [B, T, V] logits;
- `mask` is 1.0 (or True) on the response tokens that count and 0 on prompt and padding positions;
- references are to /work/shared/REFERENCE.md: InstructGPT (Ouyang et al. 2022), lm-human-preferences
  (Ziegler et al. 2019), the N implementation details of RLHF with PPO (Huang et al. 2023/2024, "N+"),
  and AlpacaFarm (Dubois et al. 2023).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

WHITEN_EPS = 1e-8


# ---------------------------------------------------------------------------------------------------
# Masked statistics


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ x·mask / Σ mask, over all elements (dim=None) or along `dim`.

    An all-zero mask gives 0 rather than NaN (the count is clamped at 1), so an empty row cannot poison
    a batch statistic.
    """
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Variance of the masked elements: mean((x − mean)²), times n/(n−1) when `unbiased`.

    The default is the biased (population) variance, as N+ uses when whitening advantages.
    """
    mean = masked_mean(x, mask)
    variance = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.to(x.dtype).sum()
        variance = variance * n / (n - 1).clamp(min=1)
    return variance


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x − mean) / sqrt(var + 1e-8) over the masked elements, with the biased variance (N+).

    With `shift_mean=False` the mean is added back, which only rescales: used for reward whitening,
    where removing the mean would change which responses are rewarded at all. Positions outside the
    mask come out 0, so padding never carries an advantage.
    """
    mean, variance = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(variance + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(x.dtype)


# ---------------------------------------------------------------------------------------------------
# Language-model log-probabilities and losses


def rows_at_temperature(logits: torch.Tensor, temperature: float):
    """Each batch row of `logits` [B, T, V] as fp32 logits / temperature, one row at a time: without
    autograd at most one row's fp32 copy of the vocabulary dimension exists besides the input (with
    autograd each row's copy is kept for the backward pass), instead of a whole [B, T, V] fp32 batch.
    Dividing by the sampling temperature gives the distribution the tokens were sampled from (N details)."""
    for row_logits in logits:
        row_logits = row_logits.float()
        yield row_logits / temperature if temperature != 1.0 else row_logits


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[token] for each position: [B, T, V], [B, T] → [B, T] (fp32).

    Computed as logit[token] − logsumexp(logits) over `rows_at_temperature`, not as a full [B, T, V]
    log-softmax; bf16 logits (autocast's) are cast row by row.
    """
    rows = []
    for row_logits, row_tokens in zip(rows_at_temperature(logits, temperature), tokens):
        picked = row_logits.gather(-1, row_tokens.unsqueeze(-1)).squeeze(-1)
        rows.append(picked - torch.logsumexp(row_logits, dim=-1))
    return torch.stack(rows)


def response_lm_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the masked (response) tokens of the whole batch.

    `loss_mask` is aligned with `labels` (1 on response tokens). Position t predicts token t+1, so
    logits[:, :-1] are scored against labels[:, 1:] under loss_mask[:, 1:]; prompt and padding tokens
    contribute nothing (InstructGPT SFT: loss on response tokens only). Every response token of the
    batch weighs the same, whatever the length of its row.
    """
    mask = loss_mask[:, 1:]
    nll = -token_logprobs(logits[:, :-1], labels[:, 1:])
    return masked_mean(nll, mask)


def chunked_response_nll(hidden: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor, loss_mask: torch.Tensor,
                         chunk_tokens: int = 256) -> torch.Tensor:
    """`response_lm_loss` from the final hidden states [B, T, H] and the LM head, for a 0/1 `loss_mask`:
    the head runs on the scored positions only, `chunk_tokens` at a time, and each chunk's logits are
    recomputed in the backward pass (activation checkpointing) instead of kept, so no [tokens, vocabulary]
    tensor over the whole batch exists. With the default model's 49k-token vocabulary a micro-batch of 8
    responses of 150 tokens would otherwise hold ~236 MB of fp32 logits, plus their gradient and the
    log-softmax's own (TRL's SFTTrainer does the same by default: loss_type 'chunked_nll')."""
    scored = loss_mask[:, 1:] > 0
    states, targets = hidden[:, :-1][scored], labels[:, 1:][scored]
    total = hidden.new_zeros((), dtype=torch.float32)
    # At least one chunk, empty if need be: a loss with no scored token still reaches the head's weight, so its
    # backward pass runs (and a distributed one finds every gradient).
    for start in range(0, max(1, len(targets)), chunk_tokens):
        total = total + torch.utils.checkpoint.checkpoint(
            _nll_sum, states[start:start + chunk_tokens], head.weight, head.bias, targets[start:start + chunk_tokens],
            use_reentrant=False)
    return total / max(1, len(targets))


def _nll_sum(states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(states, weight, bias).float()
    return (torch.logsumexp(logits, dim=-1) - logits.gather(-1, targets[:, None]).squeeze(-1)).sum()


def entropy_from_logits(logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Masked mean over tokens of the entropy H = logsumexp(z) − Σ softmax(z)·z of each position, for
    z = logits / temperature (the sampling distribution), over `rows_at_temperature`."""
    entropy = [torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1)
               for z in rows_at_temperature(logits, temperature)]
    return masked_mean(torch.stack(entropy), mask)


# ---------------------------------------------------------------------------------------------------
# Step 2: reward model


def kway_ranking_loss(scores: torch.Tensor, rank_levels: torch.Tensor,
                      valid: torch.Tensor) -> tuple[torch.Tensor, float]:
    """InstructGPT reward-model loss on K-way rankings, one prompt per batch row.

    loss = mean over prompts of  −1/n_pairs · Σ_{i ranked above j} log σ(s_i − s_j)

    `scores` [B, K] holds r(x, y_k); `rank_levels` [B, K] the rank of each response (0 = best, equal
    levels = a tie); `valid` [B, K] marks real responses (rows with fewer than K are padded). Tied
    pairs are dropped and prompts without any pair are left out of the mean (REFERENCE §2: all C(K,2)
    comparisons of a prompt form one batch element, so each prompt weighs the same whatever its K).

    Returns (loss, accuracy): accuracy is the share of all the batch's pairs with s_i > s_j, where equal
    scores count half.
    """
    scores = scores.float()
    margin = scores[:, :, None] - scores[:, None, :]  # [B, K, K]: s_i − s_j
    both_valid = valid[:, :, None] & valid[:, None, :]
    is_pair = (rank_levels[:, :, None] < rank_levels[:, None, :]) & both_valid
    pair_weight = is_pair.to(scores.dtype)
    n_pairs = pair_weight.sum(dim=(1, 2))
    per_prompt = -(F.logsigmoid(margin) * pair_weight).sum(dim=(1, 2)) / n_pairs.clamp(min=1)
    has_pairs = n_pairs > 0
    if not has_pairs.any():
        # Keep the graph (a zero gradient) so a caller's backward() still works on such a batch.
        return scores.sum() * 0.0, float("nan")
    loss = per_prompt[has_pairs].mean()
    with torch.no_grad():
        correct = (margin > 0).to(scores.dtype) + 0.5 * (margin == 0).to(scores.dtype)
        accuracy = float((correct * pair_weight).sum() / n_pairs.sum())
    return loss, accuracy


# ---------------------------------------------------------------------------------------------------
# Step 3: PPO


def no_eos_penalty(scores: torch.Tensor, has_eos: torch.Tensor, penalty: float = -1.0) -> torch.Tensor:
    """A response that never emitted EOS (cut off at the length limit) gets `penalty` as its score.

    N details: without this the policy learns to ramble past the limit; −1 is their value.
    """
    return torch.where(has_eos.bool(), scores, torch.full_like(scores, penalty))


def leave_one_out_baseline(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each score minus the mean of the other scores in its group ([B] → [B]).

    Groups are runs of `group_size` consecutive entries: the responses sampled for one prompt. RLOO
    (Ahmadian et al. 2024): the baseline does not depend on the response it is subtracted from, so the
    policy gradient stays unbiased, while what a prompt's difficulty adds to every one of its scores cancels.
    """
    if group_size < 2 or scores.shape[0] % group_size:
        raise ValueError(f"leave-one-out needs groups of >= 2 that divide the batch ({scores.shape[0]} scores, "
                         f"groups of {group_size})")
    groups = scores.view(-1, group_size)
    others_mean = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others_mean).view(-1)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position where `mask` is set, per row ([B, T] → [B]); 0 for an empty row."""
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return ((mask > 0).long() * positions).argmax(dim=1)


def kl_penalized_rewards(score: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, beta: float, kl_estimator: str = "k1",
                         clamp_nonnegative: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards −β·KL_t, plus the RM score at the last response token of each row.

    InstructGPT / lm-human-preferences: R(x, y) = r(x, y) − β·log(π(y|x) / π_SFT(y|x)), spread over
    tokens as rewards_t = −β·KL_t and the scalar score added at the last response token. Per-token KL:

    - "k1": log π(y_t) − log π_ref(y_t) (unbiased, can be negative per token; the InstructGPT form);
    - "k3": (r − 1) − log r with r = π_ref(y_t)/π(y_t) (unbiased and never negative, Schulman 2020).

    `clamp_nonnegative` clamps KL_t at ≥ 0 (AlpacaFarm). Returns (rewards [B, T], kl [B, T]); both are 0
    outside the mask. A row with no response token gets no score.
    """
    log_ratio = logprobs - ref_logprobs
    if kl_estimator == "k1":
        kl = log_ratio
    elif kl_estimator == "k3":
        kl = torch.expm1(-log_ratio) + log_ratio  # (r − 1) − log r with log r = −log_ratio
    else:
        raise ValueError(f"unknown kl_estimator {kl_estimator!r} (k1 or k3)")
    if clamp_nonnegative:
        kl = kl.clamp(min=0)
    mask = mask.to(kl.dtype)
    kl = kl * mask
    rewards = -beta * kl
    score_of_nonempty_rows = score.to(rewards.dtype) * mask.amax(dim=1)
    score_at_end = torch.zeros_like(rewards).scatter(1, last_token_index(mask).unsqueeze(1),
                                                     score_of_nonempty_rows.unsqueeze(1))
    return rewards + score_at_end, kl


@torch.no_grad()
def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                   lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens; returns (advantages, returns).

    δ_t = r_t + γ·V_{t+1} − V_t,  A_t = δ_t + γλ·A_{t+1},  returns_t = A_t + V_t,
    with V and A taken as 0 after the last response token: the episode ends there, nothing is
    bootstrapped past it (bandit episode, REFERENCE §3; InstructGPT γ = 1; λ: lm-human-preferences 0.95, `ppo` 1).
    Outputs are 0 outside the mask. They are training targets, so no gradient flows through them.
    """
    mask = mask.to(rewards.dtype)
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip_range: float = 0.2) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped PPO surrogate: masked mean of max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)), ρ = π/π_old per token.

    stats: `clipfrac`, the share of tokens where the clipped term is the larger (so the gradient is
    cut), and `approx_kl` = ½·mean((log ρ)²), the estimator lm-human-preferences and N+ log.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": float(masked_mean((clipped > unclipped).float(), mask)),
                 "approx_kl": float(masked_mean(0.5 * log_ratio ** 2, mask))}
    return loss, stats


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip_range: float | None = 0.2) -> tuple[torch.Tensor, float]:
    """Clipped value loss: ½ · masked mean of max((V − R)², (V_clip − R)²), as in lm-human-preferences / N+.

    V_clip = V_old + clip(V − V_old, −ε, ε) keeps one update from moving a value far from the rollout's.
    `clip_range=None` gives the plain ½ · masked mean of (V − R)² (PPO's value warm-up). Returns (loss,
    clipfrac = share of tokens where the clipped error is the larger).
    """
    unclipped_error = (values - returns) ** 2
    if clip_range is None:
        return 0.5 * masked_mean(unclipped_error, mask), 0.0
    clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        clipfrac = float(masked_mean((clipped_error > unclipped_error).float(), mask))
    return loss, clipfrac


class FixedKLController:
    """β held constant (InstructGPT: β = 0.02). Same API as AdaptiveKLController."""

    def __init__(self, beta: float):
        self.value = beta

    def update(self, current_kl: float, n_steps: int) -> None:
        """A fixed β ignores the measured KL."""


class AdaptiveKLController:
    """Adaptive β (Ziegler et al. 2019): β ← β·(1 + clip(KL/target − 1, −0.2, 0.2) · n_steps/horizon).

    `n_steps` is the number of episodes since the last update and `horizon` the episodes over which β
    may change by about e^0.2 (lm-human-preferences: target 6 nats, horizon 10,000).
    """

    def __init__(self, init_beta: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_beta, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        if not math.isfinite(current_kl):
            return  # a NaN KL would make β NaN for the rest of the run
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


# ---------------------------------------------------------------------------------------------------
# PPO-ptx


def ptx_combined_loss(ppo_loss: torch.Tensor, lm_loss: torch.Tensor, ptx_coef: float) -> torch.Tensor:
    """PPO loss + γ · pretraining LM loss (PPO-ptx objective, InstructGPT γ = 27.8).

    InstructGPT computes the PPO gradient and the pretraining gradient in consecutive backward passes
    and accumulates them before one optimiser step. Gradients are linear, so calling backward() on
    `ppo_loss` and then on `ptx_coef * lm_loss` gives the same gradient as backward() on this sum
    (tests/test_losses.py checks it); accumulating in two passes only saves memory, because the two
    batches' activations need not be alive at once.
    """
    return ppo_loss + ptx_coef * lm_loss
