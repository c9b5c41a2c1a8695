"""instrugo's side of the benchmark, one job per process: `python bench/instrugo_jobs.py JOB.json RESULT.json`.

The harness (bench/run.py) starts each job in a fresh process so that peak RSS is the job's own. Jobs:
- matmul:   the hardware ceiling, bf16 and fp32 matmul GFLOP/s;
- prepare:  the shared inputs both sides read: data files, a reward model with a seeded head, FLOP counts;
- sft, rm, ppo: instrugo's stages on the prepared inputs; generate: instrugo's sampler vs plain generate;
- rm_eval:  held-out accuracy of any reward-model directory (TRL's too), by instrugo's evaluator, so both
            sides are judged by the same code on the same held-out prompts.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import flop_parameters, write_json_atomic  # noqa: E402

from instrugo import models  # noqa: E402
from instrugo.comparisons import ComparisonTask, read_tasks, task_rows  # noqa: E402
from instrugo.runio import atomic_write_jsonl, read_metrics  # noqa: E402


def matmul_gflops(dtype: torch.dtype, size: int, seconds: float) -> float:
    """GFLOP/s of the fastest of the size×size matmuls (2·n³ FLOPs each) timed over about `seconds`, at
    least one. Timed one by one: where bf16 is emulated (no bf16 units) one product at 2048 takes ~20 s."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up: kernel selection and page faults
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while best == float("inf") or time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def job_matmul(job: dict) -> dict:
    # Without oneDNN bf16 kernels (bf16 ~100x slower than fp32) one bf16 product at 2048 takes a minute; its
    # rate is read at 256 then, as it only shows that fp32 is the precision to use.
    bf16_size = job["size"] if models.onednn_has_bf16() else 256
    return {"bf16_gflops": matmul_gflops(torch.bfloat16, bf16_size, job["seconds"]), "bf16_size": bf16_size,
            "fp32_gflops": matmul_gflops(torch.float32, job["size"], job["seconds"]),
            "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------- inputs

def response_variants(response: str, other: str) -> list[str]:
    """Nine responses of graded quality to one prompt: the demonstration first, then damaged copies
    (lost constraints, lost content, another topic). The simulated labelers decide the actual ranking."""
    sentences = [s.strip() for s in response.replace("\n", " ").split(". ") if s.strip()]
    half = ". ".join(sentences[:max(1, len(sentences) // 2)])
    words = response.split()
    return [response, response.lower(), half, other, ". ".join(reversed(sentences)), response.upper(),
            " ".join(words[: max(3, len(words) // 3)]), f"{other} {response}", " ".join(sorted(words))]


def ranked_tasks(records: list[dict], k: int, seed: int) -> list[ComparisonTask]:
    """K-way comparison tasks on shipped SFT prompts, ranked by the simulated labeler pool."""
    from instrugo.labelers import LabelerConfig, simulate_labels

    tasks = []
    for index, record in enumerate(records):
        other = records[(index + 1) % len(records)]["response"]
        variants = list(dict.fromkeys(v for v in response_variants(record["response"], other) if v.strip()))
        if len(variants) < k:
            continue
        tasks.append(ComparisonTask(id=f"{record['id']}-k{k}", prompt=record["prompt"], responses=variants[:k],
                                    example={k_: v for k_, v in record.items() if k_ != "messages"}))
    return [t for t in simulate_labels(tasks, LabelerConfig(seed=seed)) if t.pairs()]


def model_flop_parameters(directory: Path) -> dict:
    """N for the causal LM (policy) and for its scalar-head variant (reward and value models)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory)
    with torch.device("meta"):  # shapes only: no memory, no weights read
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    head = config.vocab_size * config.hidden_size
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    backbone = total - (0 if tied else head)  # without the LM head
    return {"policy": flop_parameters(backbone, embedding, head), "scalar_head": flop_parameters(backbone, embedding, 0),
            "total": total}


def job_prepare(job: dict) -> dict:
    """Write every input both sides read into job['dir']; returns their paths and the FLOP counts."""
    from instrugo.data import load_split
    from instrugo.generation import chat_prompt
    from instrugo.reward import expand_to_pairs, init_reward_model, split_heldout

    out = Path(job["dir"])
    model_dir = models.resolve_model(job["model"])
    tokenizer = models.load_tokenizer(model_dir)
    paths = {"model": str(model_dir), "pad_token": tokenizer.pad_token}

    # The reward model both PPO runs use (value network initialised from it), with a seeded head.
    reward_dir = out / "reward-model"
    if not (reward_dir / "config.json").exists():
        reward = init_reward_model(model_dir, tokenizer, seed=job["seed"])
        reward.config.reward_bias = 0.0
        reward.save_pretrained(reward_dir)
        tokenizer.save_pretrained(reward_dir)
    paths["reward_model"] = str(reward_dir)

    sft = load_split("sft")
    demos = sft[:job["sft_examples"]]
    atomic_write_jsonl(out / "sft.jsonl", [{"prompt": r["prompt"], "response": r["response"]} for r in demos])
    atomic_write_jsonl(out / "sft_trl.jsonl", [{"prompt": chat_prompt(tokenizer, r["prompt"]),
                                                "completion": r["response"]} for r in demos])
    paths["sft"], paths["sft_trl"] = str(out / "sft.jsonl"), str(out / "sft_trl.jsonl")

    prompts = load_split("ppo")[:job["ppo_prompts"]]
    atomic_write_jsonl(out / "ppo.jsonl", [{"prompt": r["prompt"]} for r in prompts])
    atomic_write_jsonl(out / "ppo_trl.jsonl", [{"prompt": chat_prompt(tokenizer, r["prompt"])} for r in prompts])
    paths["ppo"], paths["ppo_trl"] = str(out / "ppo.jsonl"), str(out / "ppo_trl.jsonl")
    paths["ppo_prompt_tokens"] = sum(len(tokenizer(chat_prompt(tokenizer, r["prompt"]), add_special_tokens=False)
                                         ["input_ids"]) for r in prompts) / len(prompts)

    # Rankings: instrugo reads all tasks and holds out prompts itself; TRL gets the same training prompts
    # expanded into pairs (what a TRL user must do), and both are scored on the same held-out tasks and on
    # a test set of prompts neither trains on (the SFT job's examples come from the split's other end).
    for k, n_prompts in job["rm_prompts"].items():
        k = int(k)  # JSON object keys are strings
        tasks = ranked_tasks(sft[-n_prompts:], k, job["seed"])
        test = ranked_tasks(sft[-(n_prompts + job["rm_test_prompts"]):-n_prompts], k, job["seed"] + 1)
        train, heldout = split_heldout(tasks, job["heldout_fraction"], job["seed"])
        atomic_write_jsonl(out / f"rm_k{k}.jsonl", task_rows(tasks))
        atomic_write_jsonl(out / f"rm_k{k}_heldout.jsonl", task_rows(heldout))
        atomic_write_jsonl(out / f"rm_k{k}_test.jsonl", task_rows(test))
        atomic_write_jsonl(out / f"rm_k{k}_pairs_trl.jsonl",
                           [{"prompt": chat_prompt(tokenizer, t.prompt), "chosen": t.responses[0],
                             "rejected": t.responses[1]} for t in expand_to_pairs(train)])
        paths[f"rm_k{k}"] = {"tasks": str(out / f"rm_k{k}.jsonl"), "heldout": str(out / f"rm_k{k}_heldout.jsonl"),
                             "test": str(out / f"rm_k{k}_test.jsonl"),
                             "pairs_trl": str(out / f"rm_k{k}_pairs_trl.jsonl"), "train_prompts": len(train),
                             "train_pairs": sum(len(t.pairs()) for t in train),
                             "heldout_pairs": sum(len(t.pairs()) for t in heldout),
                             "test_prompts": len(test), "test_pairs": sum(len(t.pairs()) for t in test)}
    paths["flop_parameters"] = model_flop_parameters(model_dir)
    return paths


# ------------------------------------------------------------------------------------------------ jobs

def cold_compile_cache(job: dict) -> dict:
    """A compiling job (`--compile`) starts from an empty inductor cache of its own (beside its run
    directory), so the compilation it reports is what a first run on a fresh machine pays. Returns what to
    add to the job's result: whether it really compiled (where torch.compile cannot build kernels,
    `--compile` runs eager)."""
    if not job.get("compile"):
        return {}
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{job['out']}.inductor-cache"
    return {"compiled": not models.compile_unavailable()}


def job_sft(job: dict) -> dict:
    from instrugo.data import load_examples
    from instrugo.sft import SFTConfig, run_sft, tokenize_example

    compiled = cold_compile_cache(job)
    config = SFTConfig(model=job["model"], data=job["data"], out=job["out"], epochs=1.0, lr=job["lr"],
                       batch_size=job["batch_size"], micro_batch_size=job["micro_batch_size"],
                       max_length=job["max_length"], precision=job["precision"], save_every=10**9,
                       compile=job.get("compile", False))
    run_sft(config)
    tokenizer = models.load_tokenizer(job["model"])
    examples = [tokenize_example(tokenizer, r["messages"], r["response"], job["max_length"])
                for r in load_examples(job["data"])]
    tokens = sum(len(ids) for ids, _ in filter(None, examples))
    rows = read_metrics(Path(job["out"]) / "metrics.jsonl")
    seconds = sum(r["response_tokens"] / r["tokens_per_second"] for r in rows)
    return {"train_seconds": seconds, "tokens": tokens, "tokens_per_second": tokens / seconds, **compiled}


def job_rm(job: dict) -> dict:
    from instrugo.reward import RewardConfig, reward_inputs, run_reward, shared_prefix_length, split_heldout

    # The held-out prompts are those of `split_seed` (TRL's pairs were expanded from the same training prompts),
    # whatever seed trains: the job trains on that split's training tasks, in their order, holding out nothing more.
    tasks = [t for t in read_tasks(job["tasks"]) if t.pairs()]
    train, _ = split_heldout(tasks, job["heldout_fraction"], job.get("split_seed", job["seed"]))
    train_file = Path(job["out"] + "-train.jsonl")
    atomic_write_jsonl(train_file, task_rows(train))
    config = RewardConfig(model=job["model"], comparisons=[str(train_file)], out=job["out"], lr=job["lr"],
                          prompts_per_batch=job["prompts_per_batch"], micro_batch_prompts=job["micro_batch_prompts"],
                          max_length=job["max_length"], heldout_fraction=0.0, normalize_data="",
                          precision=job["precision"], save_every=10**9, seed=job["seed"])
    run_reward(config)
    final = [r for r in read_metrics(Path(job["out"]) / "metrics.jsonl") if r.get("final")][-1]
    tokenizer = models.load_tokenizer(job["model"])
    # Tokens the model reads: each prompt's shared prefix once, then every response (reward.raw_scores).
    groups = [[reward_inputs(tokenizer, t.prompt, r, job["max_length"]) for r in t.responses] for t in train]
    tokens = sum(sum(map(len, g)) - (len(g) - 1) * shared_prefix_length(g) for g in groups)
    return {"train_seconds": final["train_seconds"], "tokens": tokens, "model_dir": job["out"]}


def job_rm_eval(job: dict) -> dict:
    """Held-out pairwise accuracy of a trained reward-model directory, by instrugo's evaluator."""
    from transformers import AutoModelForSequenceClassification

    from instrugo.reward import heldout_accuracy

    tokenizer = models.load_tokenizer(job["model_dir"])
    model = AutoModelForSequenceClassification.from_pretrained(job["model_dir"], dtype=torch.float32).eval()
    model.config.pad_token_id = tokenizer.pad_token_id
    heldout = read_tasks(job["heldout"], require_ranking=True)
    result = heldout_accuracy(model, tokenizer, heldout, job["precision"], job["max_length"])
    return {"heldout_accuracy": result["heldout_accuracy_vs_labels"]}


def job_ppo(job: dict) -> dict:
    """PPO updates; the first is a warm-up (lazy initialisation, kernel selection; with `compile`, the
    compilation) and is not counted in the means, but reported as `warmup_seconds`."""
    from instrugo.ppo import PPOConfig, run_ppo

    compiled = cold_compile_cache(job)
    batch = job["batch_size"]
    config = PPOConfig(policy=job["model"], reward_model=job["reward_model"], prompts=job["prompts"], out=job["out"],
                       total_episodes=batch * (job["updates"] + 1), episodes_per_batch=batch, minibatches=1,
                       micro_batch_size=batch, ppo_epochs=job["ppo_epochs"], warmup_iterations=0, lam=0.95,  # TRL's default λ
                       value_warmup_iterations=0,  # TRL has no value warm-up: every timed update trains both
                       max_new_tokens=job["response_length"], rollout_batch_size=batch, gold_judge=False,
                       precision=job["precision"], save_every=10**9, seed=job["seed"], lora_rank=job.get("lora_rank", 0),
                       compile=job.get("compile", False))
    run_ppo(config)
    warmup, *rows = read_metrics(Path(job["out"]) / "metrics.jsonl")
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    return {"generate_seconds": mean("seconds_generate"), "score_seconds": mean("seconds_score"),
            "train_seconds": mean("seconds_train"),
            "update_seconds": mean("seconds_generate") + mean("seconds_score") + mean("seconds_train"),
            "response_tokens": mean("response_length"),
            "warmup_seconds": sum(warmup[f"seconds_{phase}"] for phase in ("generate", "score", "train")), **compiled}


def job_generate(job: dict) -> dict:
    """Generated tokens per second at one batch: instrugo's sampler, or plain `model.generate`."""
    from instrugo.generation import SamplingConfig, encode_prompts, pad_batch, sample_responses

    tokenizer = models.load_tokenizer(job["model"])
    model = models.load_causal_lm(job["model"], tokenizer).eval()
    prompts = [json.loads(line)["prompt"] for line in Path(job["prompts"]).read_text().splitlines()][:job["batch_size"]]
    config = SamplingConfig(max_new_tokens=job["response_length"], temperature=1.0, batch_size=job["batch_size"])

    def instrugo_sampler() -> int:
        samples = sample_responses(model, tokenizer, prompts, config=config, precision=job["precision"])
        return sum(len(s[0].token_ids) for s in samples)

    def plain_generate() -> int:
        ids, mask = pad_batch(encode_prompts(tokenizer, prompts), tokenizer.pad_token_id)
        with torch.no_grad(), models.autocast(job["precision"]):
            output = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=job["response_length"],
                                    do_sample=True, top_k=None, pad_token_id=tokenizer.pad_token_id)
        new = output[:, ids.shape[1]:]
        return int((new != tokenizer.pad_token_id).sum())

    generate = instrugo_sampler if job["impl"] == "instrugo" else plain_generate
    generate()  # warm-up
    times, tokens = [], 0
    for _ in range(job["rounds"]):
        start = time.perf_counter()
        tokens += generate()
        times.append(time.perf_counter() - start)
    return {"tokens_per_second": tokens / sum(times), "seconds": sum(times) / len(times)}


JOBS = {"matmul": job_matmul, "prepare": job_prepare, "sft": job_sft, "rm": job_rm, "rm_eval": job_rm_eval,
        "ppo": job_ppo, "generate": job_generate}

if __name__ == "__main__":
    job_path, result_path = sys.argv[1:3]
    spec = json.loads(Path(job_path).read_text())
    write_json_atomic(result_path, JOBS[spec["kind"]](spec))
