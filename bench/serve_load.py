"""`instrugo serve` under load: what decoding concurrent requests together buys. The default policy is
served once per setting of `--max-batch-rows` per round, alternating (default: 1, every request decoded
alone in arrival order, and CLIENTS; the default window of 20 ms). Each time, after one warm-up request,
CLIENTS clients (threads released together) each stream REQUESTS greedy requests one after the other (a
different `eval`-split prompt each, at most MAX_TOKENS tokens), then one client asks alone. Prints, per
setting, the medians over rounds of: the wall time until every client has all its answers, the tokens per
second that makes (completion tokens of all answers / wall time), the median request's latency and time to
first text, and the lone request's latency; and the server's /health counters.
Usage: .venv/bin/python bench/serve_load.py [--clients 8] [--requests 3] [--max-tokens 64] [--rounds 2]
       [--batch-rows 1 8] [--out FILE.json]"""
import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx

from instrugo.data import load_split

parser = argparse.ArgumentParser()
parser.add_argument("--clients", type=int, default=8)
parser.add_argument("--requests", type=int, default=3)
parser.add_argument("--max-tokens", type=int, default=64)
parser.add_argument("--rounds", type=int, default=2)
parser.add_argument("--batch-rows", type=int, nargs="+", help="--max-batch-rows settings (default: 1 and CLIENTS)")
parser.add_argument("--out", default="")
args = parser.parse_args()
PROMPTS = [record["prompt"] for record in load_split("eval")[:args.clients * args.requests + 1]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ask(base: str, prompt: str) -> dict:
    """One streamed greedy request: seconds to the first text and to the end, completion tokens, the text."""
    started, first, tokens, text = time.perf_counter(), None, None, ""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": args.max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            piece = "".join(c["delta"].get("content", "") for c in chunk["choices"])
            if first is None and piece:
                first = time.perf_counter() - started
            text += piece
            if "usage" in chunk:
                tokens = chunk["usage"]["completion_tokens"]
    if tokens is None:
        raise SystemExit(f"no usage chunk in the answer to {prompt!r}")
    return {"first_text_s": first, "latency_s": time.perf_counter() - started, "tokens": tokens, "prompt": prompt,
            "text": text}


def serve_and_load(rows: int) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "instrugo", "serve", "--policy", "default", "--port", str(port),
                               "--max-batch-rows", str(rows)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                httpx.get(base + "/health", timeout=1)
                break
            except httpx.TransportError:
                if server.poll() is not None:
                    raise SystemExit("the server did not start")
                time.sleep(0.5)
        ask(base, PROMPTS[-1])  # warm-up
        results: list[dict] = []
        together = threading.Barrier(args.clients)

        def client(index: int) -> None:
            together.wait()
            for request in range(args.requests):
                results.append(ask(base, PROMPTS[index * args.requests + request]))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
        alone = ask(base, PROMPTS[0])
        health = httpx.get(base + "/health").json()
        tokens = sum(r["tokens"] for r in results)
        return {"max_batch_rows": rows, "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
                "median_latency_s": statistics.median(r["latency_s"] for r in results),
                "median_first_text_s": statistics.median(r["first_text_s"] or r["latency_s"] for r in results),
                "alone_latency_s": alone["latency_s"], "alone_tokens": alone["tokens"],
                "health": {k: v for k, v in health.items() if isinstance(v, int)},
                "texts": {r["prompt"]: r["text"] for r in results}}
    finally:
        server.terminate()
        server.wait(timeout=30)


runs: dict[int, list[dict]] = {rows: [] for rows in args.batch_rows or (1, args.clients)}
for round_index in range(args.rounds):
    for rows in runs:
        runs[rows].append(serve_and_load(rows))
        print(json.dumps({k: v for k, v in runs[rows][-1].items() if k != "texts"}), flush=True)

print(f"\n{args.clients} clients x {args.requests} requests, greedy, at most {args.max_tokens} tokens each; "
      f"medians of {args.rounds} rounds")
print("| max_batch_rows | all answered | tokens/s | median latency | median first text | one request alone | /health |")
print("|---|---|---|---|---|---|---|")
for rows, results in runs.items():
    def median(key):
        return statistics.median(r[key] for r in results)
    print(f"| {rows} | {median('wall_s'):.1f} s | {median('tokens_per_s'):.1f} | {median('median_latency_s'):.1f} s "
          f"| {median('median_first_text_s'):.2f} s | {median('alone_latency_s'):.1f} s | "
          f"{'; '.join(json.dumps(r['health']) for r in results)} |")
# Greedy answers should not depend on what else was decoded alongside (up to the last bits of fp arithmetic).
first_setting = next(iter(runs))
for rows, results in runs.items():
    same = [sum(r["texts"][p] == runs[first_setting][0]["texts"][p] for p in r["texts"]) for r in results]
    print(f"max_batch_rows {rows}: answers identical to max_batch_rows {first_setting}'s first round: "
          f"{'/'.join(map(str, same))} of {len(PROMPTS) - 1}")
speedup = None
if 1 in runs and len(runs) > 1:
    most = max(runs)
    speedup = statistics.median(r["tokens_per_s"] for r in runs[most]) / statistics.median(r["tokens_per_s"] for r in runs[1])
    print(f"max_batch_rows {most} / one at a time, tokens/s: {speedup:.2f}x")
if args.out:
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "runs": {str(k): v for k, v in runs.items()}, "speedup": speedup}, f, indent=1)
