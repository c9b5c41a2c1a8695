"""Eager vs SDPA attention on this CPU, the measurement behind `models.attention_implementation`: forward +
backward of the default model at the sequence lengths the stages train on; and a decode step's parts one
by one (KV cache, packed linears), the measurement behind `generation.decode`.
Usage: .venv/bin/python bench/attention.py"""
import time

import torch
from transformers import DynamicCache

from instrugo import generation, models
from instrugo.data import load_split
from measure import best_seconds

TRAINING_SHAPES = ((8, 95), (8, 320), (4, 512), (2, 1024))  # (rows, tokens)
DECODE_BATCHES, SHORT, LONG, ROUNDS = (8, 32), 8, 72, 2

models.setup_compute("bf16")
tokenizer = models.load_tokenizer("default")
model = models.load_causal_lm("default", tokenizer).train()

print("forward + backward, bf16 autocast (best of 2):")
for rows, tokens in TRAINING_SHAPES:
    input_ids = torch.randint(100, 40000, (rows, tokens))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[: rows // 2, :20] = 0  # left padding in half the rows, as in PPO batches

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=33).logits
            loss = torch.log_softmax(logits.float(), -1).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    seconds = {}
    for kernel in ("eager", "sdpa"):
        model.set_attn_implementation(kernel)
        seconds[kernel] = best_seconds(step, 2)
    print(f"  {rows} x {tokens} tokens: eager {seconds['eager']:.2f} s, sdpa {seconds['sdpa']:.2f} s")

model.eval().requires_grad_(False)
print(f"decoding ppo prompts with a KV cache, EOS off (marginal ms per step between {SHORT} and {LONG} new tokens, "
      f"best of {ROUNDS}):")
prompts = [r["messages"] for r in load_split("ppo")]


def dynamic_cache(config, capacity):
    return DynamicCache(config=config)


VARIANTS = (  # (label, cache factory, pack linears)
    ("concatenating cache (transformers' DynamicCache), F.linear", dynamic_cache, False),
    ("preallocated cache", generation.preallocated_cache, False),
    ("... and packed linears (what sampling runs)", generation.preallocated_cache, True),
)
for rows in DECODE_BATCHES:
    ids, mask = generation.left_pad(generation.encode_prompts(tokenizer, prompts[:rows]), tokenizer.pad_token_id)
    print(f"  batch {rows} (prompt width {ids.shape[1]}):")
    for label, cache_factory, pack in VARIANTS:
        generation.preallocated_cache = cache_factory
        with torch.autocast("cpu", dtype=torch.bfloat16), models.fused_attention(model), \
                models.packed_linears(model, "bf16" if pack else "fp32"):
            short, long = (best_seconds(lambda n=n: generation.decode(
                model, ids, mask, n, 1.0, 1.0, -1, tokenizer.pad_token_id, torch.Generator().manual_seed(0)), ROUNDS)
                for n in (SHORT, LONG))
        print(f"    {label}: {(long - short) / (LONG - SHORT) * 1000:.1f} ms/step")
