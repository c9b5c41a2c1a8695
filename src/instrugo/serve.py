"""Step 7, show: chat with a trained policy in the terminal, or serve it over HTTP.

    instrugo chat --policy runs/demo               # the run's newest policy; /reset starts over, /exit ends
    instrugo serve --policy runs/demo --port 8001  # POST /v1/chat/completions (OpenAI's format); a chat page at /

`--policy` takes the directory of an `instrugo run` (which stands for its newest policy: the last round's
PPO-ptx, else its PPO, else the SFT model), a policy directory, 'default', 'tiny' or a .gguf file. Both
commands generate as every stage does (`generation.DecodeBatch`: a KV cache, rows leave the batch when they
end), with the linear weights packed once for the process instead of once per call. Temperature 0 (greedy) by
default: the responses `instrugo eval` judged.

The server decodes on one thread, continuously: requests that arrive while a decode runs join it between
two steps (their prompts go through the model together and their cache is placed beside the others'), as
far as `BatchLimits` allow, and each request is answered as soon as its own rows end. A decode step reads
every weight once whatever the batch, so requests decoded together cost little more than one
(docs/BENCHMARKS.md "Serving"). Requests sampled with a `seed` decode alone, so that the seed decides the
response. With `"stream": true` the text arrives as server-sent events while it is generated; text that may
still turn out to be the start of a `stop` string is held back until it cannot.
"""

# No `from __future__ import annotations`: FastAPI reads the route annotations.
import asyncio
import contextlib
import functools
import json
import logging
import queue
import secrets
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch

from instrugo import models
from instrugo.config import option, require
from instrugo.generation import DecodeBatch, decode, encode_prompts, next_tokens, pad_batch
from instrugo.runio import InputError, is_complete

log = logging.getLogger(__name__)
PAGE = Path(__file__).parent / "chat_page"
# The page's text comes from a model: scripts and styles only from this origin, so injected markup stays inert.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; object-src 'none'; "
                                           "base-uri 'none'; frame-ancestors 'none'", "X-Content-Type-Options": "nosniff"}
POLICY_HELP = ("Policy: an `instrugo run` directory (its newest policy), a policy directory, 'default', 'tiny' "
               "or a .gguf file.")


@dataclass
class GenerationSettings:
    """What both commands share: the policy and how it samples."""

    policy: str = option("runs/demo", POLICY_HELP)
    max_new_tokens: int = option(256, "Reply length limit in tokens (the server's default and largest max_tokens).")
    temperature: float = option(0.0, "Sampling temperature (0 = greedy, as `instrugo eval` judged the policies).")
    top_p: float = option(1.0, "Nucleus sampling threshold.")
    precision: str = option("auto", "auto (probe bf16 speed), bf16 or fp32.")
    seed: int = option(0, "Sampling seed.")

    def validate(self) -> None:
        require(self.max_new_tokens > 0, "max_new_tokens", "must be positive")
        require(self.temperature >= 0, "temperature", "must be at least 0")
        require(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        require(0 <= self.seed < 2**63, "seed", "must be in [0, 2**63)")


@dataclass
class ChatConfig(GenerationSettings):
    """Chat with a policy in the terminal."""

    system: str = option("", "System message ('' = the chat template's own).")


@dataclass
class ServeConfig(GenerationSettings):
    """Serve a policy over HTTP: OpenAI's chat-completions API and a chat page."""

    host: str = option("127.0.0.1", "Interface to listen on (0.0.0.0 for all).")
    port: int = option(8001, "TCP port.")
    max_batch_rows: int = option(32, "Most rows (responses) decoded together.")
    max_batch_tokens: int = option(32768, "Most cached tokens in the decode, rows x (oldest row's prompt and reply so "
                                          "far + room for the longest reply): bounds its KV cache (~1.5 GB for the "
                                          "default model in fp32).")
    max_queued: int = option(256, "Requests waiting beyond this get 503 (try again).")
    batch_window_ms: float = option(20.0, "How long a request that finds nothing decoding waits for others to share "
                                          "its prompt pass.")
    api_key: str = option("", "Require `Authorization: Bearer KEY` on the API ('' = open; set it before "
                              "listening beyond this machine).")

    def validate(self) -> None:
        super().validate()
        require(self.max_batch_rows >= 1, "max_batch_rows", "must be at least 1")
        require(self.max_batch_tokens >= 1, "max_batch_tokens", "must be at least 1")
        require(self.max_queued >= 1, "max_queued", "must be at least 1")
        require(self.batch_window_ms >= 0, "batch_window_ms", "must be at least 0")
        require(0 < self.port < 65536, "port", "must be 1..65535")


def newest_policy(policy: str) -> str:
    """The policy a `--policy` value names: an `instrugo run` directory stands for its newest complete
    policy (last round first; in a round PPO-ptx, the variant later rounds continue, then PPO; else SFT).
    Anything else is returned as it is."""
    path = Path(policy)
    if (path / "config.json").exists() or not (path / "sft").is_dir():
        return policy
    from instrugo.pipeline import VARIANTS, RunConfig

    order = list(dict.fromkeys(RunConfig().variants + list(VARIANTS)))
    rounds = sorted((int(p.name[5:]), p) for p in path.glob("round*") if p.name[5:].isdigit())
    for _, round_dir in reversed(rounds):
        for variant in order:
            if is_complete(round_dir / variant):
                return str(round_dir / variant)
    if is_complete(path / "sft"):
        return str(path / "sft")
    raise InputError(path, "a run directory with no finished policy yet (sft/ or roundN/ppo*/)")


def stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """How many of `text`'s last characters some stop string begins with (0: none), e.g. 2 for "...ST"
    and "STOP": text that may still turn out to be part of a stop string."""
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest


class Reply:
    """One generated response as text: decoded as its tokens arrive, ended by EOS, by its first `stop`
    string (cut before it) or by `max_tokens`, and released in pieces that end neither inside a character
    nor inside what may still become a stop string.

    Each token decodes only the few tokens since the last complete character, read after the one or two
    tokens before them (so that tokenizers which drop a word's leading space at the start of a text still
    place it): a step costs the same at the 4,000th token as at the 4th, where decoding the whole response
    again would grow with its length."""

    def __init__(self, tokenizer, max_tokens: int, stop: Sequence[str] = ()):
        self.tokenizer, self.max_tokens, self.stop = tokenizer, max_tokens, tuple(stop)
        self.tokens: list[int] = []  # as sampled, EOS included
        self.text = ""
        self.released = 0            # characters of `text` already released
        self.finish_reason: str | None = None  # "stop", "length", "cancelled" (client left), "interrupted" (Ctrl-C)
        self._settled = ""           # the text of tokens[:_read], which ends with a complete character
        self._context = self._read = 0  # tokens[_context:_read] are decoded again before the new ones

    def _decoded(self) -> str:
        """All tokens' text (a trailing U+FFFD while a character's bytes are still coming)."""
        decode = functools.partial(self.tokenizer.decode, skip_special_tokens=True)
        before = decode(self.tokens[self._context:self._read])
        after = decode(self.tokens[self._context:])
        text = self._settled + after[len(before):]
        if not after.endswith("\ufffd"):
            self._settled, self._context, self._read = text, self._read, len(self.tokens)
        return text

    def add(self, token: int, eos_id: int) -> str:
        """Take the next sampled token; return the text it releases (often '')."""
        self.tokens.append(token)
        if token == eos_id:
            self.finish_reason = "stop"
        else:
            seen = len(self.text.rstrip("\ufffd"))  # no stop string ends within it: the reply would have ended
            text = self._decoded()
            cut = min((i for i in (text.find(s, max(0, seen - len(s) + 1)) for s in self.stop) if i >= 0), default=-1)
            self.text = text if cut < 0 else text[:cut]
            if cut >= 0:
                self.finish_reason = "stop"
            elif len(self.tokens) >= self.max_tokens:
                self.finish_reason = "length"
        end = len(self.text)
        if self.finish_reason is None:  # a trailing U+FFFD is a character whose bytes have not all come yet
            end = len(self.text.rstrip("\ufffd"))
            end -= stop_prefix_length(self.text[:end], self.stop)
        piece = self.text[self.released:end]
        self.released = max(self.released, end)
        return piece

    def cancel(self) -> None:
        """Stop generating this row at the next step (its client went away)."""
        if self.finish_reason is None:
            self.finish_reason = "cancelled"


class ChatModel:
    """A policy ready to generate: its tokenizer, its weights on the device in fp32 with the linear layers
    packed for the process's lifetime (`close` unpacks them), and the precision the probe picked."""

    def __init__(self, policy: str, precision: str = "auto"):
        self.path = newest_policy(policy)
        self.precision = models.setup_compute(precision)
        self.tokenizer = models.load_tokenizer(self.path)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = models.load_causal_lm(self.path, self.tokenizer).eval().to(self.device)
        self.context = getattr(self.model.config, "max_position_embeddings", None) or 2048
        self._packed = contextlib.ExitStack()
        self._packed.enter_context(models.inference_attention(self.model))
        self._packed.enter_context(models.packed_linears(self.model, self.precision))

    def close(self) -> None:
        self._packed.close()

    def encode(self, messages: list[dict]) -> list[int]:
        return encode_prompts(self.tokenizer, [messages])[0]

    def room(self, prompt: list[int]) -> int:
        """How many tokens fit after `prompt` in the model's context."""
        return self.context - len(prompt)

    def generate(self, prompt: list[int], reply: Reply, temperature: float, top_p: float, generator: torch.Generator,
                 on_text: Callable[[str], None]) -> None:
        """Decode `reply` to `prompt` alone, giving `on_text` the text each token releases."""
        eos_id = self.tokenizer.eos_token_id

        def take(live: list[tuple[int, int]]) -> list[int]:
            for _, token in live:
                if reply.finish_reason is None and (piece := reply.add(token, eos_id)):
                    on_text(piece)
            return [0] if reply.finish_reason is not None else []

        input_ids, attention_mask = pad_batch([prompt], self.tokenizer.pad_token_id)
        with models.autocast(self.precision):
            decode(self.model, input_ids.to(self.device), attention_mask.to(self.device), reply.max_tokens,
                   temperature, top_p, eos_id, self.tokenizer.pad_token_id, generator, on_step=take)


# ---------------------------------------------------------------------------------------------------
# The terminal chat


def fitted_history(chat: ChatModel, system: list[dict], turns: list[dict], max_new_tokens: int) -> tuple[list[int], int]:
    """The prompt for the conversation so far, and how many of its oldest turns were left out so that it
    and a reply of `max_new_tokens` fit the context (user/assistant pairs go together; the newest user
    turn always stays)."""
    dropped = 0
    while True:
        prompt = chat.encode(system + turns[dropped:])
        if chat.room(prompt) >= max_new_tokens or dropped >= len(turns) - 1:
            return prompt, dropped
        dropped += 2


def run_chat(config: ChatConfig) -> None:
    chat = ChatModel(config.policy, config.precision)
    generator = torch.Generator(device=chat.device).manual_seed(config.seed)
    system = [{"role": "system", "content": config.system}] if config.system else []
    mode = "greedy" if config.temperature <= 0 else f"temperature {config.temperature}, top-p {config.top_p}"
    print(f"chat: {chat.path} ({mode}, up to {config.max_new_tokens} tokens; precision "
          f"{models.describe_precision(chat.precision)}). /reset starts over, /exit or Ctrl-D ends.")
    turns: list[dict] = []
    try:
        while True:
            try:
                line = input("you> ").strip()
            except (EOFError, KeyboardInterrupt):
                print()
                return
            if line in ("/exit", "/quit"):
                return
            if line == "/reset":
                turns = []
                print("(conversation cleared)")
                continue
            if not line:
                continue
            turns.append({"role": "user", "content": line})
            prompt, dropped = fitted_history(chat, system, turns, config.max_new_tokens)
            room = chat.room(prompt)
            if room <= 0:
                turns.pop()
                print(f"(that message alone is {len(prompt)} tokens, the model's context {chat.context})")
                continue
            if dropped:
                turns = turns[dropped:]
                print(f"(the oldest {dropped} messages no longer fit the context; left out)")
            reply = Reply(chat.tokenizer, min(config.max_new_tokens, room))
            print("assistant> ", end="", flush=True)
            try:
                chat.generate(prompt, reply, config.temperature, config.top_p, generator,
                              on_text=lambda piece: print(piece, end="", flush=True))
            except KeyboardInterrupt:  # Ctrl-C stops this reply; the conversation goes on
                reply.finish_reason = "interrupted"
            print({"length": " [cut at --max-new-tokens]", "interrupted": " [stopped]"}.get(reply.finish_reason, ""))
            turns.append({"role": "assistant", "content": reply.text})
    finally:
        chat.close()


# ---------------------------------------------------------------------------------------------------
# The HTTP server

# How often a handler waiting for a non-streamed answer checks whether its client is still there.
DISCONNECT_POLL_S = 0.5
# Longest stop string: each step checks every reply's text end against each stop's beginnings.
MAX_STOP_CHARACTERS = 256


class Job:
    """A request in the decode queue: its prompt, one Reply per choice (all with the same max_tokens), and
    the event queue its handler reads, filled from the decode thread through the handler's event loop."""

    def __init__(self, prompt: list[int], replies: list[Reply], temperature: float, top_p: float,
                 seed: int | None, stream: bool, loop):
        self.prompt, self.replies, self.stream = prompt, replies, stream
        self.temperature, self.top_p = temperature, (top_p if temperature > 0 else 1.0)
        self.seed = seed if temperature > 0 else None  # greedy decoding draws nothing
        self.max_tokens = replies[0].max_tokens
        self.loop, self.events = loop, asyncio.Queue()
        self.generator: torch.Generator | None = None  # a seeded job's own, from when it joins the decode
        self.answered = False  # "done" or "error" sent

    def send(self, event: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the handler's event loop has closed: nobody is waiting
            pass

    def end(self, event: tuple) -> None:
        """Answer the request ("done" or "error"), once."""
        if not self.answered:
            self.send(event)
            self.answered = True

    def cancel(self) -> None:
        for reply in self.replies:
            reply.cancel()

    @property
    def cancelled(self) -> bool:
        return all(reply.finish_reason == "cancelled" for reply in self.replies)

    @property
    def finished(self) -> bool:
        return all(reply.finish_reason is not None for reply in self.replies)

    def sampling_key(self) -> tuple:
        """Rows with equal keys draw their tokens together; a seeded job's rows draw from its own generator."""
        return (self.temperature, self.top_p, id(self) if self.seed is not None else None)


@dataclass
class BatchLimits:
    """What the running decode may hold: rows, and cached tokens (rows x the cache's width: the columns
    from the oldest row's first prompt token to the end of the room kept for the longest reply)."""

    rows: int
    cached_tokens: int

    def holds(self, rows: int, width: int) -> bool:
        """Whether a decode of `rows` rows with caches `width` columns wide is within the limits."""
        return rows <= self.rows and rows * width <= self.cached_tokens

    def fits_alone(self, job: Job) -> bool:
        return self.holds(len(job.replies), len(job.prompt) + job.max_tokens)

    def joining(self, batch: DecodeBatch, running: list[Job], waiting: Sequence[Job]) -> list[Job]:
        """The first waiting jobs, in arrival order, that join `batch` (which holds `running`'s rows) now.
        A seeded job decodes alone, so that its seed decides its response: it joins only an empty batch,
        and nothing joins it."""
        if any(job.seed is not None for job in running):
            return []
        rows, joining = sum(len(job.replies) for job in running), []
        for job in waiting:
            if job.seed is not None and (rows or joining):
                break
            candidates = joining + [job]
            width = batch.width_after_adding(max(len(j.prompt) for j in candidates), max(j.max_tokens for j in candidates))
            if not self.holds(rows + len(job.replies), width):
                break
            joining, rows = candidates, rows + len(job.replies)
            if job.seed is not None:
                break
        return joining


class Batcher:
    """The one thread that decodes, continuously: between two decode steps the requests that came meanwhile
    join the running decode (one prompt pass for them all, their cache placed beside the others'), as far
    as `BatchLimits` allow, and a request leaves as soon as its own rows end. So a request waits for one
    step, not for the decode it arrives during. When nothing is decoding, the first request waits up to the
    window for others to share its prompt pass. A failing step fails the requests in the decode, never the
    thread. Counts what it ran, for /health."""

    def __init__(self, chat: ChatModel, limits: BatchLimits, window_s: float, seed: int, max_queued: int):
        self.chat, self.limits, self.window_s = chat, limits, window_s
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queued)
        self.generator = torch.Generator(device=chat.device).manual_seed(seed)  # the unseeded requests' draws
        self.steps = self.rows = 0
        self.closing = False
        self.running: list[Job] = []
        self.lock = threading.Lock()  # `closing` and `running` change together: no job starts unseen by stop()
        self.thread = threading.Thread(target=self._work, name="instrugo-decode", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> bool:
        """Queue `job`; False when the queue is full or nothing will decode it (stopping, or the thread died)."""
        with self.lock:  # stop() drains the queue after setting `closing`: nothing may slip in behind it
            if self.closing or not self.thread.is_alive():
                return False
            try:
                self.jobs.put_nowait(job)
                return True
            except queue.Full:
                return False

    def stop(self, timeout_s: float = 30.0) -> None:
        """Fail the queued requests, cancel the running ones, and end the thread."""
        with self.lock:
            self.closing = True
            running = list(self.running)
        for job in running:
            job.cancel()
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.end(("error", "the server is shutting down"))
        self.jobs.put(None)
        self.thread.join(timeout_s)

    def _arrivals(self, waiting: deque, idle: bool) -> bool:
        """Move queued jobs to `waiting`, at most as many rows as a decode holds (the rest stay queued, where
        `max_queued` bounds them). Idle, wait for a first job and then up to the window for others. Returns
        whether to stop."""
        deadline = None
        while sum(len(job.replies) for job in waiting) < self.limits.rows:
            try:
                if idle and not waiting:
                    job = self.jobs.get()
                    deadline = time.monotonic() + self.window_s
                elif deadline is not None and (remaining := deadline - time.monotonic()) > 0:
                    job = self.jobs.get(timeout=remaining)
                else:
                    job = self.jobs.get_nowait()
            except queue.Empty:
                return False
            if job is None:
                return True
            if not job.cancelled:  # its client left while it queued
                waiting.append(job)
        return False

    def _work(self) -> None:
        waiting: deque[Job] = deque()
        batch, owners, logits = DecodeBatch(self.chat.model), [], None  # owners[r]: (job, choice) of batch row r
        with torch.no_grad(), models.autocast(self.chat.precision):
            while True:
                if self._arrivals(waiting, idle=not owners) or self.closing:
                    with self.lock:
                        for job in waiting:
                            job.end(("error", "the server is shutting down"))
                        for job in self.running:  # cancelled by stop(), or the thread is ending anyway
                            job.cancel()
                            job.end(("done",))
                    return
                try:
                    batch, owners, logits = self._join(batch, owners, logits, waiting)
                    if owners:
                        logits = self._step(batch, owners, logits)
                except Exception as error:  # these requests fail; the server goes on
                    batch, owners, logits = self._fail(error)

    def _join(self, batch: DecodeBatch, owners: list, logits, waiting: deque):
        """Drop the rows that have ended, then add the waiting jobs that fit."""
        self._answer_finished()  # after the last step; a client may also have left during it
        for job in [job for job in waiting if job.cancelled]:  # its client left while it waited
            waiting.remove(job)

        def joining() -> list[Job]:
            return self.limits.joining(batch, self.running, waiting) if batch.joinable or not owners else []

        candidates = joining()
        ended = [row for row, (job, choice) in enumerate(owners) if job.replies[choice].finish_reason is not None]
        # Dropping copies the cache, so rows leave in groups; and before an ended row's positions pass the context
        # (a live row's never do: its prompt and reply fit).
        if ended and (candidates or len(ended) * 8 >= len(owners) or int(batch.next_position.max()) >= self.chat.context):
            if len(ended) == len(owners):
                batch, owners, logits = DecodeBatch(self.chat.model), [], None
            else:
                kept = [row for row in range(len(owners)) if row not in set(ended)]
                batch.keep(torch.tensor(kept, device=self.chat.device))
                owners, logits = [owners[row] for row in kept], logits[kept]
            candidates = joining()
        if not candidates:
            return batch, owners, logits
        with self.lock:
            if self.closing:  # stop() has run or is running: these never start
                return batch, owners, logits
            for _ in candidates:
                waiting.popleft()
            self.running = self.running + candidates
        for job in candidates:
            if job.seed is not None:
                job.generator = torch.Generator(device=self.chat.device).manual_seed(job.seed)
        prompt_of_row = [index for index, job in enumerate(candidates) for _ in job.replies]
        input_ids, attention_mask = pad_batch([job.prompt for job in candidates], self.chat.tokenizer.pad_token_id)
        one_row_per_prompt = prompt_of_row == list(range(len(candidates)))
        new_logits = batch.add(input_ids.to(self.chat.device), attention_mask.to(self.chat.device),
                               max(job.max_tokens for job in candidates),
                               None if one_row_per_prompt else torch.tensor(prompt_of_row, device=self.chat.device))
        owners = owners + [(job, choice) for job in candidates for choice in range(len(job.replies))]
        self.rows += len(prompt_of_row)
        return batch, owners, (new_logits if logits is None else torch.cat([logits, new_logits]))

    def _step(self, batch: DecodeBatch, owners: list, logits: torch.Tensor) -> torch.Tensor:
        """Draw each row's next token, give it to its reply, and run the model on the tokens of the batch;
        returns the next logits. (The jobs whose rows have all ended are answered by the next `_join`.)"""
        groups: dict[tuple, list[int]] = {}
        for row, (job, _) in enumerate(owners):
            groups.setdefault(job.sampling_key(), []).append(row)
        token = torch.empty(len(owners), dtype=torch.long, device=logits.device)
        for rows in groups.values():
            job = owners[rows[0]][0]
            index = torch.tensor(rows, device=logits.device)
            token[index] = next_tokens(logits[index], job.temperature, job.top_p, job.generator or self.generator,
                                       banned=self.chat.tokenizer.pad_token_id)[0]
        eos_id = self.chat.tokenizer.eos_token_id
        for (job, choice), value in zip(owners, token.tolist()):
            reply = job.replies[choice]
            if reply.finish_reason is None:
                piece = reply.add(value, eos_id)
                if piece and job.stream:
                    job.send(("text", choice, piece))
        self.steps += 1
        if all(job.replies[choice].finish_reason is not None for job, choice in owners):
            return logits  # nothing left to decode; the next `_join` empties the batch
        return batch.forward(token)

    def _answer_finished(self) -> None:
        """Answer the running jobs whose rows have all ended (EOS, stop, length, or their client left): a
        request is answered when its rows are, not when the batch is."""
        with self.lock:
            answered = [job for job in self.running if job.finished]
            self.running = [job for job in self.running if job not in answered]
        for job in answered:
            job.end(("done",))

    def _fail(self, error: Exception):
        """A failed step fails the requests in the decode; the thread goes on with an empty one."""
        log.exception("decode failed")
        with self.lock:
            failed, self.running = self.running, []
        for job in failed:
            job.cancel()
            job.end(("error", f"generation failed: {type(error).__name__}: {error}"))
        return DecodeBatch(self.chat.model), [], None


def message_text(content: str | list[dict] | None) -> str:
    """A message's content as text: a string, a list of text parts (joined by newlines), or none. Other
    parts (images, audio) are a ValueError: this is a text model."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = [part.get("text") for part in content if part.get("type") == "text"]
    if len(texts) < len(content) or not all(isinstance(text, str) for text in texts):
        raise ValueError("only text parts ({\"type\": \"text\", \"text\": ...}) are supported")
    return "\n".join(texts)


def create_app(chat: ChatModel, config: ServeConfig):
    """The ASGI app (`instrugo serve` runs it with uvicorn; tests call it directly). Starts the decode thread
    on startup and stops it on shutdown. Errors come in OpenAI's shape: {"error": {"message", "type", ...}}."""
    from fastapi import Depends, FastAPI, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from pydantic import BaseModel, Field
    from starlette.exceptions import HTTPException as StarletteHTTPException

    limits = BatchLimits(config.max_batch_rows, config.max_batch_tokens)
    batcher = Batcher(chat, limits, config.batch_window_ms / 1000, config.seed, config.max_queued)
    model_name = chat.path

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:
            await asyncio.to_thread(batcher.stop)

    app = FastAPI(title="instrugo", lifespan=lifespan)
    app.state.batcher = batcher
    bearer = HTTPBearer(auto_error=False)

    def error(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
        kind = "server_error" if status >= 500 else "authentication_error" if status == 401 else "invalid_request_error"
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                            status_code=status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception):
        log.exception("request failed")
        return error(500, f"{type(exc).__name__}: {exc}")

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first.get("loc", ())[1:])
        return error(400, f"{param}: {first.get('msg')}" if param else str(first.get("msg")), param or None)

    def authorized(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if config.api_key and (credentials is None
                               or not secrets.compare_digest(credentials.credentials.encode(), config.api_key.encode())):
            raise HTTPException(401, "missing or wrong API key (Authorization: Bearer KEY)")

    class Message(BaseModel):
        role: Literal["system", "developer", "user", "assistant"]
        content: str | list[dict] | None = None

    class StreamOptions(BaseModel):
        include_usage: bool = False

    class ChatRequest(BaseModel):
        """OpenAI's chat-completions request; fields it has and this server does not use are ignored."""

        model: str | None = None
        messages: list[Message] = Field(min_length=1)
        temperature: float | None = Field(None, ge=0, le=2)
        top_p: float | None = Field(None, gt=0, le=1)
        max_tokens: int | None = Field(None, ge=1)
        max_completion_tokens: int | None = Field(None, ge=1)
        n: int = Field(1, ge=1, le=config.max_batch_rows)
        stop: str | list[str] | None = None
        seed: int | None = Field(None, ge=-2**63, lt=2**64)  # what torch.Generator.manual_seed takes
        stream: bool = False
        stream_options: StreamOptions | None = None

    @app.get("/")
    def page():
        return FileResponse(PAGE / "index.html", headers=PAGE_HEADERS)

    @app.get("/chat.js")
    def page_script():
        return FileResponse(PAGE / "chat.js", media_type="text/javascript", headers=PAGE_HEADERS)

    @app.get("/chat.css")
    def page_style():
        return FileResponse(PAGE / "chat.css", media_type="text/css", headers=PAGE_HEADERS)

    @app.get("/health")
    def health():
        alive = batcher.thread.is_alive()
        return JSONResponse({"status": "ok" if alive else "down", "policy": model_name, "steps": batcher.steps,
                             "rows": batcher.rows, "queued": batcher.jobs.qsize(), "max_new_tokens": config.max_new_tokens},
                            status_code=200 if alive else 503)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    def list_models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "instrugo"}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatRequest, request: Request):
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or not all(0 < len(text) <= MAX_STOP_CHARACTERS for text in stop):
            return error(400, f"stop: at most 4 strings of 1..{MAX_STOP_CHARACTERS} characters", "stop")
        wanted = body.max_completion_tokens or body.max_tokens
        if wanted is not None and wanted > config.max_new_tokens:
            return error(400, f"max_tokens: at most {config.max_new_tokens} on this server (--max-new-tokens)",
                         "max_tokens")
        try:
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": message_text(m.content)}
                        for m in body.messages]
        except ValueError as failure:
            return error(400, f"messages: {failure}", "messages")
        try:  # off the event loop: a long conversation takes a while to tokenize
            prompt = await asyncio.to_thread(chat.encode, messages)
        except Exception as failure:  # a chat template may reject a conversation (e.g. roles out of order)
            return error(400, f"messages: the chat template refused them: {failure}", "messages")
        max_tokens = wanted or config.max_new_tokens
        if len(prompt) + max_tokens > chat.context:
            return error(400, f"messages: {len(prompt)} tokens, plus {max_tokens} for the reply, are more than "
                              f"the model's context of {chat.context} tokens", "messages")
        temperature = config.temperature if body.temperature is None else body.temperature
        top_p = config.top_p if body.top_p is None else body.top_p
        replies = [Reply(chat.tokenizer, max_tokens, stop) for _ in range(body.n)]
        job = Job(prompt, replies, temperature, top_p, body.seed, body.stream, asyncio.get_running_loop())
        if not limits.fits_alone(job):
            return error(400, f"n x (prompt + max_tokens) = {body.n} x {len(prompt) + max_tokens} tokens is more "
                              f"than one decode holds here (--max-batch-tokens {config.max_batch_tokens})", "n")
        if not batcher.submit(job):
            return error(503, "the server is busy or stopping; try again shortly", headers={"Retry-After": "5"})
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(server_sent_events(job, head, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        event = await answer(job, request)
        if event is None:
            return Response(status_code=499)  # nobody is there to read it
        if event[0] == "error":
            return error(500, event[1])
        return {**head, "object": "chat.completion",
                "choices": [{"index": i, "message": {"role": "assistant", "content": reply.text},
                             "finish_reason": reply.finish_reason} for i, reply in enumerate(replies)],
                "usage": usage(job)}

    return app


async def answer(job: Job, request) -> tuple | None:
    """The event that ends a non-streamed job ("done" or "error"), or None if its client left first (then
    its rows are cancelled: the decode stops spending steps on them)."""
    getter = asyncio.ensure_future(job.events.get())
    try:
        while not (await asyncio.wait({getter}, timeout=DISCONNECT_POLL_S))[0]:
            if await request.is_disconnected():
                job.cancel()
                return None
        return getter.result()
    except asyncio.CancelledError:  # the handler itself was cancelled (a forced shutdown)
        job.cancel()
        raise
    finally:
        getter.cancel()


def usage(job: Job) -> dict:
    completion = sum(len(reply.tokens) for reply in job.replies)
    return {"prompt_tokens": len(job.prompt), "completion_tokens": completion,
            "total_tokens": len(job.prompt) + completion}


async def server_sent_events(job: Job, head: dict, include_usage: bool = False):
    """OpenAI's stream: a chunk opening each choice, chunks of text as it comes, a chunk per choice with its
    finish reason, with `include_usage` one with the usage, then [DONE]. A client that leaves (the response
    is cancelled) cancels the job's rows."""
    def chunk(choices: list[dict], **extra) -> str:
        return f"data: {json.dumps({**head, 'object': 'chat.completion.chunk', 'choices': choices, **extra})}\n\n"

    finished = False
    try:
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                     for i in range(len(job.replies))])
        while True:
            event = await job.events.get()
            if event[0] == "text":
                yield chunk([{"index": event[1], "delta": {"content": event[2]}, "finish_reason": None}])
                continue
            finished = True
            if event[0] == "error":
                yield f"data: {json.dumps({'error': {'message': event[1], 'type': 'server_error'}})}\n\n"
            else:
                yield chunk([{"index": i, "delta": {}, "finish_reason": reply.finish_reason}
                             for i, reply in enumerate(job.replies)])
                if include_usage:
                    yield chunk([], usage=usage(job))
            yield "data: [DONE]\n\n"
            return
    finally:
        if not finished:
            job.cancel()


def run_serve(config: ServeConfig) -> None:
    import uvicorn

    chat = ChatModel(config.policy, config.precision)
    print(f"serve: {chat.path} at http://{config.host}:{config.port}/ (chat page), API: POST "
          f"/v1/chat/completions; precision {models.describe_precision(chat.precision)}"
          + ("" if config.api_key else "; no API key set"), file=sys.stderr)
    try:
        uvicorn.run(create_app(chat, config), host=config.host, port=config.port, log_level="warning",
                    timeout_graceful_shutdown=10)
    finally:
        chat.close()
