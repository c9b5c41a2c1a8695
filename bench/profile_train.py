"""Where a training step's time goes: one forward + backward of the default policy on 8 x 95 tokens (the
PPO benchmark's micro-batch) in the precision instrugo picks on this CPU (bf16 autocast or fp32), a
torch.profiler table, and matmul GFLOP/s in that precision at the model's own matrix shapes.  Usage: .venv/bin/python bench/profile_train.py"""
import torch
from torch.profiler import ProfilerActivity, profile

from instrugo import models
from measure import best_seconds

ROWS, TOKENS, RESPONSE_LOGITS = 8, 95, 33

precision = models.setup_compute("auto")
dtype = torch.bfloat16 if precision == "bf16" else torch.float32
tokenizer = models.load_tokenizer("default")
model = models.load_causal_lm("default", tokenizer, max_tokens=TOKENS).train()  # the attention kernel PPO picks
input_ids = torch.randint(100, 40000, (ROWS, TOKENS))


def step() -> None:
    with models.autocast(precision):
        logits = model(input_ids=input_ids, logits_to_keep=RESPONSE_LOGITS).logits.float()
        loss = torch.log_softmax(logits, -1).mean()
    loss.backward()
    model.zero_grad(set_to_none=True)


seconds = best_seconds(step, 3)
print(f"precision {precision}")
# Model FLOPs as in docs/BENCHMARKS.md: 6·N per token, N without the embedding lookup, plus the LM head
# on the positions whose logits are computed.
body = sum(p.numel() for name, p in model.named_parameters() if "embed" not in name)
head = model.config.vocab_size * model.config.hidden_size * RESPONSE_LOGITS / TOKENS
print(f"forward + backward {seconds:.3f} s, {6 * (body + head) * ROWS * TOKENS / seconds / 1e9:.0f} model GFLOP/s")

with profile(activities=[ProfilerActivity.CPU]) as profiler:
    step()
print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))

for m, k, n in ((ROWS * TOKENS, 576, 1536), (ROWS * TOKENS, 576, 576), (ROWS * TOKENS, 1536, 576), (2048, 2048, 2048)):
    a = torch.randn(m, k, dtype=dtype)
    b = torch.randn(k, n, dtype=dtype)
    print((m, k, n), f"{2 * m * k * n / best_seconds(lambda: a @ b, 20) / 1e9:.0f} GFLOP/s {precision}")
