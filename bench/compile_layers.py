"""Compiled decoder layers (`--compile`, `models.compiled_layers`) against eager ones: one forward + backward
of the default policy in bf16 autocast at three training shapes (rows, tokens, response logits), left
padding in one row, best of 3 compiled then best of 3 eager per shape; and the first compiled call, which pays the compilation
(on a cold cache when run with TORCHINDUCTOR_CACHE_DIR set to an empty directory).
Usage: TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) .venv/bin/python bench/compile_layers.py"""

import time

import torch

from instrugo import models
from measure import best_seconds

SHAPES = ((8, 95, 33), (8, 130, 40), (6, 201, 60))  # PPO's micro-batch, and two longer ones

models.setup_compute("bf16")
tokenizer = models.load_tokenizer("default")
model = models.load_causal_lm("default", tokenizer, max_tokens=320).train()


def step(rows: int, tokens: int, response_logits: int, compiled: bool) -> None:
    input_ids = torch.randint(100, 40000, (rows, tokens))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :5] = 0
    with torch.autocast("cpu", dtype=torch.bfloat16), models.compiled_layers(model, compiled):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=response_logits,
                       use_cache=False).logits.float()
        torch.log_softmax(logits, -1).mean().backward()
    model.zero_grad(set_to_none=True)


started = time.perf_counter()
step(*SHAPES[0], compiled=True)
print(f"first compiled call (compilation included): {time.perf_counter() - started:.1f} s")
for shape in SHAPES:
    compiled = best_seconds(lambda: step(*shape, compiled=True), 3)
    eager = best_seconds(lambda: step(*shape, compiled=False), 3)
    print(f"{shape[0]} x {shape[1]} tokens: compiled {compiled:.3f} s, eager {eager:.3f} s, {eager / compiled:.2f}x")
