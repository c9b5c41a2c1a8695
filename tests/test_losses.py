"""The RLHF math against numbers worked out by hand (or by plain Python loops over pairs and positions)."""

import math

import pytest
import torch

from instrugo import losses


def close(actual, expected, tol=1e-5):
    assert torch.allclose(torch.as_tensor(actual, dtype=torch.float32),
                          torch.as_tensor(expected, dtype=torch.float32), atol=tol, rtol=0), (actual, expected)


def log_softmax_at(row: list[float], index: int) -> float:
    return row[index] - math.log(sum(math.exp(v) for v in row))


# --- masked statistics ------------------------------------------------------------------------------

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # selects 1, 2, 4: mean 7/3


def test_masked_mean_over_all_and_along_a_dim():
    close(losses.masked_mean(X, MASK), 7 / 3)
    close(losses.masked_mean(X, MASK, dim=1), [1.5, 4.0])
    close(losses.masked_mean(X, MASK.bool()), 7 / 3)
    close(losses.masked_mean(X, torch.zeros_like(MASK)), 0.0)  # empty mask: 0, not NaN


def test_masked_var_biased_and_unbiased():
    # deviations −4/3, −1/3, 5/3 → squares sum to 42/9
    close(losses.masked_var(X, MASK), 42 / 27)
    close(losses.masked_var(X, MASK, unbiased=True), 42 / 18)


def test_masked_whiten():
    std = math.sqrt(14 / 9 + 1e-8)
    expected = [[(1 - 7 / 3) / std, (2 - 7 / 3) / std, 0.0], [(4 - 7 / 3) / std, 0.0, 0.0]]
    close(losses.masked_whiten(X, MASK), expected)
    kept_mean = [[v + 7 / 3 if m else 0.0 for v, m in zip(row, mrow)] for row, mrow in zip(expected, MASK.tolist())]
    close(losses.masked_whiten(X, MASK, shift_mean=False), kept_mean)


# --- log-probs and the SFT loss -----------------------------------------------------------------------

def test_token_logprobs_by_hand_with_temperature():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
    tokens = torch.tensor([[2, 1]])
    close(losses.token_logprobs(logits, tokens), [[-math.log(1 + math.exp(-1) + math.exp(-2)), -math.log(3)]])
    hot = losses.token_logprobs(logits, tokens, temperature=2.0)
    close(hot, [[log_softmax_at([0.5, 1.0, 1.5], 2), -math.log(3)]])


def test_token_logprobs_matches_log_softmax_in_value_and_gradient_and_returns_fp32():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, requires_grad=True)
    tokens = torch.randint(0, 11, (3, 5))
    ours = losses.token_logprobs(logits, tokens, temperature=0.7)
    ours.sum().backward()
    our_grad = logits.grad.clone()
    logits.grad = None
    reference = torch.log_softmax(logits / 0.7, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    reference.sum().backward()
    close(ours, reference)
    close(our_grad, logits.grad)
    assert losses.token_logprobs(logits.detach().bfloat16(), tokens).dtype == torch.float32
    # bf16 logits (autocast's lm_head output), cast and divided row by row: the same values and gradient,
    # bit for bit, as casting and dividing the whole batch first.
    half, cast_first = (logits.detach().bfloat16().requires_grad_() for _ in range(2))
    rowwise = losses.token_logprobs(half, tokens, temperature=0.7)
    batchwise = losses.token_logprobs(cast_first.float() / 0.7, tokens)
    (rowwise * torch.arange(15.0).view(3, 5)).sum().backward()
    (batchwise * torch.arange(15.0).view(3, 5)).sum().backward()
    assert torch.equal(rowwise, batchwise) and torch.equal(half.grad, cast_first.grad)


def test_response_lm_loss_is_mean_nll_of_response_tokens_only():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 4)
    labels = torch.tensor([[3, 1, 2, 0, 1], [2, 2, 3, 1, 0]])
    # row 0: prompt 0-1, response 2-4; row 1: prompt 0, response 1-2, padding 3-4
    loss_mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.float32)
    nlls = []
    for b in range(2):
        for t in range(1, 5):
            if loss_mask[b, t]:
                nlls.append(-log_softmax_at(logits[b, t - 1].tolist(), int(labels[b, t])))
    expected = sum(nlls) / len(nlls)
    close(losses.response_lm_loss(logits, labels, loss_mask), expected)

    # Logits at positions whose next token is prompt or padding (and at the final position) do not matter.
    # Single entries are changed: softmax ignores a shift of a whole position.
    changed = logits.clone()
    changed[0, 0, 1] += 5.0
    changed[0, 4, 2] -= 7.0
    changed[1, 2:] = torch.randn(3, 4) * 50
    close(losses.response_lm_loss(changed, labels, loss_mask), expected)
    # ...while the position that predicts the first response token does.
    changed[0, 1, 0] += 3.0
    assert abs(losses.response_lm_loss(changed, labels, loss_mask).item() - expected) > 1e-3


@pytest.mark.parametrize("chunk_tokens", [1, 2, 256])
def test_chunked_response_nll_is_response_lm_loss_of_the_heads_logits_with_the_same_gradients(chunk_tokens):
    """The LM head applied by the loss, in chunks recomputed in the backward pass: the loss of
    `response_lm_loss` on the head's logits (hand-computed above), and the same gradients for the hidden
    states and the head's weight and bias. Chunks of 1 and 2 split the 5 scored tokens unevenly."""
    torch.manual_seed(2)
    hidden = torch.randn(2, 5, 3, requires_grad=True)
    head = torch.nn.Linear(3, 4)
    labels = torch.tensor([[3, 1, 2, 0, 1], [2, 2, 3, 1, 0]])
    loss_mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    expected = losses.response_lm_loss(head(hidden), labels, loss_mask)
    expected_grads = torch.autograd.grad(expected, (hidden, head.weight, head.bias))
    chunked = losses.chunked_response_nll(hidden, head, labels, loss_mask, chunk_tokens=chunk_tokens)
    close(chunked, expected.item())
    for got, want in zip(torch.autograd.grad(chunked, (hidden, head.weight, head.bias)), expected_grads):
        torch.testing.assert_close(got, want)
    assert expected_grads[0][1, 2:].abs().sum() == 0  # positions predicting padding get no gradient

    # Nothing scored: 0, and a backward pass that runs and changes nothing (as response_lm_loss's).
    nothing = losses.chunked_response_nll(hidden, head, labels, torch.zeros_like(loss_mask), chunk_tokens=chunk_tokens)
    grads = torch.autograd.grad(nothing, (hidden, head.weight))
    assert nothing.item() == 0 and all(g.abs().sum() == 0 for g in grads)


def test_entropy_from_logits():
    logits = torch.tensor([[[0.0, math.log(3.0)], [5.0, -5.0]]])  # first position: p = (1/4, 3/4)
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    close(losses.entropy_from_logits(logits, torch.tensor([[1.0, 0.0]])), expected)
    close(losses.entropy_from_logits(torch.zeros(1, 3, 4), torch.ones(1, 3)), math.log(4))
    # At temperature 2 the first position's logits become (0, ln √3): p = (1, √3) / (1 + √3).
    p = 1 / (1 + math.sqrt(3))
    hot = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    close(losses.entropy_from_logits(logits.bfloat16(), torch.tensor([[1.0, 0.0]]), temperature=2.0), hot, tol=2e-3)


# --- K-way ranking loss ------------------------------------------------------------------------------

def naive_ranking_loss(scores, levels, valid):
    """Bradley–Terry loss pair by pair: mean over prompts of the mean −log σ(s_w − s_l) over their pairs."""
    per_prompt, correct, n_pairs = [], 0.0, 0
    for s, lv, ok in zip(scores, levels, valid):
        pair_losses = []
        for i in range(len(s)):
            for j in range(len(s)):
                if ok[i] and ok[j] and lv[i] < lv[j]:
                    pair_losses.append(-math.log(1 / (1 + math.exp(-(s[i] - s[j])))))
                    correct += 1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0
                    n_pairs += 1
        if pair_losses:
            per_prompt.append(sum(pair_losses) / len(pair_losses))
    return sum(per_prompt) / len(per_prompt), correct / n_pairs


def test_kway_ranking_loss_two_responses_by_hand():
    loss, accuracy = losses.kway_ranking_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0, 1]]),
                                              torch.tensor([[True, True]]))
    close(loss, math.log(1 + math.exp(-1)))
    assert accuracy == 1.0


def test_kway_ranking_loss_matches_pairwise_loop_with_ties_mixed_k_and_padding():
    scores = [[0.5, -1.0, 2.0, 0.3], [1.0, 1.0, -0.2, 7.0], [0.1, 0.4, 9.0, 9.0], [3.0, 2.0, 0.0, 0.0]]
    levels = [[1, 3, 0, 2],   # full K = 4 ranking
              [0, 1, 1, 0],   # K = 3 with a tie (1 ~ 2); index 3 is padding
              [0, 0, 5, 5],   # all tied among the real ones: no pairs, excluded
              [1, 0, 2, 0]]   # K = 2, the second better; the padded entries must be ignored
    valid = [[True] * 4, [True, True, True, False], [True, True, False, False], [True, True, False, False]]
    expected_loss, expected_accuracy = naive_ranking_loss(scores, levels, valid)
    scores_t = torch.tensor(scores, requires_grad=True)
    loss, accuracy = losses.kway_ranking_loss(scores_t, torch.tensor(levels), torch.tensor(valid))
    close(loss, expected_loss)
    assert accuracy == pytest.approx(expected_accuracy)
    loss.backward()
    assert scores_t.grad[2].abs().sum() == 0  # the prompt without pairs gets no gradient
    assert scores_t.grad[1, 3] == 0 and scores_t.grad[3, 2:].abs().sum() == 0  # nor does padding


def test_kway_ranking_loss_is_stable_for_large_margins_and_handles_no_pairs():
    scores = torch.tensor([[-100.0, 100.0]], requires_grad=True)
    loss, accuracy = losses.kway_ranking_loss(scores, torch.tensor([[0, 1]]), torch.tensor([[True, True]]))
    close(loss, 200.0)
    loss.backward()
    close(scores.grad, [[-1.0, 1.0]])
    assert accuracy == 0.0
    tied, accuracy = losses.kway_ranking_loss(scores, torch.tensor([[0, 0]]), torch.tensor([[True, True]]))
    assert tied.item() == 0.0 and tied.requires_grad and math.isnan(accuracy)


# --- rewards, GAE, PPO -------------------------------------------------------------------------------

LOGPROBS = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -4.0]])
REF_LOGPROBS = torch.tensor([[-1.5, -1.0, -3.0], [-2.0, -1.0, -0.5]])
RESPONSE_MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
SCORES = torch.tensor([2.0, 3.0])


def test_kl_penalized_rewards_k1_puts_score_on_last_response_token():
    rewards, kl = losses.kl_penalized_rewards(SCORES, LOGPROBS, REF_LOGPROBS, RESPONSE_MASK, beta=0.1)
    close(kl, [[0.5, -1.0, 0.0], [1.0, 0.0, 0.0]])
    close(rewards, [[-0.05, 0.1, 2.0], [-0.1, 3.0, 0.0]])
    empty_row, _ = losses.kl_penalized_rewards(SCORES, LOGPROBS, REF_LOGPROBS, RESPONSE_MASK * torch.tensor([[1.0], [0.0]]),
                                               beta=0.1)
    close(empty_row, [[-0.05, 0.1, 2.0], [0.0, 0.0, 0.0]])  # a row without response tokens gets no score


def test_kl_penalized_rewards_k3_and_clamp():
    _, kl = losses.kl_penalized_rewards(SCORES, LOGPROBS, REF_LOGPROBS, RESPONSE_MASK, 0.1, kl_estimator="k3")
    # r = π_ref/π: e^−0.5 and e^1 in row 0, e^−1 in row 1
    close(kl, [[math.exp(-0.5) - 1 + 0.5, math.e - 1 - 1, 0.0], [math.exp(-1) - 1 + 1, 0.0, 0.0]])
    assert (kl >= 0).all()
    rewards, kl = losses.kl_penalized_rewards(SCORES, LOGPROBS, REF_LOGPROBS, RESPONSE_MASK, 0.1,
                                              clamp_nonnegative=True)
    close(kl, [[0.5, 0.0, 0.0], [1.0, 0.0, 0.0]])
    close(rewards, [[-0.05, 0.0, 2.0], [-0.1, 3.0, 0.0]])
    with pytest.raises(ValueError):
        losses.kl_penalized_rewards(SCORES, LOGPROBS, REF_LOGPROBS, RESPONSE_MASK, 0.1, kl_estimator="k2")


def test_no_eos_penalty():
    close(losses.no_eos_penalty(torch.tensor([0.3, 2.0]), torch.tensor([True, False])), [0.3, -1.0])
    close(losses.no_eos_penalty(torch.tensor([0.3]), torch.tensor([0]), penalty=-5.0), [-5.0])


def test_leave_one_out_baseline_by_hand():
    # groups (1, 2, 6) and (0, 4, -1): 1 − (2+6)/2 = −3, 2 − 3.5 = −1.5, 6 − 1.5 = 4.5; 0 − 1.5, 4 − (−0.5), −1 − 2
    scores = torch.tensor([1.0, 2.0, 6.0, 0.0, 4.0, -1.0])
    close(losses.leave_one_out_baseline(scores, 3), [-3.0, -1.5, 4.5, -1.5, 4.5, -3.0])
    # a prompt's offset cancels: adding 10 to one group changes nothing
    close(losses.leave_one_out_baseline(scores + torch.tensor([10.0] * 3 + [0.0] * 3), 3),
          [-3.0, -1.5, 4.5, -1.5, 4.5, -3.0])
    close(losses.leave_one_out_baseline(torch.tensor([1.0, 3.0]), 2), [-2.0, 2.0])
    for group_size in (1, 4):
        with pytest.raises(ValueError, match="leave-one-out"):
            losses.leave_one_out_baseline(scores, group_size)


GAE_REWARDS = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.2, -1.0, 5.0, 5.0]])  # beyond the mask: ignored
GAE_VALUES = torch.tensor([[0.5, 0.6, 0.7, 9.0], [0.1, 0.3, 4.0, 4.0]])
GAE_MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])


def test_gae_gamma_one_lambda_half_by_hand():
    advantages, returns = losses.gae_advantages(GAE_REWARDS, GAE_VALUES, GAE_MASK, gamma=1.0, lam=0.5)
    # row 0: δ = (0.1, 0.1, 0.3); A2 = 0.3, A1 = 0.1 + 0.5·0.3, A0 = 0.1 + 0.5·0.25
    # row 1: δ = (0.2 + 0.3 − 0.1, −1 − 0.3); A1 = −1.3, A0 = 0.4 + 0.5·(−1.3)
    close(advantages, [[0.225, 0.25, 0.3, 0.0], [-0.25, -1.3, 0.0, 0.0]])
    close(returns, [[0.725, 0.85, 1.0, 0.0], [-0.15, -1.0, 0.0, 0.0]])


def test_gae_lambda_one_gives_monte_carlo_returns():
    advantages, returns = losses.gae_advantages(GAE_REWARDS, GAE_VALUES, GAE_MASK, gamma=1.0, lam=1.0)
    close(returns, [[1.0, 1.0, 1.0, 0.0], [-0.8, -1.0, 0.0, 0.0]])  # sums of the remaining rewards
    close(advantages, [[0.5, 0.4, 0.3, 0.0], [-0.9, -1.3, 0.0, 0.0]])


def test_gae_discount():
    advantages, _ = losses.gae_advantages(torch.tensor([[0.0, 1.0]]), torch.zeros(1, 2), torch.ones(1, 2),
                                          gamma=0.5, lam=1.0)
    close(advantages, [[0.5, 1.0]])


def test_ppo_policy_loss_by_hand():
    ratios = [1.5, 0.5, 1.0, 1.1, 0.5, 3.0]
    advantages = torch.tensor([[1.0, 1.0, -2.0, -1.0, -1.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 0.0]])  # the last token is padding
    old = torch.tensor([[-1.0] * 6])
    new = (old + torch.log(torch.tensor([ratios]))).requires_grad_(True)
    loss, stats = losses.ppo_policy_loss(new, old, advantages, mask, clip_range=0.2)
    # per token max(−Aρ, −A·clip(ρ)): −1.2 (clipped), −0.5, 2, 1.1, 0.8 (clipped)
    close(loss, (-1.2 - 0.5 + 2.0 + 1.1 + 0.8) / 5)
    assert stats["clipfrac"] == pytest.approx(2 / 5)
    assert stats["approx_kl"] == pytest.approx(0.5 * sum(math.log(r) ** 2 for r in ratios[:5]) / 5)
    loss.backward()
    # clipped tokens get no gradient; unclipped: ∂/∂logπ (−Aρ)/n = −Aρ/n
    close(new.grad, [[0.0, -0.5 / 5, 2.0 / 5, 1.1 / 5, 0.0, 0.0]])


def test_ppo_value_loss_by_hand():
    values = torch.tensor([[1.0, 0.0, 0.5, 50.0]])
    old_values = torch.tensor([[0.5, 0.0, 0.6, 0.0]])
    returns = torch.tensor([[2.0, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, clipfrac = losses.ppo_value_loss(values, old_values, returns, mask, clip_range=0.2)
    # token 0: V_clip = 0.7 → max(1, 1.69); token 1: 1; token 2: V_clip = V → 0.25
    close(loss, 0.5 * (1.69 + 1.0 + 0.25) / 3)
    assert clipfrac == pytest.approx(1 / 3)
    # Unclipped (value warm-up): token 0 keeps its own error, 1.
    loss, clipfrac = losses.ppo_value_loss(values, old_values, returns, mask, clip_range=None)
    close(loss, 0.5 * (1.0 + 1.0 + 0.25) / 3)
    assert clipfrac == 0.0


def test_kl_controllers():
    adaptive = losses.AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    adaptive.update(9.0, n_steps=1000)  # KL/target − 1 = 0.5, clipped to 0.2
    assert adaptive.value == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    adaptive.update(5.4, n_steps=500)  # −0.1
    assert adaptive.value == pytest.approx(0.102 * (1 - 0.1 * 0.05))
    adaptive.update(float("nan"), n_steps=500)
    assert adaptive.value == pytest.approx(0.102 * 0.995)
    fixed = losses.FixedKLController(0.02)
    fixed.update(100.0, n_steps=512)
    assert fixed.value == 0.02


def test_ptx_accumulated_backward_equals_combined_gradient():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    rl_inputs, rl_targets = torch.randn(5, 4), torch.randn(5, 3)
    lm_inputs, lm_labels = torch.randn(7, 4), torch.randint(0, 3, (7,))
    gamma = 27.8

    def ppo_loss():
        return ((model(rl_inputs) - rl_targets) ** 2).mean()

    def lm_loss():
        return torch.nn.functional.cross_entropy(model(lm_inputs), lm_labels)

    def grads():
        out = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        return out

    ppo_loss().backward()
    ppo_grad = grads()
    lm_loss().backward()
    lm_grad = grads()
    ppo_loss().backward()            # InstructGPT: two consecutive backward passes, accumulated
    (gamma * lm_loss()).backward()
    accumulated = grads()
    losses.ptx_combined_loss(ppo_loss(), lm_loss(), gamma).backward()
    combined = grads()
    for p, l, a, c in zip(ppo_grad, lm_grad, accumulated, combined):
        close(a, p + gamma * l, tol=1e-4)
        close(c, p + gamma * l, tol=1e-4)
