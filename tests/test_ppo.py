"""PPO pieces that decide success (N implementation details) and a tiny end-to-end PPO / PPO-ptx run."""

import pytest
import torch

from instrugo.generation import pad_batch
from instrugo.models import load_causal_lm
from instrugo.ppo import EMA, policy_logprobs, sequence_inputs


def test_position_ids_skip_left_padding():
    query, query_mask = pad_batch([[5, 6, 7], [8]], pad_id=0)
    response = torch.tensor([[9, 2], [10, 0]])
    response_mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    inputs = sequence_inputs(query, query_mask, response, response_mask)
    assert inputs["input_ids"].tolist() == [[5, 6, 7, 9, 2], [0, 0, 8, 10, 0]]
    assert inputs["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 0]]
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 1, 1]]


def test_batched_logprobs_with_padding_equal_unpadded_ones(tiny_model_dir, tiny_tokenizer):
    """The same episode must get the same log-probs whatever else is in its batch."""
    model = load_causal_lm(tiny_model_dir, tiny_tokenizer).eval()
    prompts = [[11, 12, 13, 14, 15], [21, 22]]
    responses = [[31, 32, 2], [41]]
    query, query_mask = pad_batch(prompts, tiny_tokenizer.pad_token_id)
    response = torch.tensor([[31, 32, 2], [41, 0, 0]])
    response_mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    with torch.no_grad():
        batched = policy_logprobs(model, sequence_inputs(query, query_mask, response, response_mask), response, 0.7)
        for row, (p, r) in enumerate(zip(prompts, responses)):
            q, qm = pad_batch([p], 0)
            alone = policy_logprobs(model, sequence_inputs(q, qm, torch.tensor([r]), torch.ones(1, len(r))),
                                    torch.tensor([r]), 0.7)
            torch.testing.assert_close(batched[row, :len(r)], alone[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_equal_the_policy_pass_over_the_rollout(tiny_model_dir, tiny_tokenizer, temperature):
    """What PPO reuses in fp32: the log-probs the sampler computed while drawing (KV cache, packed weights,
    rows leaving the batch at EOS) equal a forward pass over the padded rollout, as the training pass reads it."""
    from instrugo.generation import SamplingConfig, encode_prompts, sample_responses
    from instrugo.ppo import response_tensors, sampler_logprobs

    model = load_causal_lm(tiny_model_dir, tiny_tokenizer).eval()
    eos = tiny_tokenizer.eos_token_id
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size)  # EOS comes early in some rows
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()[eos] = 8.0
    model.lm_head = head
    prompts = ["Hi", "Name a planet.", "Write a long sentence about rivers.", "List three colours, please."] * 2
    samples = [s[0] for s in sample_responses(model, tiny_tokenizer, prompts, config=SamplingConfig(16, temperature, 1.0, 8),
                                              precision="fp32", seed=3)]
    lengths = {len(s.token_ids) for s in samples}
    assert len(lengths) > 1 and any(s.has_eos for s in samples)
    response, response_mask = response_tensors(samples, tiny_tokenizer.pad_token_id)
    sampled = sampler_logprobs(samples, response.shape[1])
    query, query_mask = pad_batch(encode_prompts(tiny_tokenizer, prompts), tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        recomputed = policy_logprobs(model, sequence_inputs(query, query_mask, response, response_mask), response,
                                     temperature)
    torch.testing.assert_close(sampled * response_mask, recomputed * response_mask, rtol=0, atol=1e-4)


def test_logprobs_use_the_sampling_temperature(tiny_model_dir, tiny_tokenizer):
    model = load_causal_lm(tiny_model_dir, tiny_tokenizer).eval()
    query, query_mask = pad_batch([[11, 12, 13]], 0)
    response = torch.tensor([[31, 32]])
    inputs = sequence_inputs(query, query_mask, response, torch.ones(1, 2))
    with torch.no_grad():
        logits = model(**inputs).logits[0, 2:4] / 0.5
        expected = torch.log_softmax(logits, -1)[torch.arange(2), response[0]]
        torch.testing.assert_close(policy_logprobs(model, inputs, response, 0.5)[0], expected, rtol=1e-4, atol=1e-5)


def test_ema_moves_towards_the_weights_by_one_minus_decay():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model)
    torch.testing.assert_close(ema.shadow["weight"], torch.full((1, 2), 0.9 * 1.0 + 0.1 * 3.0))


def tiny_reward_model(tmp_path):
    """A tiny reward model directory (random head) that the PPO loop can load."""
    from instrugo.models import load_tokenizer, resolve_model
    from instrugo.reward import init_reward_model
    from instrugo.training import save_pretrained_files

    tokenizer = load_tokenizer("tiny")
    model = init_reward_model(resolve_model("tiny"), tokenizer, seed=0)
    model.config.reward_bias = 0.0
    save_pretrained_files(model, tokenizer, tmp_path / "rm")
    return tmp_path / "rm"


def tiny_ppo_config(tmp_path, rm, **overrides):
    from instrugo.ppo import PPOConfig

    values = dict(policy="tiny", reward_model=str(rm), out=str(tmp_path / "ppo"), total_episodes=24,
                  episodes_per_batch=8, minibatches=2, micro_batch_size=4, max_new_tokens=12, lr=1e-4,
                  value_lr=1e-4, warmup_iterations=0, value_warmup_iterations=0, ptx_coef=27.8, ptx_ratio=0.5, ptx_max_length=32,
                  ema_decay=0.9, precision="fp32", save_every=1)
    values.update(overrides)
    return PPOConfig(**values)


def test_tiny_ppo_ptx_run_logs_every_signal_and_resumes_after_a_kill(tmp_path, kill_at_step):
    import pytest
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from instrugo import runio
    from instrugo.ppo import run_ppo

    rm = tiny_reward_model(tmp_path)
    kill_at_step(3)
    config = tiny_ppo_config(tmp_path, rm)
    with pytest.raises(KeyboardInterrupt):
        run_ppo(config)
    assert runio.read_json(tmp_path / "ppo" / "checkpoint" / "trainer_state.json")["iteration"] == 2
    kill_at_step.heal()
    out = run_ppo(config)

    rows = runio.read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("rm_score", "gold_score", "kl", "entropy", "approx_kl", "clipfrac", "value_loss", "policy_loss",
                "ptx_loss", "response_length", "seconds_generate", "seconds_score", "seconds_train",
                "policy_grad_norm", "value_grad_norm"):
        assert all(key in r for r in rows), key
    assert all(r["policy_grad_norm"] > 0 and r["value_grad_norm"] > 0 for r in rows)
    AutoModelForCausalLM.from_pretrained(out)
    AutoModelForCausalLM.from_pretrained(out / "ema")
    assert AutoModelForSequenceClassification.from_pretrained(out / "value").config.num_labels == 1


def test_value_warmup_iterations_train_only_the_value_network(tmp_path):
    from safetensors.torch import load_file

    from instrugo import runio
    from instrugo.ppo import run_ppo

    rm = tiny_reward_model(tmp_path)
    out = run_ppo(tiny_ppo_config(tmp_path, rm, value_warmup_iterations=2, ptx_coef=0.0, ema_decay=0.0,
                                  rollout_logprobs="recompute"))  # both log-probs from the same kernel: KL exactly 0
    rows = runio.read_metrics(out / "metrics.jsonl")  # 3 iterations: 2 value-only, then PPO
    assert ["policy_loss" in r for r in rows] == [False, False, True]
    assert all(r["value_loss"] > 0 for r in rows)
    assert [r["value_clipfrac"] for r in rows[:2]] == [0.0, 0.0]  # the warm-up's value loss is unclipped
    # Iteration 3's rollouts come from the policy as it left the warm-up: still exactly the reference.
    assert rows[2]["kl"] == 0.0
    start_value, value = load_file(rm / "model.safetensors"), load_file(out / "value" / "model.safetensors")
    assert any(not torch.equal(start_value[name], value[name]) for name in start_value)


def test_value_warmup_must_leave_a_policy_iteration():
    import pytest

    from instrugo.ppo import PPOConfig
    from instrugo.runio import InputError

    with pytest.raises(InputError, match="value_warmup_iterations"):
        PPOConfig(total_episodes=64, episodes_per_batch=32, value_warmup_iterations=2).validate()


def test_non_finite_loss_stops_with_a_message_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    import pytest

    from instrugo import losses
    from instrugo.ppo import run_ppo

    rm = tiny_reward_model(tmp_path)
    original = losses.ppo_policy_loss
    calls = {"n": 0}

    def nan_after_first_iteration(*args, **kwargs):
        loss, stats = original(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] > 2 else loss), stats  # 2 minibatches per iteration

    monkeypatch.setattr(losses, "ppo_policy_loss", nan_after_first_iteration)
    with pytest.raises(SystemExit, match="non-finite loss at iteration 2"):
        run_ppo(tiny_ppo_config(tmp_path, rm, ptx_coef=0.0, ema_decay=0.0))
    assert (tmp_path / "ppo" / "checkpoint" / "trainer_state.json").exists()


def test_lora_ppo_shares_frozen_weights_and_writes_plain_models(tmp_path, monkeypatch, saved_dtypes):
    """With LoRA, two models are built, not four: the reference is the policy with its adapter off and the
    reward model the value network with its adapter off. At the start the adapters are zero, so the first
    rollouts have exactly zero KL; after training the merged policy differs from SFT and loads plainly."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from instrugo import models, runio
    from instrugo.ppo import run_ppo

    rm = tiny_reward_model(tmp_path)
    built = []
    for name in ("load_causal_lm", "load_scalar_model"):
        original = getattr(models, name)
        monkeypatch.setattr(models, name, lambda *a, _original=original, _name=name, **k: built.append(_name) or _original(*a, **k))
    out = run_ppo(tiny_ppo_config(tmp_path, rm, lora_rank=4, ptx_coef=0.0, ema_decay=0.0, lr=1e-2, value_lr=1e-2,
                                  precision="bf16"))
    assert sorted(built) == ["load_causal_lm", "load_scalar_model"]

    rows = runio.read_metrics(out / "metrics.jsonl")
    assert abs(rows[0]["kl"]) < 1e-5 and abs(rows[-1]["kl"]) > 1e-4
    policy = AutoModelForCausalLM.from_pretrained(out)
    sft = AutoModelForCausalLM.from_pretrained(models.resolve_model("tiny"))
    assert not any(n.startswith("base_model") or "lora" in n for n in policy.state_dict())
    assert saved_dtypes(out) == {"F32"}  # a bf16 run keeps the frozen base in bf16; checkpoints are fp32
    assert any(not torch.equal(policy.state_dict()[n], p) for n, p in sft.state_dict().items())
    value = AutoModelForSequenceClassification.from_pretrained(out / "value")
    assert value.config.num_labels == 1 and not any("lora" in n for n in value.state_dict())


def test_gold_reward_scores_rollouts_with_the_judge_not_the_reward_model(tmp_path, monkeypatch):
    """--reward gold: the scores PPO optimises are the gold judge's (here a stand-in giving 0.37 to every
    response, and the no-EOS score set to the same value), and no RM score is logged."""
    import instrugo.judge
    import instrugo.reward
    from instrugo import runio
    from instrugo.judge.gold import GoldVerdict
    from instrugo.ppo import run_ppo

    judged = []

    def constant_judge(record, response):
        judged.append(response)
        return GoldVerdict(score=0.37, constraint_results=[], constraint_fraction=1.0, all_passed=True,
                           topicality=1.0, quality=1.0, n_words=1, reasons=[])

    monkeypatch.setattr(instrugo.judge, "gold_judge", constant_judge)
    monkeypatch.setattr(instrugo.reward, "score_texts", lambda *a, **k: pytest.fail("the reward model scored"))
    rm = tiny_reward_model(tmp_path)
    out = run_ppo(tiny_ppo_config(tmp_path, rm, reward="gold", no_eos_score=0.37, ptx_coef=0.0, ema_decay=0.0))
    rows = runio.read_metrics(out / "metrics.jsonl")
    assert len(judged) == 24  # every rollout of the 3 iterations, judged once
    assert all("rm_score" not in r for r in rows)
    assert all(r["score_with_penalty"] == pytest.approx(0.37) and r["gold_score"] == pytest.approx(0.37) for r in rows)


def test_responses_to_one_prompt_are_scored_against_each_other(tmp_path, monkeypatch):
    """samples_per_prompt=2 with score_baseline='others': each iteration's 8 episodes are 4 prompts x 2
    responses, each judged with its own prompt, the prompt set is walked without skipping, and the score
    each episode's rewards get is its judge score less the other response's (the leave-one-out mean of a
    pair)."""
    import instrugo.judge
    import instrugo.ppo
    from instrugo import losses, runio
    from instrugo.data import load_examples
    from instrugo.judge.gold import GoldVerdict

    sampled, judged_prompts, judge_scores, shaped_scores = [], [], [], []
    sample_responses = instrugo.ppo.sample_responses

    def recording_sampler(model, tokenizer, prompts, **kwargs):
        groups = sample_responses(model, tokenizer, prompts, **kwargs)  # one list of responses per prompt
        sampled.extend((s.text, str(prompt)) for prompt, group in zip(prompts, groups) for s in group)
        return groups

    def length_judge(record, response):
        assert (response, str(record["messages"])) in sampled  # judged with the prompt it answers
        judged_prompts.append(record["id"])
        judge_scores.append(len(response) % 7 / 7)
        return GoldVerdict(score=judge_scores[-1], constraint_results=[], constraint_fraction=1.0, all_passed=True,
                           topicality=1.0, quality=1.0, n_words=1, reasons=[])

    kl_penalized_rewards = losses.kl_penalized_rewards

    def recording_rewards(score, *args, **kwargs):
        shaped_scores.extend(score.tolist())
        return kl_penalized_rewards(score, *args, **kwargs)

    monkeypatch.setattr(instrugo.ppo, "sample_responses", recording_sampler)
    monkeypatch.setattr(instrugo.judge, "gold_judge", length_judge)
    monkeypatch.setattr(losses, "kl_penalized_rewards", recording_rewards)
    # The tiny random model seldom ends a response, and the no-EOS score would make every score alike.
    monkeypatch.setattr(losses, "no_eos_penalty", lambda scores, has_eos, penalty: scores)
    rm = tiny_reward_model(tmp_path)
    out = instrugo.ppo.run_ppo(tiny_ppo_config(tmp_path, rm, reward="gold", ptx_coef=0.0, ema_decay=0.0,
                                               samples_per_prompt=2, score_baseline="others"))
    first_prompts = [r["id"] for r in load_examples("instrugo:ppo")[:12]]  # 3 iterations x 4 prompts, in order
    assert judged_prompts[0::2] == judged_prompts[1::2] == first_prompts
    expected = [x for a, b in zip(judge_scores[0::2], judge_scores[1::2]) for x in (a - b, b - a)]
    assert shaped_scores == pytest.approx(expected)
    assert any(abs(x) > 1e-6 for x in expected)
    tied = [sum(abs(a - b) < 1e-6 for a, b in zip(judge_scores[8 * i:8 * i + 8:2], judge_scores[8 * i + 1:8 * i + 8:2])) / 4
            for i in range(3)]
    assert [r["tied_groups"] for r in runio.read_metrics(out / "metrics.jsonl")] == pytest.approx(tied)


def test_gold_reward_needs_constraints_on_every_prompt(tmp_path):
    import json

    from instrugo.ppo import run_ppo
    from instrugo.runio import InputError

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Write a haiku."}) + "\n")
    with pytest.raises(InputError, match=r"prompts.jsonl:1: field 'constraints'"):
        run_ppo(tiny_ppo_config(tmp_path, tiny_reward_model(tmp_path), reward="gold", prompts=str(prompts)))
    assert not (tmp_path / "ppo").exists()


def test_select_cuts_the_columns_that_are_padding_in_every_chosen_episode():
    from instrugo.ppo import Rollout

    query, query_mask = pad_batch([[5, 6, 7, 8], [9, 10], [11]], pad_id=0)
    response = torch.tensor([[21, 22, 23, 2, 0], [31, 2, 0, 0, 0], [41, 42, 43, 44, 2]])
    response_mask = (torch.arange(5) < torch.tensor([[4], [2], [5]])).float()
    values = torch.arange(15.0).reshape(3, 5)
    rollout = Rollout(query, query_mask, response, response_mask, torch.tensor([0.1, 0.2, 0.3]), values=values)

    picked = rollout.select(torch.tensor([2, 1]))  # prompts of 1 and 2 tokens, responses of 5 and 2
    assert picked.query.tolist() == [[0, 11], [9, 10]] and picked.query_mask.tolist() == [[0, 1], [1, 1]]
    assert picked.response.tolist() == [[41, 42, 43, 44, 2], [31, 2, 0, 0, 0]]
    picked = rollout.select(torch.tensor([1]))
    assert picked.query.tolist() == [[9, 10]]
    assert picked.response.tolist() == [[31, 2]] and picked.response_mask.tolist() == [[1.0, 1.0]]
    assert picked.values.tolist() == [[5.0, 6.0]] and picked.scores.tolist() == [pytest.approx(0.2)]
    assert picked.logprobs is None


def test_an_updates_gradient_does_not_depend_on_how_its_minibatch_is_cut(tmp_path, monkeypatch):
    """The minibatch's losses are token means over all its episodes: one micro-batch of 8, two of 4 or eight
    of 1 (responses of 1 to 12 tokens, so micro-batches hold different token counts, and each is cut to its
    own width) give the same policy and value gradients."""
    import instrugo.ppo
    from instrugo import runio
    from instrugo.ppo import run_ppo

    real_sampler = instrugo.ppo.sample_responses
    lengths = [12, 1, 5, 2, 9, 3, 7, 4]

    def varied_lengths(model, tokenizer, prompts, **kwargs):
        batches = real_sampler(model, tokenizer, prompts, **kwargs)
        for (sample,), length in zip(batches, lengths):
            sample.token_ids = sample.token_ids[:length - 1] + [tokenizer.eos_token_id]
            sample.text, sample.has_eos = tokenizer.decode(sample.token_ids, skip_special_tokens=True), True
        return batches

    monkeypatch.setattr(instrugo.ppo, "sample_responses", varied_lengths)
    rm = tiny_reward_model(tmp_path)
    logged = []
    for micro in (8, 4, 1):
        # The responses are cut and end in a substituted EOS, so the sampler's log-probs no longer fit them.
        out = run_ppo(tiny_ppo_config(tmp_path, rm, out=str(tmp_path / f"micro{micro}"), total_episodes=8,
                                      minibatches=1, micro_batch_size=micro, ptx_coef=0.0, ema_decay=0.0,
                                      rollout_logprobs="recompute"))
        logged.append(runio.read_metrics(out / "metrics.jsonl")[0])
    assert logged[0]["response_length"] == pytest.approx(sum(lengths) / len(lengths))
    for row in logged[1:]:
        assert row["policy_grad_norm"] == pytest.approx(logged[0]["policy_grad_norm"], rel=1e-4)
        assert row["value_grad_norm"] == pytest.approx(logged[0]["value_grad_norm"], rel=1e-4)


def test_auto_reuses_the_samplers_logprobs_in_fp32_only():
    from instrugo.ppo import PPOConfig, reuses_sampler_logprobs

    assert PPOConfig().rollout_logprobs == "auto"
    assert reuses_sampler_logprobs("auto", "fp32") and not reuses_sampler_logprobs("auto", "bf16")
    assert reuses_sampler_logprobs("sampler", "bf16") and not reuses_sampler_logprobs("recompute", "fp32")


def assert_same_iterations(first: list[dict], second: list[dict], keys: tuple[str, ...], abs: float) -> None:
    """Two runs' metrics.jsonl rows: the same rollouts (response lengths) and, to 1e-3, the same `keys`."""
    for one, other in zip(first, second, strict=True):
        assert one["response_length"] == other["response_length"]
        for key in keys:
            assert one[key] == pytest.approx(other[key], rel=1e-3, abs=abs), key


def test_reusing_the_samplers_logprobs_gives_the_update_of_recomputing_them(tmp_path, monkeypatch):
    """`rollout_logprobs`: in fp32 an iteration with the sampler's log-probs logs the losses, KL and gradient
    norms of one that recomputes them with a policy pass (two iterations, the second from updated weights)."""
    import instrugo.ppo
    from instrugo import runio
    from instrugo.ppo import run_ppo

    real_policy_logprobs = instrugo.ppo.policy_logprobs
    passes = []  # one entry per log-prob pass (policy or reference, scoring or training)

    def counted(*args, **kwargs):
        passes.append(1)
        return real_policy_logprobs(*args, **kwargs)

    monkeypatch.setattr(instrugo.ppo, "policy_logprobs", counted)
    rm = tiny_reward_model(tmp_path)
    logged, pass_counts = {}, {}
    for source in ("sampler", "recompute"):
        passes.clear()
        out = run_ppo(tiny_ppo_config(tmp_path, rm, out=str(tmp_path / source), total_episodes=16, ema_decay=0.0,
                                      rollout_logprobs=source))
        logged[source], pass_counts[source] = runio.read_metrics(out / "metrics.jsonl"), len(passes)
    # Two iterations x two scoring micro-batches: four policy passes fewer with the sampler's log-probs.
    assert pass_counts["recompute"] - pass_counts["sampler"] == 4
    assert_same_iterations(logged["sampler"], logged["recompute"],
                           ("kl", "policy_loss", "value_loss", "approx_kl", "policy_grad_norm", "value_grad_norm"), abs=1e-5)


def test_compiled_layers_give_the_same_ppo_ptx_update(tmp_path, compiling):
    """`--compile` in PPO: the training passes of policy (PPO-ptx's too) and value network run through
    patched, newly compiled decoder layers, and log the same losses and gradient norms as the eager run
    (fp32; two iterations, the second from updated weights)."""
    from torch._dynamo.utils import counters

    from instrugo import runio
    from instrugo.ppo import run_ppo

    rm = tiny_reward_model(tmp_path)
    logged = []
    for compile_layers in (False, True):
        frames_before = counters["frames"]["ok"]
        out = run_ppo(tiny_ppo_config(tmp_path, rm, out=str(tmp_path / f"compile{compile_layers}"), total_episodes=16,
                                      ema_decay=0.0, compile=compile_layers))
        logged.append(runio.read_metrics(out / "metrics.jsonl"))
    assert counters["frames"]["ok"] > frames_before
    assert {name for name, patched in compiling if all(patched) and len(patched) == 2} == {"LlamaForCausalLM", "TokenValueModel"}
    assert_same_iterations(*logged, ("policy_loss", "value_loss", "ptx_loss", "policy_grad_norm", "value_grad_norm"),
                           abs=1e-6)
