"""Eager vs SDPA attention on this CPU, the measurement behind `models.attention_implementation`: forward +
backward of the default model at the sequence lengths the stages train on; and a decode step's parts one
by one (KV cache, packed linears), with one linear layer and one sampling draw alone; and the attention of
no-grad passes: a decode step's attention in one layer against the two batched matmuls decoding ran
before, and a forward pass with each kernel. The measurements behind `generation.decode`,
`generation.draw`, `models.packed_linears` and `models.grouped_attention`.
Usage: .venv/bin/python bench/attention.py"""

import contextlib

import torch
from transformers import DynamicCache

from instrugo import generation, models
from instrugo.data import load_split
from measure import best_seconds

TRAINING_SHAPES = ((8, 95), (8, 320), (4, 512), (2, 1024))  # (rows, tokens)
DECODE_BATCHES, SHORT, LONG, ROUNDS = (8, 32), 8, 72, 2
LINEAR_ROWS = (8, 32, 760)  # decoding's batches, and a forward pass over 8 x 95 tokens

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
    ids, mask = generation.pad_batch(generation.encode_prompts(tokenizer, prompts[:rows]), tokenizer.pad_token_id)
    print(f"  batch {rows} (prompt width {ids.shape[1]}):")
    for label, cache_factory, pack in VARIANTS:
        generation.preallocated_cache = cache_factory
        with torch.autocast("cpu", dtype=torch.bfloat16), models.inference_attention(model), \
                (models.packed_linears(model, "bf16") if pack else contextlib.nullcontext()):
            short, long = (best_seconds(lambda n=n: generation.decode(
                model, ids, mask, n, 1.0, 1.0, -1, tokenizer.pad_token_id, torch.Generator().manual_seed(0)), ROUNDS)
                for n in (SHORT, LONG))
        print(f"    {label}: {(long - short) / (LONG - SHORT) * 1000:.1f} ms/step")

print("one 576 x 1536 bf16 linear layer (the MLP's shape), F.linear vs its weight packed once (best of 50 calls):")
weight = torch.randn(1536, 576).bfloat16()
packed = torch.ops.mkldnn._reorder_linear_weight(weight, 32)
with torch.no_grad():
    for rows in LINEAR_ROWS:
        x = torch.randn(rows, 576).bfloat16()
        plain, fast = (best_seconds(fn, 50) for fn in (
            lambda: torch.nn.functional.linear(x, weight),
            lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")))
        difference = (torch.nn.functional.linear(x, weight).float()
                      - torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "").float()).abs().max()
        print(f"  {rows} rows: F.linear {plain * 1e6:.0f} us, packed {fast * 1e6:.0f} us, max difference {difference:.3g}")

vocabulary = model.config.vocab_size
probabilities = torch.softmax(torch.randn(32, vocabulary) * 3, dim=-1)
generator = torch.Generator().manual_seed(0)
multinomial, inverse_cdf = (best_seconds(fn, 20) for fn in (
    lambda: torch.multinomial(probabilities, 1, generator=generator),
    lambda: generation.draw(probabilities, generator)))
print(f"one token for each of 32 rows over {vocabulary} tokens (best of 20): torch.multinomial "
      f"{multinomial * 1e3:.2f} ms, generation.draw {inverse_cdf * 1e3:.2f} ms")


print("a decode step's attention in one layer, bf16, the default model's 9 query heads on 3 key/value heads, "
      "over a cache of capacity 400 (best of 30):")


def two_matmuls(query, key, value, mask):
    """The decode kernel before `models.grouped_attention`: grouped query heads stacked as rows of a matmul."""
    rows, heads, _, head_dim = query.shape
    scores = torch.matmul(query.view(rows, key.shape[1], heads // key.shape[1], head_dim), key.transpose(-1, -2))
    scores = scores.float().mul(head_dim ** -0.5).masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1).to(value.dtype), value)


for rows, cached in ((8, 100), (32, 150), (128, 100), (128, 250)):
    key_buffer, value_buffer = (torch.randn(rows, 3, 400, 64).bfloat16() for _ in range(2))
    key, value = key_buffer[:, :, :cached], value_buffer[:, :, :cached]  # the cache's views, as decoding reads them
    query = torch.randn(rows, 9, 1, 64).bfloat16()
    mask = torch.ones(rows, 1, 1, cached, dtype=torch.bool)
    mask[: rows // 2, :, :, :20] = False
    matmuls, grouped = (best_seconds(fn, 30) for fn in (
        lambda: two_matmuls(query, key, value, mask),
        lambda: models.grouped_attention(None, query, key, value, mask)))
    print(f"  batch {rows}, {cached} cached tokens: two matmuls {matmuls * 1e3:.2f} ms, grouped SDPA {grouped * 1e3:.2f} ms")

print("a no-grad forward pass, bf16 autocast, left padding in half the rows (best of 3):")
for rows, tokens in ((8, 150), (32, 150)):
    input_ids = torch.randint(100, 40000, (rows, tokens))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[: rows // 2, :30] = 0
    seconds = {}
    for kernel in ("eager", "sdpa", models.GROUPED_ATTENTION):
        model.set_attn_implementation(kernel)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            seconds[kernel] = best_seconds(lambda: model(input_ids=input_ids, attention_mask=attention_mask,
                                                         logits_to_keep=tokens // 2, use_cache=False), 3)
    print(f"  {rows} x {tokens} tokens: " + ", ".join(f"{kernel} {s:.2f} s" for kernel, s in seconds.items()))
