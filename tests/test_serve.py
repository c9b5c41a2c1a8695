"""Chat with and serve a policy: replies as text (stop strings, partial characters, limits), the run
directory's newest policy, the terminal chat, the OpenAI-style API (batching, streaming, seeds, errors)
and its chat page in a real browser."""

import asyncio
import json
import os
import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient
from servers import running_server
from typer.testing import CliRunner

from instrugo import runio
from instrugo.cli import app
from instrugo.generation import SamplingConfig, decode, encode_prompts, pad_batch, sample_responses
from instrugo.runio import InputError
from instrugo.serve import (Batcher, BatchLimits, ChatModel, Job, Reply, ServeConfig, create_app, fitted_history,
                            newest_policy, server_sent_events, stop_prefix_length)

EOS = 0


class BytesTokenizer:
    """Token i is the byte string VOCAB[i]; text is their bytes decoded as UTF-8 (incomplete characters
    become U+FFFD, as real tokenizers decode them)."""

    VOCAB = {0: b"", 1: b"Hel", 2: b"lo", 3: b" ST", 4: b"OP", 5: b" caf", 6: b"\xc3", 7: b"\xa9", 8: b"!"}

    def decode(self, ids, skip_special_tokens=True):
        return b"".join(self.VOCAB[i] for i in ids if i != EOS).decode("utf-8", errors="replace")


def feed(reply: Reply, tokens: list[int]) -> list[str]:
    return [reply.add(token, EOS) for token in tokens]


def test_reply_holds_back_a_possible_stop_string_and_cuts_before_it():
    reply = Reply(BytesTokenizer(), max_tokens=10, stop=["STOP"])
    # "ST" waits: it may be the start of "STOP" (it is).
    assert feed(reply, [1, 2, 3, 4]) == ["Hel", "lo", " ", ""]
    assert reply.text == "Hello " and reply.finish_reason == "stop" and reply.tokens == [1, 2, 3, 4]


def test_reply_releases_a_false_start_of_a_stop_string():
    reply = Reply(BytesTokenizer(), max_tokens=10, stop=["STOP", "lo!"])
    # "l", "lo" might start "lo!" and "ST" "STOP": each waits until the next token shows it does not.
    assert feed(reply, [1, 2, 3, 5, 8]) == ["He", "l", "lo ", "ST caf", "!"]
    assert reply.finish_reason is None and reply.text == "Hello ST caf!"


def test_stop_prefix_length():
    assert [stop_prefix_length(text, ["STOP", "lo!"]) for text in ("", "x", "xS", "xST", "xSTO", "xSTOP", "hel", "hello")] \
        == [0, 0, 1, 2, 3, 0, 1, 2]


def test_reply_waits_for_a_character_split_across_tokens():
    reply = Reply(BytesTokenizer(), max_tokens=10)
    assert feed(reply, [5, 6, 7, 8]) == [" caf", "", "é", "!"]
    assert reply.text == " café!" and reply.finish_reason is None


def test_reply_ends_at_eos_or_its_length_and_releases_what_it_held():
    at_eos = Reply(BytesTokenizer(), max_tokens=10, stop=["STOP"])
    assert feed(at_eos, [1, 2, EOS]) == ["Hel", "lo", ""]
    assert (at_eos.text, at_eos.finish_reason, at_eos.tokens) == ("Hello", "stop", [1, 2, EOS])
    at_length = Reply(BytesTokenizer(), max_tokens=2, stop=["STOP"])
    assert feed(at_length, [1, 2]) == ["Hel", "lo"]
    assert at_length.finish_reason == "length"
    cancelled = Reply(BytesTokenizer(), max_tokens=10)
    cancelled.cancel()
    assert cancelled.finish_reason == "cancelled"


def test_reply_decodes_each_token_once_and_gives_the_text_of_the_whole(tiny_tokenizer, monkeypatch):
    text = "Caf\u00e9s in K\u00f8benhavn \u2014 \u65e5\u672c\u8a9e, emoji \U0001f389\U0001f30d!\n  indented   spaces"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    random_ids = torch.randint(0, len(tiny_tokenizer), (300,), generator=torch.Generator().manual_seed(0)).tolist()
    lengths = []
    real_decode = tiny_tokenizer.decode
    monkeypatch.setattr(tiny_tokenizer, "decode", lambda tokens, **kw: lengths.append(len(tokens)) or real_decode(tokens, **kw))
    for tokens in (ids, random_ids):
        reply = Reply(tiny_tokenizer, max_tokens=len(tokens))
        pieces = feed(reply, tokens)
        whole = real_decode(tokens, skip_special_tokens=True)
        assert reply.text == whole and "".join(pieces) == whole and reply.finish_reason == "length"
    assert real_decode(ids) == text
    assert max(lengths) <= 8  # what each step decodes stays short, however long the reply


def test_decode_ends_the_rows_on_step_names_and_only_those(tiny_model_dir, tiny_tokenizer):
    from instrugo.models import load_causal_lm

    model = load_causal_lm(tiny_model_dir, tiny_tokenizer).eval()
    input_ids, attention_mask = pad_batch(encode_prompts(tiny_tokenizer, ["a", "b c", "d e f"]), tiny_tokenizer.pad_token_id)
    seen: list[list[int]] = []

    def end_row_1_after_two_tokens(live):
        seen.append([row for row, _ in live])
        return [1] if len(seen) == 2 else []

    # An EOS id no token takes, so only the callback and the limit end rows.
    rows = decode(model, input_ids, attention_mask, 6, 0.0, 1.0, -1, tiny_tokenizer.pad_token_id,
                  torch.Generator().manual_seed(0), on_step=end_row_1_after_two_tokens)
    assert [len(row.tokens) for row in rows] == [6, 2, 6]
    assert seen == [[0, 1, 2], [0, 1, 2]] + [[0, 2]] * 4


def test_newest_policy_of_a_run_directory(tmp_path):
    run = tmp_path / "run"
    for stage in ("sft", "round1/ppo", "round1/ppo_ptx", "round2/ppo"):
        (run / stage).mkdir(parents=True)
    with pytest.raises(InputError, match="no finished policy"):
        newest_policy(str(run))
    runio.mark_complete(run / "sft", {})
    assert newest_policy(str(run)) == str(run / "sft")
    runio.mark_complete(run / "round1" / "ppo", {})
    assert newest_policy(str(run)) == str(run / "round1" / "ppo")
    runio.mark_complete(run / "round1" / "ppo_ptx", {})  # the variant later rounds continue comes first
    assert newest_policy(str(run)) == str(run / "round1" / "ppo_ptx")
    runio.mark_complete(run / "round2" / "ppo", {})
    assert newest_policy(str(run)) == str(run / "round2" / "ppo")
    (run / "sft" / "config.json").write_text("{}")  # a model directory is itself, whatever it holds
    assert newest_policy(str(run / "sft")) == str(run / "sft")
    assert newest_policy("tiny") == "tiny"


class CharacterChat:
    """A ChatModel stand-in whose prompt is one token per character of the messages."""

    context = 20

    def encode(self, messages):
        return [0] * sum(len(m["content"]) for m in messages)

    def room(self, prompt):
        return self.context - len(prompt)


def test_fitted_history_leaves_out_the_oldest_pairs_and_keeps_the_newest_message():
    system = [{"role": "system", "content": "ss"}]
    turns = [{"role": r, "content": c} for r, c in
             [("user", "aaaa"), ("assistant", "bbbb"), ("user", "cccc"), ("assistant", "dddd"), ("user", "eeee")]]
    # Context 20: the system message and all five turns take 22 tokens.
    assert fitted_history(CharacterChat(), system, turns[2:], max_new_tokens=6) == ([0] * 14, 0)
    assert fitted_history(CharacterChat(), system, turns, max_new_tokens=6) == ([0] * 14, 2)
    assert fitted_history(CharacterChat(), system, turns, max_new_tokens=7) == ([0] * 6, 4)
    assert fitted_history(CharacterChat(), system, turns, max_new_tokens=15) == ([0] * 6, 4)  # too long: the caller says so


class FakeBatch:
    """What `BatchLimits.joining` reads of a decode: its rows' cache width once prompts join."""

    def __init__(self, used: int = 0, room: int = 0):
        self.used, self.room = used, room

    def width_after_adding(self, prompt_width: int, new_tokens: int) -> int:
        return max(self.used, prompt_width) + max(self.room, new_tokens)


def job(rows=1, temperature=0.0, seed=None, prompt=2, max_tokens=4, loop=None, stream=False):
    return Job([1] * prompt, [Reply(BytesTokenizer(), max_tokens) for _ in range(rows)], temperature, 0.9, seed, stream, loop)


def test_jobs_join_in_arrival_order_within_the_limits_and_a_seeded_one_alone():
    four_rows, empty = BatchLimits(rows=4, cached_tokens=10**6), FakeBatch()
    a, b, c, d = job(2), job(1, temperature=0.7), job(2), job(1)
    assert four_rows.joining(empty, [], [a, b, c, d]) == [a, b]  # c would make 5 rows; d does not overtake it
    assert four_rows.joining(FakeBatch(10, 5), [a], [b, c, d]) == [b]
    seeded, greedy_seeded = job(1, temperature=0.7, seed=5), job(1, seed=5)
    assert (greedy_seeded.top_p, greedy_seeded.seed) == (1.0, None)  # greedy draws nothing: it joins like any greedy job
    assert four_rows.joining(empty, [], [seeded, a]) == [seeded]  # nothing joins a seeded job
    assert four_rows.joining(empty, [seeded], [a]) == []
    assert four_rows.joining(FakeBatch(10, 5), [a], [seeded, b]) == []  # it waits for an empty decode
    assert four_rows.joining(empty, [], [greedy_seeded, a]) == [greedy_seeded, a]
    # Cached tokens: rows x (the wider of the decode's used columns and the new prompts + the longer room).
    short, long_prompt, long_reply = job(1, prompt=10), job(1, prompt=40), job(1, max_tokens=60)
    assert BatchLimits(4, 2 * 44).joining(empty, [], [short, long_prompt]) == [short, long_prompt]
    assert BatchLimits(4, 2 * 44 - 1).joining(empty, [], [short, long_prompt]) == [short]
    assert BatchLimits(4, 3 * (50 + 60)).joining(FakeBatch(50, 8), [short], [long_reply, a]) == [long_reply]
    assert BatchLimits(4, 10**6).fits_alone(job(4)) and not BatchLimits(4, 10**6).fits_alone(job(5))
    assert not BatchLimits(4, 2 * 6 - 1).fits_alone(job(2))


class ImmediateLoop:
    """An event loop stand-in that runs what the decode thread hands it at once."""

    def call_soon_threadsafe(self, callback, *args):
        callback(*args)


def events(job):
    return [job.events.get_nowait() for _ in range(job.events.qsize())]


def tiny_batcher(chat, rows=4, max_queued=8, window_s=0.0, seed=0):
    batcher = Batcher(chat, BatchLimits(rows, 10**6), window_s, seed, max_queued)
    batcher.start()
    return batcher


def chat_job(chat, max_tokens, stream=True):
    prompt = chat.encode([{"role": "user", "content": "Tell me about tennis."}])
    return Job(prompt, [Reply(chat.tokenizer, max_tokens)], 0.0, 1.0, None, stream, ImmediateLoop())


def test_a_request_joins_the_running_decode_and_is_answered_when_its_rows_end(tiny_chat):
    batcher = tiny_batcher(tiny_chat)
    long, short = chat_job(tiny_chat, 200), chat_job(tiny_chat, 3)
    try:
        assert batcher.submit(long)
        deadline = time.monotonic() + 30
        while len(long.replies[0].tokens) < 5 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert batcher.submit(short)
        while not short.answered and time.monotonic() < deadline:
            time.sleep(0.001)
        # `short` joined the running decode and was answered after its 3 tokens, while `long` went on.
        assert events(short)[-1] == ("done",) and len(short.replies[0].tokens) == 3
        assert len(long.replies[0].tokens) > 5 and long.replies[0].finish_reason is None
        while not long.answered and time.monotonic() < deadline:
            time.sleep(0.01)
        assert events(long)[-1] == ("done",) and len(long.replies[0].tokens) == 200
        # One decode: `short`'s tokens were steps `long` took anyway.
        assert (batcher.steps, batcher.rows) == (200, 2)
    finally:
        batcher.stop(timeout_s=10)


def test_a_request_whose_client_left_during_a_step_frees_its_place(tiny_chat, monkeypatch):
    """The only running request is cancelled while the model runs a step: it must leave the running list,
    or the next request (which cannot join beside it: one row at most) would wait forever."""
    from instrugo.generation import DecodeBatch

    batcher = tiny_batcher(tiny_chat, rows=1)
    first, second = chat_job(tiny_chat, 50, stream=False), chat_job(tiny_chat, 3, stream=False)
    real_forward, calls = DecodeBatch.forward, []

    def forward_while_the_client_leaves(self, token):
        calls.append(1)
        if len(calls) == 3:
            first.cancel()
            assert batcher.submit(second)
        return real_forward(self, token)

    monkeypatch.setattr(DecodeBatch, "forward", forward_while_the_client_leaves)
    try:
        assert batcher.submit(first)
        deadline = time.monotonic() + 30
        while not second.answered and time.monotonic() < deadline:
            time.sleep(0.01)
        assert events(second) == [("done",)] and len(second.replies[0].tokens) == 3
        assert first.cancelled and events(first) == [("done",)]
    finally:
        batcher.stop(timeout_s=10)


def test_an_ended_row_leaves_before_its_positions_pass_the_context(tiny_chat, monkeypatch):
    """One row of ten ends (too few to drop at once) with its prompt and reply filling the context: it must
    leave before the next step would give it a position past the context."""
    from instrugo.generation import DecodeBatch

    def ask(content, rows, max_tokens):
        prompt = tiny_chat.encode([{"role": "user", "content": content}])
        return Job(prompt, [Reply(tiny_chat.tokenizer, max_tokens) for _ in range(rows)], 0.0, 1.0, None, False,
                   ImmediateLoop())

    longest, real_forward = [], DecodeBatch.forward

    def recording_forward(self, token):
        longest.append(int(self.next_position.max()))
        return real_forward(self, token)

    monkeypatch.setattr(DecodeBatch, "forward", recording_forward)
    going_on = ask("Hi", 9, 30)
    context = len(going_on.prompt) + 30  # both requests' prompts and replies fill it exactly
    monkeypatch.setattr(tiny_chat, "context", context)
    longer = tiny_chat.encode([{"role": "user", "content": "Tell me all about the history of tennis."}])
    ending = ask("Tell me all about the history of tennis.", 1, context - len(longer))
    assert ending.max_tokens < 30 - 5  # it ends 5 or more steps before the others
    batcher = tiny_batcher(tiny_chat, rows=16, window_s=1.0)  # both join the decode together
    assert batcher.submit(ending) and batcher.submit(going_on)
    try:
        deadline = time.monotonic() + 30
        while not going_on.answered and time.monotonic() < deadline:
            time.sleep(0.01)
        assert events(ending) == events(going_on) == [("done",)]
        assert max(longest) < context
    finally:
        batcher.stop(timeout_s=10)


def test_stopping_fails_the_waiting_requests_and_cancels_the_running_one(tiny_chat):
    batcher = tiny_batcher(tiny_chat, rows=1, max_queued=1)
    first, second, third, fourth = (chat_job(tiny_chat, 2000, stream=False) for _ in range(4))
    assert batcher.submit(first)
    deadline = time.monotonic() + 30
    while not first.replies[0].tokens and time.monotonic() < deadline:
        time.sleep(0.001)
    assert batcher.submit(second)  # it cannot join (one row at most): it waits, out of the queue
    while batcher.jobs.qsize() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert batcher.submit(third) and not batcher.submit(fourth)  # one more may queue; the next gets a 503
    batcher.stop(timeout_s=10)
    assert not batcher.thread.is_alive()
    assert events(second) == events(third) == [("error", "the server is shutting down")]
    assert first.cancelled and events(first) == [("done",)] and len(first.replies[0].tokens) < 2000


def test_cancelled_stream_cancels_its_rows():
    async def first_chunk_then_leave():
        job = Job([1], [Reply(BytesTokenizer(), 4), Reply(BytesTokenizer(), 4)], 0.0, 1.0, None, True,
                  asyncio.get_running_loop())
        events = server_sent_events(job, {"id": "x", "created": 0, "model": "m"})
        assert (await anext(events)).startswith("data: ")
        await events.aclose()
        return [reply.finish_reason for reply in job.replies]

    assert asyncio.run(first_chunk_then_leave()) == ["cancelled", "cancelled"]


@pytest.fixture(scope="module")
def tiny_chat():
    chat = ChatModel("tiny", "fp32")
    yield chat
    chat.close()


MESSAGES = [{"role": "user", "content": "Tell me about tennis."}]


def post(client, **body):
    return client.post("/v1/chat/completions", json={"messages": MESSAGES, **body})


def stream_text(client, **body) -> tuple[str, list[dict]]:
    with client.stream("POST", "/v1/chat/completions", json={"messages": MESSAGES, "stream": True, **body}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"  # no proxy holds the stream back
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    text = "".join(choice["delta"].get("content", "") for chunk in chunks for choice in chunk.get("choices", []))
    return text, chunks


def test_api_answers_as_the_evaluation_samples_and_streams_the_same_text(tiny_chat, tiny_tokenizer):
    with TestClient(create_app(tiny_chat, ServeConfig(policy="tiny"))) as client:
        reply = post(client, max_tokens=12, temperature=1.0, seed=0).json()
        [choice] = reply["choices"]
        assert reply["object"] == "chat.completion" and choice["message"]["role"] == "assistant"
        # A request with seed 0 draws from a generator seeded with 0, as `sample_responses` with seed 0 does
        # for its first batch (seed * 1_000_003 + 0): the same tokens, the same text.
        [[sampled]] = sample_responses(tiny_chat.model, tiny_tokenizer, [MESSAGES], config=SamplingConfig(12, 1.0), seed=0)
        content = choice["message"]["content"]
        assert content.strip() == sampled.text and len(set(content)) > 3
        assert choice["finish_reason"] == ("stop" if sampled.has_eos else "length")
        prompt_tokens = len(encode_prompts(tiny_tokenizer, [MESSAGES])[0])
        assert reply["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": len(sampled.token_ids),
                                  "total_tokens": prompt_tokens + len(sampled.token_ids)}

        text, chunks = stream_text(client, max_tokens=12, temperature=1.0, seed=0, stream_options={"include_usage": True})
        assert text == content
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert chunks[-2]["choices"][0]["finish_reason"] == choice["finish_reason"]
        assert chunks[-1]["usage"] == reply["usage"] and all(c["id"] == chunks[0]["id"] for c in chunks)

        # A stop string from the middle of that response ends it just before, in both forms.
        start = next(i for i in range(len(content) // 2, len(content) - 3) if "\ufffd" not in content[i:i + 3])
        stop = content[start:start + 3]
        cut = post(client, max_tokens=12, temperature=1.0, seed=0, stop=stop).json()["choices"][0]
        assert (cut["message"]["content"], cut["finish_reason"]) == (content[:content.find(stop)], "stop")
        assert stream_text(client, max_tokens=12, temperature=1.0, seed=0, stop=[stop])[0] == cut["message"]["content"]


def test_api_sampling_seeds_and_choices(tiny_chat):
    with TestClient(create_app(tiny_chat, ServeConfig(policy="tiny"))) as client:
        def texts(**body):
            return [c["message"]["content"] for c in post(client, temperature=1.0, max_tokens=8, **body).json()["choices"]]

        assert texts(seed=3) == texts(seed=3) != texts(seed=4)
        three = post(client, temperature=1.0, max_tokens=5, n=3).json()
        assert [c["index"] for c in three["choices"]] == [0, 1, 2]
        assert len({c["message"]["content"] for c in three["choices"]}) > 1
        assert three["usage"]["completion_tokens"] <= 15


def test_api_decodes_concurrent_requests_together(tiny_chat):
    config = ServeConfig(policy="tiny", max_batch_rows=4, batch_window_ms=60_000)
    with TestClient(create_app(tiny_chat, config)) as client:
        replies = [None] * 3
        started = time.monotonic()

        def ask(index):
            replies[index] = client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "word " * (index + 1)}], "max_tokens": 6, "n": 1 + (index == 0)})

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # 4 rows fill the batch: it went without waiting out the 60-second window.
        assert time.monotonic() - started < 30
        assert [r.status_code for r in replies] == [200, 200, 200]
        assert [len(r.json()["choices"]) for r in replies] == [2, 1, 1]
        health = client.get("/health").json()
        assert (health["steps"], health["rows"]) == (6, 4)  # one decode of 4 rows, not three one after another


def test_api_rejects_bad_requests_with_openai_style_errors(tiny_chat, tiny_tokenizer, monkeypatch):
    encoded = []
    real_encode = tiny_chat.encode
    monkeypatch.setattr(tiny_chat, "encode", lambda messages: encoded.append(messages) or real_encode(messages))
    three_rows = 3 * (len(encode_prompts(tiny_tokenizer, [MESSAGES])[0]) + 32)  # of the longest reply
    config = ServeConfig(policy="tiny", api_key="secret", max_new_tokens=32, max_batch_rows=4, max_batch_tokens=three_rows)
    with TestClient(create_app(tiny_chat, config)) as client:
        assert post(client).status_code == 401 and post(client).json()["error"]["type"] == "authentication_error"
        client.headers["Authorization"] = "Bearer wrong"
        assert client.get("/v1/models").status_code == 401
        client.headers["Authorization"] = "Bearer secret"
        assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"

        def refused(status, param, **body):
            response = client.post("/v1/chat/completions", json={"messages": MESSAGES, **body})
            error = response.json()["error"]
            assert response.status_code == status and error["param"] == param, response.json()
            assert error["type"] == "invalid_request_error" and error["message"]
            return error["message"]

        assert "at most 32" in refused(400, "max_tokens", max_tokens=33)
        assert "at most 32" in refused(400, "max_tokens", max_completion_tokens=33)
        assert "context" in refused(400, "messages", messages=[{"role": "user", "content": "x " * 3000}])
        assert "max-batch-tokens" in refused(400, "n", n=4, max_tokens=32)
        assert post(client, n=3, max_tokens=32).status_code == 200
        refused(400, "stop", stop=["a", ""])
        refused(400, "stop", stop=["x" * 257])
        refused(400, "messages", messages=[])
        refused(400, "temperature", temperature=-1)
        refused(400, "n", n=5)
        refused(400, "seed", seed=2**64)  # past what a generator takes: refused, not a dead decode thread
        assert "only text" in refused(400, "messages", messages=[{"role": "user", "content": [{"type": "image_url"}]}])
        assert client.get("/no/such/path").json()["error"]["message"] == "Not Found"
        # OpenAI's other message forms: text parts, a developer message, an assistant turn without content.
        ok = post(client, max_tokens=2, messages=[{"role": "developer", "content": "Be brief."},
                                                   {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                                                   {"role": "assistant", "content": None},
                                                   {"role": "user", "content": "Again"}])
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 2
        assert encoded[-1] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                               {"role": "assistant", "content": ""}, {"role": "user", "content": "Again"}]
        assert client.get("/health").json()["status"] == "ok"  # open: no key needed


def test_a_failing_decode_fails_its_request_and_the_server_goes_on(tiny_chat, monkeypatch):
    from instrugo.generation import DecodeBatch

    with TestClient(create_app(tiny_chat, ServeConfig(policy="tiny"))) as client:
        real = DecodeBatch.forward
        monkeypatch.setattr(DecodeBatch, "forward", lambda *args, **kwargs: 1 / 0)
        failed = post(client, max_tokens=4)
        assert failed.status_code == 500 and "ZeroDivisionError" in failed.json()["error"]["message"]
        assert failed.json()["error"]["type"] == "server_error"
        _, chunks = stream_text(client, max_tokens=4)
        assert "ZeroDivisionError" in chunks[-1]["error"]["message"]
        monkeypatch.setattr(DecodeBatch, "forward", real)
        assert post(client, max_tokens=4).status_code == 200
        assert client.get("/health").json()["status"] == "ok"


def test_a_dead_decode_thread_shows_in_health_and_refuses_requests(tiny_chat):
    app = create_app(tiny_chat, ServeConfig(policy="tiny"))
    with TestClient(app) as client:
        app.state.batcher.jobs.put(None)  # the thread ends as if it had died
        app.state.batcher.thread.join(10)
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "down"
        refused = post(client, max_tokens=2)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
        assert refused.json()["error"]["type"] == "server_error"


def test_a_non_streamed_request_whose_client_left_cancels_its_rows(monkeypatch):
    import instrugo.serve

    monkeypatch.setattr(instrugo.serve, "DISCONNECT_POLL_S", 0.01)

    class LeftRequest:
        async def is_disconnected(self):
            return True

    async def wait_for_nothing():
        job = Job([1], [Reply(BytesTokenizer(), 4)], 0.0, 1.0, None, False, asyncio.get_running_loop())
        return await instrugo.serve.answer(job, LeftRequest()), job.cancelled

    assert asyncio.run(wait_for_nothing()) == (None, True)


def test_unseeded_draws_come_from_the_servers_seed(tiny_chat):
    def sampled(seed):
        with TestClient(create_app(tiny_chat, ServeConfig(policy="tiny", seed=seed))) as client:
            return post(client, temperature=1.0, max_tokens=8).json()["choices"][0]["message"]["content"]

    assert sampled(7) == sampled(7) != sampled(8)
    with pytest.raises(InputError, match="seed"):
        ServeConfig(seed=2**63).validate()


def test_api_streams_each_choice_and_the_usage_when_asked(tiny_chat):
    with TestClient(create_app(tiny_chat, ServeConfig(policy="tiny"))) as client:
        whole = post(client, max_tokens=6, temperature=1.0, seed=9, n=2).json()
        _, chunks = stream_text(client, max_tokens=6, temperature=1.0, seed=9, n=2,
                                stream_options={"include_usage": True})
        for index, choice in enumerate(whole["choices"]):
            text = "".join(c["delta"].get("content", "") for chunk in chunks for c in chunk["choices"] if c["index"] == index)
            assert text == choice["message"]["content"]
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
        _, without = stream_text(client, max_tokens=6, temperature=1.0, seed=9)
        assert all("usage" not in chunk for chunk in without)  # OpenAI sends it only when asked


def test_chat_command_talks_resets_and_exits(tmp_path):
    result = CliRunner().invoke(app, ["chat", "--policy", "tiny", "--max-new-tokens", "4", "--temperature", "1"],
                                input="Hello there\n/reset\nHi again\n/exit\nnever read\n")
    assert result.exit_code == 0, result.output
    assert "chat: tiny" in result.output
    assert result.output.count("assistant> ") == 2 and "(conversation cleared)" in result.output
    assert result.output.count("you> ") == 4  # the line after /exit is never asked for


CHROMIUM = "/usr/bin/chromium"


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium (make browser)")
def test_chat_page_streams_a_reply_and_shows_text_as_text(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    with running_server(["instrugo", "serve", "--policy", "tiny", "--max-new-tokens", "16"], "/health", 120) as (base, _):
        message = 'Hi <img src=x onerror="window.__xss=1">'
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"])
            page = browser.new_page()
            page.goto(base + "/")
            expect(page.locator("#policy")).to_have_text("policy: tiny")
            page.fill("#temperature", "1")  # the tiny model's greedy reply is only newlines
            expect(page.locator("#max-tokens")).to_have_value("16")  # the server's --max-new-tokens, not more
            page.fill("#message", message)
            with page.expect_response("**/v1/chat/completions") as streamed:
                page.press("#message", "Enter")
            expect(page.locator("#send")).to_be_enabled(timeout=60_000)
            events = [line.removeprefix("data: ") for line in streamed.value.text().split("\n") if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            sent = "".join(c["delta"].get("content", "") for e in events[:-1] for c in json.loads(e)["choices"])
            assert len(sent) > 3 and page.text_content(".turn.assistant") == sent
            assert page.text_content(".turn.user") == message
            assert page.locator("#transcript img").count() == 0 and page.evaluate("window.__xss") is None
            page.click("#reset")
            assert page.locator(".turn").count() == 0
            browser.close()
