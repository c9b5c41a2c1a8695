"""Reward model: K forward passes per prompt, the K-way loss through the model, training, normalisation."""

import json
import math
import random

import pytest
import torch

from instrugo import losses, runio
from instrugo.comparisons import ComparisonTask
from instrugo.models import load_tokenizer
from instrugo.reward import (RewardConfig, batch_scores, expand_to_pairs, init_reward_model,
                             load_reward_model, raw_scores, reward_inputs, run_reward, score_texts,
                             padding_chunks, shared_prefix_length)
from instrugo.training import epoch_order, length_grouped_steps


def make_task(task_id, k, seed):
    rng = random.Random(seed)
    responses = [f"answer {task_id} option {i} " + " ".join(rng.choice(["blue", "green", "red"]) for _ in range(3))
                 for i in range(k)]
    order = list(range(k))
    rng.shuffle(order)
    return ComparisonTask(id=str(task_id), prompt=f"Question {task_id}?", responses=responses,
                          ranking=[[order[0]], order[1:3], order[3:]] if k > 3 else [[i] for i in order])


def test_one_forward_pass_per_response_not_per_pair(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    model = init_reward_model(tiny_model_dir, tokenizer, seed=0).eval()
    rows_seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: rows_seen.append(kwargs["input_ids"].shape[0]),
                                    with_kwargs=True)
    tasks = [make_task(0, 4, 1), make_task(1, 9, 2), make_task(2, 5, 3)]
    with torch.no_grad():
        scores, levels, valid = batch_scores(model, tokenizer, tasks, max_length=64)
    assert rows_seen[0] == 3 and sum(rows_seen[1:]) == 4 + 9 + 5  # one pass over the prompts, then K per prompt
    n_pairs = sum(len(t.pairs()) for t in tasks)
    assert 2 * n_pairs == sum(len(t.responses) for t in expand_to_pairs(tasks)) > 4 + 9 + 5

    # The K-way loss of the batched scores equals the naive pair-by-pair Bradley-Terry loss.
    loss, _ = losses.kway_ranking_loss(scores, levels, valid)
    per_prompt = []
    for task in tasks:
        with torch.no_grad():
            alone = [raw_scores(model, [[reward_inputs(tokenizer, task.prompt, r, 64)]], tokenizer.pad_token_id).item()
                     for r in task.responses]  # each response in a full pass of its own
        pairs = task.pairs()
        per_prompt.append(sum(-math.log(1 / (1 + math.exp(-(alone[i] - alone[j])))) for i, j in pairs) / len(pairs))
    assert abs(loss.item() - sum(per_prompt) / len(per_prompt)) < 1e-4


def test_head_init_follows_instructgpt(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    model = init_reward_model(tiny_model_dir, tokenizer, seed=0)
    d = model.score.in_features
    assert model.score.out_features == 1
    assert abs(model.score.weight.std().item() - 1 / math.sqrt(d + 1)) < 0.5 / math.sqrt(d + 1)


def synthetic_rankings(path, n_prompts, k, seed=0):
    """Rankings a tiny model can learn: more occurrences of 'excellent' is better."""
    rng = random.Random(seed)
    rows = []
    for p in range(n_prompts):
        counts = rng.sample(range(6), k)
        responses = [" ".join(["excellent"] * c + [rng.choice(["plain", "words", "here", "text"]) for _ in range(6 - c)])
                     + f" #{p}.{i}" for i, c in enumerate(counts)]
        ranking = sorted(range(k), key=lambda i: -counts[i])
        rows.append({"id": f"p{p}", "prompt": f"Rate item {p}.", "responses": responses, "ranking": ranking,
                     "labeler": "synthetic"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_tiny_reward_model_learns_rankings_and_is_normalised(tmp_path):
    data = synthetic_rankings(tmp_path / "ranked.jsonl", n_prompts=160, k=4)
    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(json.dumps({"prompt": "Rate.", "response": f"plain text {i}"}) + "\n" for i in range(8)))
    config = RewardConfig(model="tiny", comparisons=[str(data)], out=str(tmp_path / "run" / "rm"), epochs=2.0, lr=2e-3,
                          prompts_per_batch=8, micro_batch_prompts=4, max_length=64, heldout_fraction=0.25,
                          normalize_data=str(demos), normalize_examples=8, precision="fp32", save_every=100)
    out = run_reward(config)
    summary = runio.read_json(tmp_path / "run" / "eval.json")["reward_model"]
    n = summary["heldout_pairs"]
    assert n == 40 * 6
    # Chance is 0.5 with standard error 0.5/sqrt(n) (pairs of a prompt correlate: be generous, 4 SE).
    assert summary["heldout_accuracy_vs_labels"] > 0.5 + 4 * 0.5 / math.sqrt(n)
    assert summary["n_comparisons"] == 160 * 6 and summary["path"] == str(out)

    model, tokenizer = load_reward_model(out)
    demo_scores = score_texts(model, tokenizer, ["Rate."] * 8, [f"plain text {i}" for i in range(8)], "fp32")
    assert abs(sum(demo_scores) / 8) < 1e-3  # demonstrations score 0 on average
    from transformers import AutoModelForSequenceClassification

    plain = AutoModelForSequenceClassification.from_pretrained(out)
    assert plain.config.num_labels == 1 and isinstance(plain.config.reward_bias, float)


def test_tiny_reward_model_learns_from_the_simulated_labeler_pool(tmp_path):
    """InstruGo demonstrations against degraded answers, ranked by the simulated labelers at AlpacaFarm's
    noise (25% flips, full preference noise: noisier than the default pool); the tiny RM must beat chance
    on held-out prompts."""
    from instrugo.comparisons import task_rows
    from instrugo.data import load_split
    from instrugo.labelers import LabelerConfig, simulate_labels

    records = load_split("sft")[:160]
    tasks = []
    for i, record in enumerate(records):
        words = record["response"].split()
        other = records[(i + 1) % len(records)]["response"]
        responses = [record["response"], " ".join(words[:4]), other, " ".join(words[:3] * 6)]
        if len(set(responses)) == 4:
            tasks.append(ComparisonTask(id=record["id"], prompt=record["prompt"], responses=responses, example=record))
    labeled = simulate_labels(tasks, LabelerConfig(flip_probability=0.25, temperature_scale=1.0, seed=1))
    path = tmp_path / "labeled.jsonl"
    runio.atomic_write_jsonl(path, task_rows(labeled))

    config = RewardConfig(model="tiny", comparisons=[str(path)], out=str(tmp_path / "run" / "rm"), epochs=2.0,
                          lr=2e-3, prompts_per_batch=8, micro_batch_prompts=4, max_length=192, heldout_fraction=0.25,
                          normalize_data="", precision="fp32", save_every=100)
    run_reward(config)
    summary = runio.read_json(tmp_path / "run" / "eval.json")["reward_model"]
    n = summary["heldout_gold_pairs"]
    assert n > 100
    assert summary["heldout_accuracy_vs_gold"] > 0.5 + 4 * 0.5 / math.sqrt(n)


def test_lora_reward_model_in_bf16_writes_a_merged_fp32_checkpoint(tmp_path, saved_dtypes):
    data = synthetic_rankings(tmp_path / "ranked.jsonl", n_prompts=32, k=4)
    config = RewardConfig(model="tiny", comparisons=[str(data)], out=str(tmp_path / "run" / "rm"), epochs=1.0, lr=2e-3,
                          prompts_per_batch=8, micro_batch_prompts=4, max_length=64, heldout_fraction=0.25,
                          precision="bf16", lora_rank=4, save_every=100)
    out = run_reward(config)
    assert saved_dtypes(out) == {"F32"}
    model, _ = load_reward_model(out)
    assert model.config.num_labels == 1 and not any("lora" in n for n in model.state_dict())


def test_score_texts_batches_by_length_and_returns_scores_in_the_callers_order(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    model = init_reward_model(tiny_model_dir, tokenizer, seed=0).eval()
    responses = [" ".join(["word"] * n) for n in (30, 2, 17, 5, 40, 1, 9)]
    prompts = [f"Question {i}?" for i in range(len(responses))]
    widths = []
    model.register_forward_pre_hook(lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[1]),
                                    with_kwargs=True)
    batched = score_texts(model, tokenizer, prompts, responses, "fp32", batch_size=3)
    one_by_one = [score_texts(model, tokenizer, [p], [r], "fp32")[0] for p, r in zip(prompts, responses)]
    assert len({round(score, 3) for score in one_by_one}) == len(responses)  # so a wrong order would show
    assert batched == pytest.approx(one_by_one, abs=1e-4)
    # Sorted by length: the shortest three, the next three, then the longest alone, each batch as wide
    # as its longest text (the one-by-one calls measured each text's own width).
    own = sorted(widths[3:])
    assert widths[:3] == [own[2], own[5], own[6]]


def test_a_steps_forward_passes_go_in_order_of_length_and_its_loss_does_not_depend_on_them(tmp_path, monkeypatch):
    """Steps group prompts of similar length (the epoch's 8 prompts: the 4 shortest form one step, the 4
    longest the other), and a step's prompts go into forward passes in order of length, so a pass pads to a
    similar length; the step's prompts and its loss (a mean over prompts) stay the same for 1, 2 or 4
    prompts per pass."""
    import instrugo.reward as reward

    rng = random.Random(0)
    rows = []
    for p in range(8):
        longest = rng.choice([5, 10, 25, 40])  # prompts differ in length
        counts = [longest] + rng.sample(range(1, longest), 3)
        rows.append({"id": f"p{p}", "prompt": f"Item {p}.", "ranking": [0, 1, 2, 3],
                     "responses": [" ".join(["word"] * c) + f" {p}.{i}" for i, c in enumerate(counts)]})
    data = tmp_path / "ranked.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    passes = []  # (prompt ids, longest sequence) of each forward pass
    real_batch_scores = reward.batch_scores

    def recording_batch_scores(model, tokenizer, tasks, max_length):
        passes.append(([t.id for t in tasks],
                       max(len(reward_inputs(tokenizer, t.prompt, r, max_length)) for t in tasks for r in t.responses)))
        return real_batch_scores(model, tokenizer, tasks, max_length)

    monkeypatch.setattr(reward, "batch_scores", recording_batch_scores)
    losses_by_micro, passes_by_micro = {}, {}
    for micro in (4, 2, 1):
        passes.clear()
        config = RewardConfig(model="tiny", comparisons=[str(data)], out=str(tmp_path / f"micro{micro}" / "rm"),
                              lr=1e-3, prompts_per_batch=4, micro_batch_prompts=micro, max_length=96,
                              heldout_fraction=0.0, normalize_data="", precision="fp32", save_every=100)
        run_reward(config)
        losses_by_micro[micro] = [r["loss"] for r in runio.read_metrics(tmp_path / f"micro{micro}" / "rm" / "metrics.jsonl")
                                  if not r.get("final")]
        passes_by_micro[micro] = list(passes)
    assert len(losses_by_micro[4]) == 2
    for micro in (2, 1):
        assert losses_by_micro[micro] == pytest.approx(losses_by_micro[4], rel=1e-4)
    width_of = {ids[0]: width for ids, width in passes_by_micro[1]}  # one prompt per pass: its own width
    steps_of_4 = [set(ids) for ids, _ in passes_by_micro[4]]
    assert sorted(steps_of_4[0] | steps_of_4[1]) == sorted(f"p{i}" for i in range(8))
    short_step, long_step = sorted(steps_of_4, key=lambda step: max(width_of[p] for p in step))
    assert max(width_of[p] for p in short_step) <= min(width_of[p] for p in long_step)
    for micro in (2, 1):
        per_step = 4 // micro
        steps = passes_by_micro[micro]
        for s in range(2):
            step = steps[s * per_step:(s + 1) * per_step]
            assert set().union(*(set(ids) for ids, _ in step)) == steps_of_4[s]
            widths = [w for _, w in step]
            assert widths == sorted(widths) and widths[0] < widths[-1]


def test_length_grouped_steps_cover_the_epoch_once_with_steps_of_similar_length():
    """20 examples, 3 per step, groups of 2 steps: each group of 6 consecutive examples of the epoch's
    shuffle is sorted by length and cut into 2 steps, so a step never mixes groups and holds the group's
    3 shortest or 3 longest; the 7 steps then come in a seeded shuffled order."""
    lengths = [(7 * i) % 20 for i in range(20)]  # a permutation of 0..19: ranks are unambiguous
    steps = length_grouped_steps(lengths, per_step=3, epoch=1, seed=5, group_steps=2)
    assert sorted(i for step in steps for i in step) == list(range(20)) and len(steps) == 7
    groups = [set(epoch_order(20, 1, 5)[start:start + 6]) for start in range(0, 20, 6)]
    for step in steps:
        assert [lengths[i] for i in step] == sorted(lengths[i] for i in step)
        group = next(g for g in groups if step[0] in g)
        assert set(step) <= group
        ranks = sorted(lengths[i] for i in group)
        assert {lengths[i] for i in step} in ({*ranks[:3]}, {*ranks[3:]})
    assert length_grouped_steps(lengths, 3, 1, 5, 2) == steps  # a resumed run takes the same steps
    assert length_grouped_steps(lengths, 3, 2, 5, 2) != steps
    assert [s for s in steps if len(s) < 3] == [sorted(groups[-1], key=lambda i: lengths[i])]  # the 2 left over


def test_a_shared_prompt_pass_gives_the_scores_and_gradients_of_full_passes(tiny_model_dir):
    """Responses continuing their prompt's cache (left-padded prompts of different lengths, right-padded
    responses) score and backpropagate as if each were read whole."""
    tokenizer = load_tokenizer(tiny_model_dir)
    model = init_reward_model(tiny_model_dir, tokenizer, seed=0, max_tokens=64)
    tasks = (make_task(0, 4, 1), make_task(123456789, 3, 2))
    groups = [[reward_inputs(tokenizer, task.prompt, r, 256) for r in task.responses] for task in tasks]
    groups[1].insert(0, reward_inputs(tokenizer, tasks[1].prompt, "a much longer answer " * 30, 256))
    assert len(padding_chunks(sorted(len(s) - shared_prefix_length(g) for g in groups for s in g))) == 2
    weights = torch.linspace(-1, 1, 8)

    def scores_and_gradient(grouped: bool):
        model.zero_grad()
        scores = (raw_scores(model, groups, tokenizer.pad_token_id) if grouped else
                  torch.cat([raw_scores(model, [[s]], tokenizer.pad_token_id) for g in groups for s in g]))
        (scores * weights).sum().backward()
        return scores.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    shared, shared_gradient = scores_and_gradient(True)
    full, full_gradient = scores_and_gradient(False)
    assert 5 < shared_prefix_length(groups[0]) < shared_prefix_length(groups[1]) and len({round(x, 3) for x in full.tolist()}) == 8
    torch.testing.assert_close(shared, full, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(shared_gradient, full_gradient, atol=1e-4, rtol=1e-3)


def test_padding_chunks_split_where_padding_costs_more_than_a_call():
    assert padding_chunks([10, 10, 10, 200]) == [[0, 1, 2], [3]]  # 30 + 200 + 2 calls < 4 x 200 + 1 call
    assert padding_chunks([50, 52, 54]) == [[0, 1, 2]]            # 162 + 1 call < any split
    assert padding_chunks([5]) == [[0]]
