import math

from instrugo.evaluate import best_of_n_kl, judged_row, summarize, win_rate
from instrugo.generation import Sample


def row(gold, passed, tokens=10, has_eos=True, kinds=()):
    return {"gold_score": gold, "all_passed": passed, "n_tokens": tokens, "has_eos": has_eos,
            "constraints": [{"kind": k} for k in kinds], "constraint_results": [passed] * len(kinds)}


def test_win_rate_counts_ties_half_and_skips_unjudged_prompts():
    assert win_rate([0.9, 0.5, 0.1, None], [0.1, 0.5, 0.9, 0.3]) == (1 + 0.5 + 0) / 3
    assert win_rate([None], [0.2]) is None


def test_summary_by_hand_with_a_prompt_the_gold_judge_cannot_score():
    rows = [row(1.0, True, 10, kinds=("uppercase",)), row(0.5, False, 20, False, kinds=("uppercase", "title")),
            row(None, None, 30)]
    summary = summarize(rows)
    assert summary["n"] == 3 and summary["n_judged"] == 2
    assert summary["constraint_pass_rate"] == 0.5 and summary["gold_score"] == 0.75
    assert summary["mean_length_tokens"] == 20 and math.isclose(summary["no_eos_rate"], 1 / 3)
    assert summary["pass_rate_by_kind"] == {"title": 0.0, "uppercase": 0.5}
    assert summarize([row(None, None)])["gold_score"] is None


def test_summary_means_the_gold_score_terms_over_judged_prompts():
    terms = ("constraint_fraction", "topicality", "quality")
    rows = [row(1.0, True) | dict(zip(terms, (1.0, 0.75, 1.0))), row(0.3, False) | dict(zip(terms, (0.5, 0.25, 0.5))),
            row(None, None) | dict.fromkeys(terms)]
    summary = summarize(rows)
    assert [summary[t] for t in terms] == [0.75, 0.5, 0.75]
    # Generations saved before the terms were kept still summarise, without them.
    assert [summarize([row(0.5, True)])[t] for t in terms] == [None, None, None]


def test_best_of_n_kl_is_log_n_minus_n_minus_one_over_n():
    assert best_of_n_kl(1) == 0.0
    assert math.isclose(best_of_n_kl(16), math.log(16) - 15 / 16)


def test_judged_row_uses_the_gold_judge_only_when_there_are_constraints():
    from instrugo.data import load_split
    from instrugo.judge import gold_judge

    record = load_split("eval")[0]
    good = judged_row("k", record, Sample(0, "", [2], True), gold_judge)
    assert good["gold_score"] is not None and good["all_passed"] is False  # an empty answer fails
    # An answer whose three terms differ, so a term stored under another's name shows.
    text = "My answer is yes. Spices add flavour to food, and cooks use pepper and salt."
    partial = judged_row("k", record, Sample(0, text, [2], True), gold_judge)
    verdict = gold_judge(record, text)
    terms = (verdict.constraint_fraction, verdict.topicality, verdict.quality)
    assert len(set(terms)) == 3
    assert (partial["constraint_fraction"], partial["topicality"], partial["quality"]) == terms
    free = judged_row("k", {"prompt": "Tell me a joke."}, Sample(0, "A joke.", [5, 2], True), gold_judge)
    assert free["gold_score"] is None and free["all_passed"] is None and free["constraint_results"] == []
    assert free["quality"] is None and free["topicality"] is None and free["constraint_fraction"] is None


def test_best_of_n_keeps_each_prompts_own_reward_model_favourite(monkeypatch):
    import instrugo.evaluate
    import instrugo.reward
    from instrugo.evaluate import EvalConfig, best_of_n_rows

    records = [{"prompt": p, "messages": [{"role": "user", "content": p}]} for p in ("first", "second", "third")]
    groups = [[Sample(i, f"{p} answer {value}", [5, 2], True) for value in values]
              for i, (p, values) in enumerate(zip(("first", "second", "third"), ((3, 9, 1), (7, 2, 8), (4, 6, 5))))]
    monkeypatch.setattr(instrugo.evaluate, "sample_responses", lambda *a, **k: groups)
    seen = []

    def score_by_number(model, tokenizer, prompts, responses, precision, **kwargs):
        seen.append(list(zip([m[0]["content"] for m in prompts], responses)))
        return [float(r.split()[-1]) for r in responses]  # the score each response names

    monkeypatch.setattr(instrugo.reward, "score_texts", score_by_number)
    config = EvalConfig(reward_model="rm", best_of=3, max_new_tokens=4)
    rows = best_of_n_rows(None, None, records, "key", config, "fp32", (None, None))
    assert [r["response"] for r in rows] == ["first answer 9", "second answer 8", "third answer 6"]
    assert [r["rm_score"] for r in rows] == [9.0, 8.0, 6.0]
    assert all(response.startswith(prompt) for call in seen for prompt, response in call)  # prompts stay paired
