"""Batched sampling: the one place every stage generates text through.

Prompts are chat-formatted, bucketed by length (so a batch carries little padding), left-padded with a
pad token distinct from EOS, and decoded with a KV cache; the batch stops as soon as every row has emitted
EOS. Each response is truncated after its first EOS, and we keep whether it had one (PPO gives responses
without EOS a fixed low score).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from instrugo.models import autocast


@dataclass
class Sample:
    prompt_index: int
    text: str                   # decoded response, EOS and padding removed
    token_ids: list[int]        # response tokens as generated, up to and including the first EOS
    has_eos: bool


@dataclass
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 1.0    # 0 means greedy decoding
    top_p: float = 1.0
    batch_size: int = 32        # sequences decoded together


def chat_prompt(tokenizer, prompt: str | list[dict]) -> str:
    """The prompt as the model sees it: the chat template with the assistant turn opened."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_prompts(tokenizer, prompts: Sequence[str | list[dict]]) -> list[list[int]]:
    return [tokenizer(chat_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (input_ids, attention_mask); generation continues at the right edge."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids, mask


def truncate_at_eos(token_ids: Sequence[int], eos_id: int, pad_id: int) -> tuple[list[int], bool]:
    """Cut a generated row after its first EOS; drop trailing padding. Returns (tokens, has_eos)."""
    out: list[int] = []
    for token in token_ids:
        if token == eos_id:
            out.append(token)
            return out, True
        if token == pad_id:
            break
        out.append(token)
    return out, False


@torch.no_grad()
def sample_responses(model, tokenizer, prompts: Sequence[str | list[dict]], n: int = 1,
                     config: SamplingConfig | None = None, precision: str = "fp32", seed: int = 0,
                     progress=None) -> list[list[Sample]]:
    """Generate `n` responses for each prompt; returns one list of `n` Samples per prompt.

    Deterministic for a given seed: each batch reseeds from (seed, batch number), so results do not
    depend on what was generated before (which makes resumed runs reproduce the same samples).
    """
    config = config or SamplingConfig()
    encoded = encode_prompts(tokenizer, prompts)
    # One entry per (prompt, copy); sorted by length so each batch holds similar lengths.
    jobs = sorted(((i, c) for i in range(len(prompts)) for c in range(n)), key=lambda j: (len(encoded[j[0]]), j))
    results: list[list[Sample | None]] = [[None] * n for _ in prompts]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    greedy = config.temperature <= 0
    for batch_number, start in enumerate(range(0, len(jobs), config.batch_size)):
        batch = jobs[start:start + config.batch_size]
        input_ids, attention_mask = left_pad([encoded[i] for i, _ in batch], tokenizer.pad_token_id)
        torch.manual_seed(seed * 1_000_003 + batch_number)
        with autocast(precision):
            output = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                max_new_tokens=config.max_new_tokens, do_sample=not greedy,
                temperature=None if greedy else config.temperature, top_p=None if greedy else config.top_p,
                top_k=None, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                # The pad token is a real vocabulary entry; sampled, it would be mistaken for padding.
                suppress_tokens=[tokenizer.pad_token_id],
            )
        generated = output[:, input_ids.shape[1]:].tolist()
        for (prompt_index, copy), row in zip(batch, generated):
            tokens, has_eos = truncate_at_eos(row, tokenizer.eos_token_id, tokenizer.pad_token_id)
            text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            results[prompt_index][copy] = Sample(prompt_index, text, tokens, has_eos)
        if progress is not None:
            progress(len(batch))
    model.train(was_training)
    return results  # type: ignore[return-value]
