"""Do a reward-model-initialised value network's first values match the returns they predict? Samples
32 `ppo` prompts from a policy (temperature 1, 96 tokens, as PPO's rollouts), scores them with the reward
model (no-EOS penalty −1), reads the value network (the reward model, per token) and reports the mean
value against the mean score, and for GAE λ = 0.95 and 1 (γ = 1) the whitened advantage at the EOS tokens
and the first value loss: the measurement behind `ppo --value-warmup-iterations` and `--lam`.
Usage: .venv/bin/python bench/value_calibration.py POLICY_DIR RM_DIR"""
import sys

import torch

from instrugo import losses, models
from instrugo.data import load_examples
from instrugo.generation import SamplingConfig, encode_prompts, pad_batch, sample_responses
from instrugo.ppo import TokenValueModel, response_tensors, sequence_inputs
from instrugo.reward import load_reward_model, score_texts

policy_path, rm_path = sys.argv[1], sys.argv[2]
precision = models.setup_compute("auto")
tokenizer = models.load_tokenizer(policy_path)
records = load_examples("instrugo:ppo")[:32]
prompt_ids = encode_prompts(tokenizer, [r["messages"] for r in records])
policy = models.load_causal_lm(policy_path, tokenizer).eval()
samples = [s[0] for s in sample_responses(policy, tokenizer, [r["messages"] for r in records], n=1,
                                          config=SamplingConfig(96, 1.0, 1.0, 32), precision=precision, seed=5)]
reward_model, reward_tokenizer = load_reward_model(rm_path)
with torch.no_grad():
    scores = torch.tensor(score_texts(reward_model, reward_tokenizer, [r["messages"] for r in records],
                                      [s.text for s in samples], precision))
    has_eos = torch.tensor([s.has_eos for s in samples])
    scores = losses.no_eos_penalty(scores, has_eos, -1.0)
    value = TokenValueModel(models.load_scalar_model(rm_path, tokenizer)).eval()
    query, query_mask = pad_batch(prompt_ids, tokenizer.pad_token_id)
    response, mask = response_tensors(samples, tokenizer.pad_token_id)
    with models.autocast(precision):
        values = value(**sequence_inputs(query, query_mask, response, mask), response_width=response.shape[1])
lengths = mask.sum(1).long()
# The policy is still the reference, so the KL term is 0: the score at the last token is the only reward.
rewards, _ = losses.kl_penalized_rewards(scores, torch.zeros_like(values), torch.zeros_like(values), mask, 0.0)
ended = has_eos.nonzero().squeeze(-1)
print(f"score mean {scores.mean():.3f} (std {scores.std():.3f}); value mean over response tokens "
      f"{(values * mask).sum() / mask.sum():.3f}, at the first token {values[:, 0].mean():.3f}")
for lam in (0.95, 1.0):
    advantages, returns = losses.gae_advantages(rewards, values, mask, 1.0, lam)
    advantages = losses.masked_whiten(advantages, mask)
    print(f"GAE λ = {lam}: whitened advantage at EOS {advantages[ended, lengths[ended] - 1].mean():.3f}; "
          f"initial value loss ½·mean((return − V)²) {0.5 * (((returns - values) ** 2) * mask).sum() / mask.sum():.3f}")
