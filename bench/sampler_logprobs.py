"""How far the sampler's log-probs (KV cache, packed weights, fused attention) are from a forward pass over
the finished rollout (PPO's scoring pass, `ppo.policy_logprobs`), per precision: the evidence behind
`PPOConfig.rollout_logprobs=auto` (reuse in fp32, recompute under bf16). The default policy's responses to
the first 8 `ppo` prompts, up to 32 new tokens at temperature 1 (the PPO benchmark's setting). bf16 is
measured only where oneDNN runs it (elsewhere a pass takes minutes and instrugo never picks it); there both
bf16 log-probs are also compared with an fp32 pass over the same tokens, to show which of the two is off.
Usage: .venv/bin/python bench/sampler_logprobs.py"""
import torch

from instrugo import models
from instrugo.data import load_split
from instrugo.generation import SamplingConfig, encode_prompts, pad_batch, sample_responses
from instrugo.ppo import policy_logprobs, response_tensors, sampler_logprobs, sequence_inputs

ROWS, NEW_TOKENS = 8, 32

models.setup_compute("fp32")
tokenizer = models.load_tokenizer("default")
model = models.load_causal_lm("default", tokenizer).eval()
prompts = [r["messages"] for r in load_split("ppo")[:ROWS]]
query, query_mask = pad_batch(encode_prompts(tokenizer, prompts), tokenizer.pad_token_id)
for precision in ("fp32", "bf16") if models.onednn_has_bf16() else ("fp32",):
    samples = [s[0] for s in sample_responses(model, tokenizer, prompts, config=SamplingConfig(NEW_TOKENS, 1.0, 1.0, ROWS),
                                              precision=precision, seed=0)]
    response, mask = response_tensors(samples, tokenizer.pad_token_id)
    sampled = sampler_logprobs(samples, response.shape[1])
    inputs, scored = sequence_inputs(query, query_mask, response, mask), mask > 0
    with torch.no_grad(), models.autocast(precision):
        recomputed = policy_logprobs(model, inputs, response, 1.0)
    gap = (sampled - recomputed).abs()[scored]
    ratio = (recomputed - sampled).exp()[scored]  # the PPO ratio π/π_old the first minibatch starts from
    print(f"{precision}: {int(mask.sum())} tokens; |sampler - forward pass| max {gap.max():.2e}, mean {gap.mean():.2e}; "
          f"starting PPO ratio within [{ratio.min():.5f}, {ratio.max():.5f}]")
    if precision == "bf16":
        with torch.no_grad():
            exact = policy_logprobs(model, inputs, response, 1.0)
        for name, logprobs in (("sampler", sampled), ("forward pass", recomputed)):
            error = (logprobs - exact).abs()[scored]
            print(f"  bf16 {name} vs an fp32 forward pass: max {error.max():.2e}, mean {error.mean():.2e}")
