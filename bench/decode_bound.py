"""What bounds sampling at the PPO rollout's batch: the prompt pass, and a decode step against the time its
weights take to stream from memory. instrugo's sampler (`generation.decode`, packed weights, inside
`sample_responses`' set-up) and plain `model.generate` on the first 8 `ppo` prompts of the default policy,
in the precision instrugo picks here, each run for exactly 1 and exactly 32 new tokens (EOS never ends a
row: instrugo's decode is told an EOS id no token has, generate gets `min_new_tokens`), alternating, best of
ROUNDS. The prompt pass is the 1-token time; a decode step is (t32 - t1) / 31. The floor of a step is the
model's weights (every linear layer's, read once per step) over this machine's read bandwidth, measured
here by summing a 1 GiB tensor. Prints both sides, the ratio a step at the floor would give, and where
instrugo's step goes: torch.profiler over a 32-token call minus a 1-token call, per step, split into the
linear layers, attention, other ops and time outside ops (Python), under the profiler's overhead. Last,
the linear layers alone: one decode step's products at ROWS rows, each of the model's weights packed as the
sampler packs it, in model order (so each weight is new to the cache, as in a step), and again with each
Llama-family layer's q/k/v and gate/up weights concatenated into one product each; best of 15, as GB/s of
weights read.
Usage: .venv/bin/python bench/decode_bound.py [ROUNDS]   (default 3)"""
import functools
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from instrugo import models
from instrugo.data import load_split
from instrugo.generation import encode_prompts, pad_batch
from instrugo.generation import decode as instrugo_decode

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
ROWS, NEW_TOKENS = 8, 32

precision = models.setup_compute("auto")
tokenizer = models.load_tokenizer("default")
model = models.load_causal_lm("default", tokenizer).eval()
ids, mask = pad_batch(encode_prompts(tokenizer, [r["messages"] for r in load_split("ppo")[:ROWS]]), tokenizer.pad_token_id)


def instrugo(new_tokens: int) -> None:
    with (torch.no_grad(), models.autocast(precision), models.inference_attention(model),
          models.packed_linears(model, precision)):
        generator = torch.Generator().manual_seed(0)
        rows = instrugo_decode(model, ids, mask, new_tokens, 1.0, 1.0, eos_id=-1, pad_id=tokenizer.pad_token_id,
                               generator=generator)
    assert all(len(row.tokens) == new_tokens for row in rows)


def plain(new_tokens: int) -> None:
    with torch.no_grad(), models.autocast(precision):
        output = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                do_sample=True, top_k=None, pad_token_id=tokenizer.pad_token_id)
    assert output.shape[1] == ids.shape[1] + new_tokens


def read_bandwidth() -> float:
    """GB/s of summing a 1 GiB fp32 tensor (all threads), best of 5."""
    block = torch.ones(2**28)
    best = float("inf")
    for _ in range(6):
        start = time.perf_counter()
        block.sum()
        best = min(best, time.perf_counter() - start)
    return block.numel() * 4 / best / 1e9


times = {(side, n): [] for side in ("instrugo", "plain") for n in (1, NEW_TOKENS)}
for round_index in range(ROUNDS + 1):  # round 0 warms up
    for side, run in (("instrugo", instrugo), ("plain", plain))[::1 if round_index % 2 else -1]:
        for n in (1, NEW_TOKENS):
            start = time.perf_counter()
            run(n)
            if round_index:
                times[side, n].append(time.perf_counter() - start)
best = {key: min(values) for key, values in times.items()}
bandwidth = read_bandwidth()
bytes_per_step = sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
                     if isinstance(m, torch.nn.Linear)) * (0.5 if precision == "bf16" else 1)
floor = bytes_per_step / bandwidth / 1e9
print(f"precision {precision}; prompts {ROWS} rows x {ids.shape[1]} columns (left-padded); best of {ROUNDS}")
for side in ("instrugo", "plain"):
    step = (best[side, NEW_TOKENS] - best[side, 1]) / (NEW_TOKENS - 1)
    print(f"{side:8s}: {NEW_TOKENS} tokens {best[side, NEW_TOKENS]:.2f} s = prompt pass + 1st token {best[side, 1]:.2f} s "
          f"+ {NEW_TOKENS - 1} steps of {step * 1e3:.1f} ms")
print(f"read bandwidth {bandwidth:.1f} GB/s; linear weights {bytes_per_step / 1e6:.0f} MB per step -> floor {floor * 1e3:.1f} ms/step")
at_floor = best["instrugo", 1] + (NEW_TOKENS - 1) * floor
print(f"ratio to plain generate: now {best['plain', NEW_TOKENS] / best['instrugo', NEW_TOKENS]:.2f}x; with every step at "
      f"the floor {best['plain', NEW_TOKENS] / at_floor:.2f}x; with no decode steps at all "
      f"{best['plain', NEW_TOKENS] / best['instrugo', 1]:.2f}x")


def profiled(new_tokens: int) -> tuple[float, dict[str, float]]:
    """Wall seconds of one instrugo call under the profiler, and its ops' self CPU seconds by kind."""
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        start = time.perf_counter()
        instrugo(new_tokens)
        wall = time.perf_counter() - start
    kinds = {"linear layers": 0.0, "attention": 0.0, "other ops": 0.0}
    for event in profiler.key_averages():
        kind = ("linear layers" if "linear" in event.key or event.key in ("aten::mm", "aten::addmm") else
                "attention" if "scaled_dot_product" in event.key else "other ops")
        kinds[kind] += event.self_cpu_time_total / 1e6
    return wall, kinds


(wall_1, ops_1), (wall_n, ops_n) = profiled(1), profiled(NEW_TOKENS)
per_step = {kind: (ops_n[kind] - ops_1[kind]) / (NEW_TOKENS - 1) for kind in ops_n}
per_step["outside ops"] = ((wall_n - wall_1) - sum(ops_n.values()) + sum(ops_1.values())) / (NEW_TOKENS - 1)
print("instrugo's decode step under the profiler: " + ", ".join(f"{kind} {ms * 1e3:.1f} ms" for kind, ms in per_step.items())
      + f" (total {sum(per_step.values()) * 1e3:.1f} ms)")



def read_rate(products: list, weight_bytes: int) -> tuple[float, float]:
    """Seconds (best of 15) to run each (layer, input) of `products` once, in order; and GB/s of weights read."""
    best = float("inf")
    for _ in range(15):
        start = time.perf_counter()
        for layer, x in products:
            layer(x)
        best = min(best, time.perf_counter() - start)
    return best, weight_bytes / best / 1e9


dtype = torch.bfloat16 if precision == "bf16" else torch.float32
linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
row_inputs = {m.in_features: torch.randn(ROWS, m.in_features, dtype=dtype) for m in linears}
with torch.no_grad(), models.packed_linears(model, precision):  # the sampler's packing, as it decodes
    seconds, rate = read_rate([(m, row_inputs[m.in_features]) for m in linears], int(bytes_per_step))
print(f"linear layers alone, {len(linears)} products at {ROWS} rows: {seconds * 1e3:.1f} ms, {rate:.1f} GB/s", end="")
layers = getattr(getattr(model, "model", None), "layers", [])
if layers and all(hasattr(layer, "self_attn") and hasattr(layer.mlp, "gate_proj") for layer in layers):
    fused = [w for layer in layers for w in (
        torch.cat([layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight]),
        layer.self_attn.o_proj.weight, torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]),
        layer.mlp.down_proj.weight)] + [model.get_output_embeddings().weight]
    with torch.no_grad():
        packed = [functools.partial(models._packed_linear, torch.ops.mkldnn._reorder_linear_weight(w.detach().to(dtype), 32), None)
                  for w in fused]  # packed as models.packed_linears packs
        seconds, rate = read_rate([(layer, row_inputs[w.shape[1]]) for layer, w in zip(packed, fused)], int(bytes_per_step))
    print(f"; q/k/v and gate/up fused, {len(fused)} products: {seconds * 1e3:.1f} ms, {rate:.1f} GB/s", end="")
print()
