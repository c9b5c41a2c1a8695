"""Where a training step's time goes: one forward + backward of the default policy on 8 x 95 tokens (the
PPO benchmark's micro-batch) in bf16 autocast, a torch.profiler table, and bf16 matmul GFLOP/s at the
model's own matrix shapes.  Usage: .venv/bin/python bench/profile_train.py"""
import time

import torch
from torch.profiler import ProfilerActivity, profile

from instrugo import models

tok = models.load_tokenizer("default")
model = models.load_causal_lm("default", tok, max_tokens=95).train()  # the kernel PPO picks
ids = torch.randint(100, 40000, (8, 95))
def step():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids, logits_to_keep=33).logits.float()
        loss = torch.log_softmax(logits, -1).mean()
    loss.backward()
    model.zero_grad(set_to_none=True)
step(); step()
t = []
for _ in range(3):
    s = time.perf_counter(); step(); t.append(time.perf_counter() - s)
print(f"fwd+bwd {min(t):.3f}s")
n = sum(p.numel() for n_, p in model.named_parameters() if "embed" not in n_) + model.config.vocab_size * model.config.hidden_size * 33 / 95
print(f"model GFLOP/s {6 * n * 8 * 95 / min(t) / 1e9:.0f}")
with profile(activities=[ProfilerActivity.CPU]) as prof:
    step()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))
for shape in ((760, 576, 1536), (760, 576, 576), (760, 1536, 576), (2048, 2048, 2048)):
    m, k, n_ = shape
    a = torch.randn(m, k, dtype=torch.bfloat16); b = torch.randn(k, n_, dtype=torch.bfloat16)
    a @ b
    s = time.perf_counter()
    for _ in range(20): a @ b
    dt = (time.perf_counter() - s) / 20
    print(shape, f"{2*m*k*n_/dt/1e9:.0f} GFLOP/s bf16")
