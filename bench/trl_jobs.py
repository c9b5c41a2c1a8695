"""TRL 1.12's side of the benchmark, run in bench/.venv-trl: `python bench/trl_jobs.py JOB.json RESULT.json`.

Each job reads the inputs that instrugo's `prepare` job wrote (the same model directories, the same
chat-formatted prompts, the same rankings expanded into pairs) and uses TRL the way its documentation
does: SFTTrainer on prompt/completion rows, RewardTrainer on chosen/rejected pairs, and
`trl.experimental.ppo.PPOTrainer` (removed in later TRL) with policy, reference, reward and value models.
Precision is set explicitly (`bf16=` matches instrugo's precision; TRL's own default broke CPU runs).
Nothing here imports instrugo, which is not installed in this venv.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import write_json_atomic  # noqa: E402


def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def load_tokenizer(job: dict):
    """The model's tokenizer with instrugo's pad token (distinct from EOS), so both sides pad alike."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    tokenizer.pad_token = job["pad_token"]
    return tokenizer


def common_args(job: dict) -> dict:
    """TrainingArguments every TRL trainer here shares: CPU, explicit precision, no saving, no logging to
    services. TRL 1.12 turns gradient checkpointing on by default; instrugo does not checkpoint, so it is
    off here too (same compute per step on both sides)."""
    return dict(output_dir=job["out"], use_cpu=True, bf16=job["precision"] == "bf16", fp16=False,
                gradient_checkpointing=False,
                learning_rate=job["lr"], num_train_epochs=1, lr_scheduler_type="cosine", save_strategy="no",
                report_to="none", logging_steps=10**6, seed=job["seed"], dataloader_num_workers=0)


def job_sft(job: dict) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    tokenizer = load_tokenizer(job)
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    args = SFTConfig(**common_args(job), per_device_train_batch_size=job["micro_batch_size"],
                     gradient_accumulation_steps=job["batch_size"] // job["micro_batch_size"],
                     max_length=job["max_length"], packing=False, completion_only_loss=True)
    trainer = SFTTrainer(model=model, args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list(read_jsonl(job["data"])))
    tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    seconds = trainer.train().metrics["train_runtime"]
    return {"train_seconds": seconds, "tokens": tokens, "tokens_per_second": tokens / seconds}


def job_rm(job: dict) -> dict:
    """One epoch of RewardTrainer on the pairs; the model is saved for instrugo's held-out evaluator."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    tokenizer = load_tokenizer(job)
    model = AutoModelForSequenceClassification.from_pretrained(job["model"], num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    args = RewardConfig(**common_args(job), per_device_train_batch_size=job["pairs_per_batch"],
                        max_length=job["max_length"])
    trainer = RewardTrainer(model=model, args=args, processing_class=tokenizer,
                            train_dataset=Dataset.from_list(read_jsonl(job["pairs"])))
    seconds = trainer.train().metrics["train_runtime"]
    trainer.save_model(job["out"])
    tokenizer.save_pretrained(job["out"])
    return {"train_seconds": seconds, "model_dir": job["out"]}


class PhaseClock:
    """Splits TRL's monolithic PPO update into phases by wrapping the module's own functions: its
    generation call, and the no-grad forward passes of reference, value and reward model (scoring).
    Training is the rest of the update; updates are delimited by the trainer's step callbacks."""

    def __init__(self, module):
        self.generate = self.score = 0.0
        self.updates: list[dict] = []
        self._last = None
        module.batch_generation = self._timed(module.batch_generation, "generate")
        module.forward = self._timed(module.forward, "score", only_without_grad=True)
        module.get_reward = self._timed(module.get_reward, "score", only_without_grad=True)

    def _timed(self, function, phase: str, only_without_grad: bool = False):
        def wrapper(*args, **kwargs):
            if only_without_grad and torch.is_grad_enabled():
                return function(*args, **kwargs)  # a training forward pass: counted as training
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                setattr(self, phase, getattr(self, phase) + time.perf_counter() - start)
        return wrapper

    def callback(self):
        from transformers import TrainerCallback

        clock = self

        class StepTimes(TrainerCallback):
            def on_train_begin(self, *args, **kwargs):
                clock._last = time.perf_counter()

            def on_step_end(self, *args, **kwargs):
                now = time.perf_counter()
                total = now - clock._last
                clock.updates.append({"update_seconds": total, "generate_seconds": clock.generate,
                                      "score_seconds": clock.score,
                                      "train_seconds": total - clock.generate - clock.score})
                clock.generate = clock.score = 0.0
                clock._last = now

        return StepTimes()


def job_ppo(job: dict) -> dict:
    """PPO updates at instrugo's settings; the first update is a warm-up and is not counted."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as module

    tokenizer = load_tokenizer(job)
    tokenizer.padding_side = "left"
    policy = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(job["reward_model"], num_labels=1, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(job["reward_model"], num_labels=1, dtype=torch.float32)
    for model in (policy, reference, reward, value):
        model.config.pad_token_id = tokenizer.pad_token_id
    prompts = [tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in read_jsonl(job["prompts"])]
    batch = job["batch_size"]
    args = PPOConfig(**common_args(job),
                     per_device_train_batch_size=batch, gradient_accumulation_steps=1, num_mini_batches=1,
                     local_rollout_forward_batch_size=batch, total_episodes=batch * (job["updates"] + 1),
                     num_ppo_epochs=job["ppo_epochs"], response_length=job["response_length"], temperature=1.0,
                     stop_token="eos", missing_eos_penalty=1.0, kl_coef=0.02, num_sample_generations=0)
    clock = PhaseClock(module)
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=reference,
                         reward_model=reward, value_model=value, train_dataset=Dataset.from_dict({"input_ids": prompts}),
                         callbacks=[clock.callback()])
    trainer.train()
    updates = clock.updates[1:]
    return {key: sum(u[key] for u in updates) / len(updates)
            for key in ("update_seconds", "generate_seconds", "score_seconds", "train_seconds")}


JOBS = {"sft": job_sft, "rm": job_rm, "ppo": job_ppo}

if __name__ == "__main__":
    job_path, result_path = sys.argv[1:3]
    spec = json.loads(Path(job_path).read_text())
    write_json_atomic(result_path, JOBS[spec["kind"]](spec))
