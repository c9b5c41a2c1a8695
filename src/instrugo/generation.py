"""Batched sampling: the one place every stage generates text through.

Prompts are chat-formatted, bucketed by length (so a batch carries little padding), left-padded with a
pad token distinct from EOS, and decoded with a KV cache by our own loop rather than `model.generate`:
rows that have emitted EOS leave the batch (their cache rows are dropped), so the cost of a batch follows
its responses' lengths instead of the longest one's, and a step is one forward pass plus a few tensor ops.
Samples of the same prompt share one prompt pass (best-of-n and K-way sampling draw many per prompt).
What makes a step cheap on CPU (measured in bench/attention.py): linear weights packed once per call for
oneDNN (`models.packed_linears`), a KV cache written in place and read without copies by a fused
attention kernel (`models.grouped_attention`), and one uniform draw per row to sample.
Each response ends at its first EOS, and we keep whether it had one (PPO gives responses without EOS a
fixed low score). `DecodeBatch` holds a decode's rows; `instrugo serve` adds rows to a running one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple, Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from instrugo.models import autocast, inference_attention, packed_linears


@dataclass
class Sample:
    prompt_index: int
    text: str                   # decoded response, EOS and padding removed
    token_ids: list[int]        # response tokens as generated, up to and including the first EOS
    has_eos: bool
    logprobs: list[float] | None = None  # log softmax(logits / T) of each token, whole vocabulary (None when greedy)


class Continuation(NamedTuple):
    """One row of `decode`: its tokens up to and including the first EOS, whether it has one, and each
    token's log-probability under softmax(logits / T) (None when greedy)."""
    tokens: list[int]
    has_eos: bool
    logprobs: list[float] | None


# Sequences decoded together by default. A decode step reads every weight once whatever the batch, so
# bigger batches pay until attention over the cache dominates. With the fused grouped-head kernel
# (models.grouped_attention) on the Intel machine of docs/BENCHMARKS.md: 323 tokens/s at batch 32, 630 at
# 128, 706 at 256 (bench/decode_batch.py); best-of-16 on 32 prompts 733 at 128, 861-881 at 256 and 507-642
# at 512. The default model's KV cache for 256 rows of 250 tokens is 30 layers x 2 (keys, values) x
# 3 heads x 64 dims x 2 bytes (bf16) per row and token: ~1.5 GB.
DECODE_BATCH_SIZE = 256


@dataclass
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 1.0    # 0 means greedy decoding
    top_p: float = 1.0
    batch_size: int = DECODE_BATCH_SIZE


def chat_prompt(tokenizer, prompt: str | list[dict]) -> str:
    """The prompt as the model sees it: the chat template with the assistant turn opened."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_prompts(tokenizer, prompts: Sequence[str | list[dict]]) -> list[list[int]]:
    return [tokenizer(chat_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]


def positions_skipping_padding(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, so a row's positions do not depend on how long the other rows of
    its batch are (N details); with right padding they are plain 0, 1, 2, ..."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token lists into (input_ids, attention_mask). Left padding ends every row at the right edge,
    where generation continues; right padding keeps each row's last token where transformers' sequence
    classifiers read their score."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            columns = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
            ids[row, columns] = torch.tensor(seq, dtype=torch.long)
            mask[row, columns] = 1
    return ids, mask


def draw(weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One index per row of [B, V] non-negative `weights`, with probability proportional to them, by
    inverting the cumulative sum with one uniform draw per row. (`torch.multinomial` draws an exponential
    per vocabulary entry: 23.7 vs 0.59 ms for 32 rows over 49k tokens in bench/attention.py.) The
    uniform lies in (0, total], so the first index whose cumulative sum reaches it has a positive weight."""
    cumulative = weights.cumsum(-1)
    uniform = 1.0 - torch.rand(weights.shape[0], 1, generator=generator, device=weights.device)
    return torch.searchsorted(cumulative, uniform * cumulative[:, -1:]).squeeze(-1)


def next_tokens(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator,
                banned: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One token per row from [B, V] logits, never `banned`: greedy when temperature is 0, else drawn from
    softmax(logits / T) cut to the smallest set of tokens whose probability reaches top_p (nucleus
    sampling). Also returns each drawn token's log-probability under softmax(logits / T) over the whole
    vocabulary, as a forward pass over the response gives it (PPO reuses it), or None when greedy."""
    if temperature <= 0:
        if banned is not None:
            logits = logits.clone()
            logits[:, banned] = float("-inf")
        return logits.argmax(-1), None
    log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)
    probs = log_probs.exp()
    if banned is not None:
        probs[:, banned] = 0.0
    if top_p < 1.0:
        probs = probs / probs.sum(-1, keepdim=True)  # the nucleus is a share of what can be drawn
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep a token while the mass before it is below top_p (the most likely token is always kept).
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        choice = draw(sorted_probs.masked_fill(outside, 0.0), generator)
        token = order.gather(-1, choice[:, None]).squeeze(-1)
    else:
        token = draw(probs, generator)
    return token, log_probs.gather(-1, token[:, None]).squeeze(-1)


class PreallocatedLayer(DynamicLayer):
    """A KV-cache layer that writes each step's keys and values into buffers allocated once for the whole
    decode, where transformers' DynamicLayer concatenates (a copy of the layer's whole cache per token: a
    decode step at batch 32 took 74.6 ms with it, 67.1 ms without, in bench/attention.py). Attention reads
    a view of the written part.

    Under autocast both are stored in the autocast dtype. Keys arrive in fp32 (rotary embeddings multiply
    the bf16 projections by fp32 cos/sin), and attention's matmul casts them to bf16 anyway, so storing them
    cast gives the same products without recasting the layer's whole key cache at every step."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = capacity, 0

    def allocate(self, rows: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Buffers for `rows` rows shaped like these states, in the autocast dtype when autocast is on."""
        device = key_states.device
        autocast_on = torch.is_autocast_enabled(device.type)
        self.dtype = torch.get_autocast_dtype(device.type) if autocast_on else key_states.dtype
        self.device = device
        heads = key_states.shape[1]
        self.key_buffer = key_states.new_empty(rows, heads, self.capacity, key_states.shape[-1], dtype=self.dtype)
        self.value_buffer = value_states.new_empty(rows, heads, self.capacity, value_states.shape[-1], dtype=self.dtype)
        self.is_initialized = True

    def expose(self, end: int) -> None:
        """The first `end` columns are written: attention reads them as the cache."""
        self.length = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.allocate(key_states.shape[0], key_states, value_states)
        end = self.length + key_states.shape[-2]
        self.key_buffer[:, :, self.length:end] = key_states
        self.value_buffer[:, :, self.length:end] = value_states
        self.expose(end)
        return self.keys, self.values

    def place(self, rows: slice, batch_size: int, end: int, piece: "PreallocatedLayer") -> None:
        """Write a prompt pass over some of the batch's rows (`piece`, cut to those rows' longest prompt)
        into this layer, right-aligned at column `end` as left padding aligns them. Columns to its left stay
        zero: padding, masked in attention, and finite where the buffers' other contents may not be."""
        if not self.is_initialized:
            self.allocate(batch_size, piece.keys, piece.values)
            self.key_buffer[:, :, :end].zero_()  # decoding writes the columns after `end` before reading them
            self.value_buffer[:, :, :end].zero_()
        self.key_buffer[rows, :, end - piece.length:end] = piece.keys
        self.value_buffer[rows, :, end - piece.length:end] = piece.values
        self.expose(end)

    def join(self, columns: slice, piece: "PreallocatedLayer", end: int, capacity: int) -> None:
        """This layer's rows (their written `columns`), then `piece`'s rows, in new buffers of `capacity`
        columns, both right-aligned at column `end` as left padding aligns them (columns to the left stay
        zero: padding, masked in attention)."""
        width = columns.stop - columns.start
        for name in ("key_buffer", "value_buffer"):
            old, new_rows = getattr(self, name), getattr(piece, name)
            rows, heads, _, dims = old.shape  # keys and values may differ in head size
            buffer = old.new_empty(rows + new_rows.shape[0], heads, capacity, dims)
            buffer[:, :, :end].zero_()
            buffer[:rows, :, end - width:end] = old[:, :, columns]
            buffer[rows:, :, end - piece.length:end] = new_rows[:, :, :piece.length]
            setattr(self, name, buffer)
        self.capacity = capacity
        self.expose(end)

    def crop(self, *args, **kwargs):  # DynamicLayer's versions would leave the buffers stale
        raise NotImplementedError("PreallocatedLayer supports decoding only: update and batch_select_indices")

    reset = batch_repeat_interleave = crop

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
            self.expose(self.length)


def preallocated_cache(config, capacity: int) -> DynamicCache:
    """The model's cache with its full-attention layers preallocated for `capacity` tokens (layers of other
    kinds, e.g. sliding windows, are kept as transformers builds them)."""
    cache = DynamicCache(config=config)
    cache.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


# Rows per forward pass over the prompts: the 128 `eval` prompts (105 tokens wide once padded) took 5.2-8.6 s
# in one pass, 3.6-3.7 s in passes of 32 each cut to its own longest prompt, 3.9-4.2 s in passes of 64 and
# 3.8-3.9 s in passes of 16 (bench/prompt_pass.py, docs/BENCHMARKS.md); most of it is the padding a group
# no longer carries. `decode` reads this at call time (bench/prompt_pass.py sets it).
PROMPT_PASS_ROWS = 32


def prompt_pass(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, capacity: int,
                rows_per_pass: int = PROMPT_PASS_ROWS) -> tuple[DynamicCache, torch.Tensor]:
    """Run the left-padded prompts through the model: returns their KV cache, with room for `capacity`
    tokens, and each row's next-token logits. Rows go in groups of `rows_per_pass`, each cut to its own
    longest prompt (batches are sorted by prompt length, so a group carries little padding), and each
    group's keys and values are placed in the batch's cache where one pass over all rows would put them."""
    cache = preallocated_cache(model.config, capacity)
    positions = positions_skipping_padding(attention_mask)
    rows, width = input_ids.shape
    if rows <= rows_per_pass or not (cache.layers and all(type(layer) is PreallocatedLayer for layer in cache.layers)):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                       past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        return cache, logits
    logits = []
    for start in range(0, rows, rows_per_pass):
        group = slice(start, start + rows_per_pass)
        first = int(attention_mask[group].any(0).int().argmax())  # the group's leftmost real token (0 if none)
        part = preallocated_cache(model.config, width - first)
        logits.append(model(input_ids=input_ids[group, first:], attention_mask=attention_mask[group, first:],
                            position_ids=positions[group, first:], past_key_values=part, use_cache=True,
                            logits_to_keep=1).logits[:, -1])
        for layer, piece in zip(cache.layers, part.layers):
            layer.place(group, rows, width, piece)
    return cache, torch.cat(logits)


class DecodeBatch:
    """Rows decoding together, one token each per forward pass: their KV cache, attention mask and next
    positions. `add` brings in rows (their prompts go through the model; with rows already decoding, their
    cache is placed beside the others', which is how a server lets requests join a running decode),
    `forward` feeds each row its next token, `keep` drops the rows that have ended."""

    def __init__(self, model):
        self.model = model
        self.cache: DynamicCache | None = None
        self.attention_mask = self.next_position = None
        self.capacity = 0  # columns the cache buffers hold

    def __len__(self) -> int:
        return 0 if self.attention_mask is None else self.attention_mask.shape[0]

    @property
    def room(self) -> int:
        """Tokens every row can still take before `add` must make room."""
        return self.capacity - (0 if self.attention_mask is None else self.attention_mask.shape[1])

    @property
    def joinable(self) -> bool:
        """Whether rows can join while others decode: every layer's cache is a `PreallocatedLayer`
        (caches of other kinds, e.g. sliding windows, cannot be realigned here)."""
        return self.cache is None or all(type(layer) is PreallocatedLayer for layer in self.cache.layers)

    def used_columns(self) -> slice:
        """The cache columns some row reads: from the leftmost real token to the last written column."""
        return slice(int(self.attention_mask.any(0).int().argmax()), self.attention_mask.shape[1])

    def width_after_adding(self, prompt_width: int, new_tokens: int) -> int:
        """Cache columns per row once `add` has placed prompts `prompt_width` wide with room for `new_tokens`."""
        if not len(self):
            return prompt_width + new_tokens
        used = self.used_columns()
        return max(used.stop - used.start, prompt_width) + max(self.room, new_tokens)

    def add(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, new_tokens: int,
            prompt_of_row: torch.Tensor | None = None) -> torch.Tensor:
        """Add a row per left-padded prompt (or row r continuing prompt `prompt_of_row[r]`, which then
        shares that prompt's pass) after the rows already here, with room for `new_tokens` more tokens of
        every row; returns the new rows' next-token logits."""
        width = input_ids.shape[1]
        joining = len(self) > 0
        if joining and not self.joinable:
            raise ValueError("rows cannot join this model's cache while others decode")
        cache, logits = prompt_pass(self.model, input_ids, attention_mask, width if joining else width + new_tokens,
                                    PROMPT_PASS_ROWS)
        positions = positions_skipping_padding(attention_mask)
        if prompt_of_row is not None:
            cache.batch_select_indices(prompt_of_row)
            logits, positions, attention_mask = logits[prompt_of_row], positions[prompt_of_row], attention_mask[prompt_of_row]
        if not joining:
            self.cache, self.attention_mask, self.next_position = cache, attention_mask, positions[:, -1] + 1
            self.capacity = width + new_tokens
            return logits
        used = self.used_columns()
        end = max(used.stop - used.start, width)
        capacity = self.width_after_adding(width, new_tokens)
        for layer, piece in zip(self.cache.layers, cache.layers):
            layer.join(used, piece, end, capacity)
        mask = self.attention_mask.new_zeros(len(self) + attention_mask.shape[0], end)
        mask[:len(self), end - (used.stop - used.start):] = self.attention_mask[:, used]
        mask[len(self):, end - width:] = attention_mask
        self.attention_mask, self.capacity = mask, capacity
        self.next_position = torch.cat([self.next_position, positions[:, -1] + 1])
        return logits

    def forward(self, token: torch.Tensor) -> torch.Tensor:
        """Feed each row its next token; returns the logits of the token after it."""
        self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones(len(self), 1)], dim=1)
        logits = self.model(input_ids=token[:, None], attention_mask=self.attention_mask,
                            position_ids=self.next_position[:, None], past_key_values=self.cache, use_cache=True).logits[:, -1]
        self.next_position = self.next_position + 1
        return logits

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these rows, in this order (a copy of the cache, so callers drop rows in groups)."""
        self.cache.batch_select_indices(rows)
        self.attention_mask, self.next_position = self.attention_mask[rows], self.next_position[rows]


@torch.no_grad()
def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, temperature: float,
           top_p: float, eos_id: int, pad_id: int, generator: torch.Generator,
           prompt_of_row: torch.Tensor | None = None,
           on_step: Callable[[list[tuple[int, int]]], Iterable[int]] | None = None) -> list[Continuation]:
    """Sample a continuation of each left-padded prompt, one `Continuation` per row. Row r continues prompt
    `prompt_of_row[r]` (default: one row per prompt): several samples of one prompt share its prompt pass,
    whose cache and logits are copied to each of them. `on_step`, if given, gets the (row, token) pairs of
    each step's unfinished rows and returns the rows to end there (a stop string, a row's own length limit).

    Finished rows are dropped from the batch and the KV cache once they are an eighth of it (dropping
    costs a copy of the cache, so not one row at a time). Position ids skip the left padding, as in
    training. The pad token is never sampled: it is a real vocabulary entry and would read as padding."""
    batch = DecodeBatch(model)
    logits = batch.add(input_ids, attention_mask, max_new_tokens, prompt_of_row)
    size = len(batch)
    rows = torch.arange(size)                       # original row of each row still in the batch
    finished = torch.zeros(size, dtype=torch.bool)  # emitted EOS, waiting to be dropped
    greedy = temperature <= 0
    tokens: list[list[int]] = [[] for _ in range(size)]
    logprobs: list[list[float | None]] = [[] for _ in range(size)]
    has_eos = [False] * size
    for step in range(max_new_tokens):
        token, token_logprob = next_tokens(logits, temperature, top_p, generator, banned=pad_id)
        row_logprobs = [None] * len(rows) if greedy else token_logprob.tolist()
        live = []
        for row, value, logprob, done in zip(rows.tolist(), token.tolist(), row_logprobs, finished.tolist()):
            if not done:
                tokens[row].append(value)
                logprobs[row].append(logprob)
                has_eos[row] = value == eos_id
                live.append((row, value))
        finished |= token.cpu() == eos_id
        if on_step is not None:
            ended = set(on_step(live))
            if ended:
                finished |= torch.tensor([row in ended for row in rows.tolist()])
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        if int(finished.sum()) * 8 >= len(rows):
            keep = (~finished).nonzero().squeeze(1)
            batch.keep(keep.to(input_ids.device))
            rows, finished, token = rows[keep], finished[keep], token[keep.to(token.device)]
        logits = batch.forward(token)
    return [Continuation(t, e, None if greedy else lp) for t, e, lp in zip(tokens, has_eos, logprobs)]


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
    with autocast(precision), inference_attention(model), packed_linears(model, precision):
        for batch_number, start in enumerate(range(0, len(jobs), config.batch_size)):
            batch = jobs[start:start + config.batch_size]
            # Copies of a prompt are neighbours in `jobs`; each distinct prompt gets one prompt pass.
            distinct = {i: row for row, i in enumerate(dict.fromkeys(i for i, _ in batch))}
            prompt_of_row = (None if len(distinct) == len(batch)  # one sample per prompt: nothing to copy
                             else torch.tensor([distinct[i] for i, _ in batch], device=device))
            input_ids, attention_mask = pad_batch([encoded[i] for i in distinct], tokenizer.pad_token_id)
            generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + batch_number)
            decoded = decode(model, input_ids.to(device), attention_mask.to(device), config.max_new_tokens,
                             0.0 if greedy else config.temperature, config.top_p, tokenizer.eos_token_id,
                             tokenizer.pad_token_id, generator, prompt_of_row)
            for (prompt_index, copy), (tokens, has_eos, logprobs) in zip(batch, decoded):
                text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
                results[prompt_index][copy] = Sample(prompt_index, text, tokens, has_eos, logprobs)
            if progress is not None:
                progress(len(batch))
    model.train(was_training)
    return results  # type: ignore[return-value]
