"""The simulated labeler pool: determinism, noise rates that match the settings, ties, and its output file."""

import math
from dataclasses import dataclass

import pytest

from instrugo.comparisons import ComparisonTask, read_tasks, task_rows
from instrugo.config import from_dict
from instrugo.labelers import (DEFAULT_POOL, Annotator, LabelerConfig, agreement_report, gold_ranking, noisy_ranking,
                               pair_agreement, simulate_command, simulate_labels, task_rng, tie_groups)
from instrugo.runio import InputError, atomic_write_jsonl


@dataclass
class Verdict:
    """The gold-judge fields the labelers read."""

    score: float
    constraint_fraction: float
    topicality: float = 0.0
    quality: float = 1.0
    n_words: int = 20


def score_judge(example, response):
    """Fake judge for responses written as 'resp <score>': a fluent response whose constraints set its score.

    Every annotator's utility (quality 1, topicality 0) then rises with the score, so noise-free
    annotators agree with the gold ranking."""
    value = float(response.split()[1])
    return Verdict(score=value, constraint_fraction=value)


def make_tasks(score_rows, prefix="t"):
    return [ComparisonTask(id=f"{prefix}{n}", prompt=f"prompt {n}", responses=[f"resp {s} #{i}" for i, s in enumerate(row)])
            for n, row in enumerate(score_rows)]


def spread_scores(n_tasks, k):
    """Distinct, varied scores per task (no ties)."""
    return [[round(((n * 7 + i * 13) % 97) / 97 + i * 1e-3, 4) for i in range(k)] for n in range(n_tasks)]


NOISE_FREE = LabelerConfig(flip_probability=0.0, temperature_scale=0.0)


def disagreement_with_gold(labeled):
    agreements = pairs = 0
    for task in labeled:
        a, p = pair_agreement(task, gold_ranking(task, score_judge), task.ranking)
        agreements, pairs = agreements + a, pairs + p
    return 1 - agreements / pairs, pairs


# --- pieces ---------------------------------------------------------------------------------------------

def test_annotator_utility_by_hand_and_gold_weights_reproduce_the_gold_score():
    concise = Annotator("c", 0.6, 0.25, 0.15, length_preference=30, length_weight=0.05)
    assert concise.utility(Verdict(0, 1.0, topicality=1.0, n_words=61)) == pytest.approx(1.0 - 0.05 * math.log(2))
    half_fluent = Annotator("s", 0.8, 0.1, 0.1).utility(Verdict(0, 0.5, topicality=1.0, quality=0.5))
    assert half_fluent == pytest.approx(0.5 * (0.4 + 0.1 + 0.1))

    from instrugo.judge import gold_judge

    gold_weights = Annotator("gold", 0.6, 0.25, 0.15)
    example = {"prompt": "Describe honeybees in two sentences.", "topic": None, "constraints": []}
    for text in ("Honeybees live in hives. They make honey from nectar.", "bee bee bee bee bee bee", "Cars are fast."):
        verdict = gold_judge(example, text)
        assert gold_weights.utility(verdict) == pytest.approx(verdict.score)


def test_tie_groups_exact_margin_and_chaining():
    values = [0.5, 0.9, 0.5, 0.1, 0.52]
    assert tie_groups(values, 0.0) == [[1], [4], [0, 2], [3]]
    assert tie_groups(values, 0.03) == [[1], [0, 2, 4], [3]]
    assert tie_groups([0.3, 0.32, 0.34], 0.025) == [[0, 1, 2]]  # chained: 0.3 and 0.34 tie through 0.32


def test_noisy_ranking_noise_free_and_fully_random():
    utilities = [0.2, 0.9, 0.5]
    assert noisy_ranking(utilities, 0.0, 0.0, 0.0, task_rng(0, "x", "s")) == [[1], [2], [0]]
    orders = {str(noisy_ranking(utilities, 0.0, 0.5, 0.0, task_rng(0, f"x{i}", "s"))) for i in range(200)}
    assert len(orders) == 6  # flip_probability 0.5: every ranking is a uniformly random permutation


# --- the pool ------------------------------------------------------------------------------------------

def test_same_seed_same_labels_independent_of_task_order():
    tasks = make_tasks(spread_scores(40, 4))
    config = LabelerConfig(seed=3)
    first = simulate_labels(tasks, config, score_judge)
    again = simulate_labels(tasks, config, score_judge)
    shuffled = simulate_labels(list(reversed(tasks)), config, score_judge)
    assert [(t.ranking, t.labeler) for t in first] == [(t.ranking, t.labeler) for t in again]
    assert {t.id: (t.ranking, t.labeler) for t in first} == {t.id: (t.ranking, t.labeler) for t in shuffled}
    other_seed = simulate_labels(tasks, LabelerConfig(seed=4), score_judge)
    assert [t.ranking for t in other_seed] != [t.ranking for t in first]
    assert all(not t.is_labeled for t in tasks)  # the inputs are left unlabeled


def test_noise_free_pool_reproduces_the_gold_ranking_including_ties():
    rows = spread_scores(50, 5) + [[0.4, 0.7, 0.4, 0.1], [0.3, 0.3]]
    labeled = simulate_labels(make_tasks(rows), NOISE_FREE, score_judge)
    for task in labeled:
        assert task.ranking == gold_ranking(task, score_judge)
    assert labeled[-2].ranking == [[1], [0, 2], [3]]
    assert labeled[-1].ranking == [[0, 1]]


@pytest.mark.parametrize("flip", [0.25, 0.1])
def test_measured_pair_flip_rate_matches_flip_probability(flip):
    # 3000 tasks of K = 4: the flip rate's standard error is about 0.006 (whole rankings are replaced, so
    # pairs of one task are correlated); 0.025 is four standard errors.
    labeled = simulate_labels(make_tasks(spread_scores(3000, 4)),
                              LabelerConfig(flip_probability=flip, temperature_scale=0.0), score_judge)
    rate, pairs = disagreement_with_gold(labeled)
    assert pairs == 3000 * 6
    assert rate == pytest.approx(flip, abs=0.025)


def test_preference_noise_is_bradley_terry_in_the_utility_difference():
    # One annotator whose utility is the score; utility gap 0.1 at temperature 0.1 → P(flip) = σ(−1).
    pool = [Annotator("bt", w_constraints=1.0, w_topicality=0.0, w_quality=0.0, temperature=0.1)]
    tasks = make_tasks([[0.6, 0.5]] * 3000)
    labeled = simulate_labels(tasks, LabelerConfig(flip_probability=0.0, temperature_scale=1.0), score_judge, pool)
    rate, _ = disagreement_with_gold(labeled)
    assert rate == pytest.approx(1 / (1 + math.e), abs=0.03)  # standard error ≈ 0.008


def test_annotators_differ():
    # Three responses trading constraints, topicality, fluency and length against each other.
    verdicts = {"a": Verdict(0, 1.0, topicality=0.2, quality=0.7, n_words=25),
                "b": Verdict(0, 0.5, topicality=1.0, quality=1.0, n_words=25),
                "c": Verdict(0, 0.75, topicality=0.5, quality=0.9, n_words=150)}
    rankings = {a.name: tie_groups([a.utility(v) for v in verdicts.values()], 0.0) for a in DEFAULT_POOL}
    assert len({str(r) for r in rankings.values()}) >= 3
    assert len({a.name for a in DEFAULT_POOL}) == len(DEFAULT_POOL) == 5
    # Every annotator of the pool gets work.
    labeled = simulate_labels(make_tasks(spread_scores(200, 3)), LabelerConfig(), score_judge)
    assert {t.labeler for t in labeled} == {a.name for a in DEFAULT_POOL}


def test_tie_margin_makes_ties_that_noise_never_splits():
    rows = [[0.50, 0.51, 0.9, 0.1]] * 200
    labeled = simulate_labels(make_tasks(rows), LabelerConfig(flip_probability=0.5, tie_margin=0.02), score_judge)
    assert all([0, 1] in t.ranking and len(t.ranking) == 3 for t in labeled)
    assert len({str(t.ranking) for t in labeled}) == 6  # the three groups in every order


def test_agreement_report_measures_gold_and_inter_annotator_agreement():
    tasks = make_tasks(spread_scores(600, 4))
    twins = [Annotator("twin-a", 1.0, 0.0, 0.0), Annotator("twin-b", 0.5, 0.0, 0.0)]  # same order, other scale
    clean = agreement_report(tasks, NOISE_FREE, score_judge, twins)
    assert clean["gold_agreement"] == clean["noise_free_gold_agreement"] == clean["inter_annotator_agreement"] == 1.0
    assert clean["gold_pairs"] == 600 * 6
    assert sum(a["tasks"] for a in clean["by_annotator"].values()) == 600

    noisy = agreement_report(tasks, LabelerConfig(flip_probability=0.25, temperature_scale=0.0), score_judge, twins)
    assert noisy["noise_free_gold_agreement"] == 1.0
    assert noisy["gold_agreement"] == pytest.approx(0.75, abs=0.04)
    # Two independent 25%-flip labels agree when both or neither flip: 0.75² + 0.25² = 0.625.
    assert noisy["inter_annotator_agreement"] == pytest.approx(0.625, abs=0.04)


def test_simulate_command_writes_valid_ranked_tasks(tmp_path):
    tasks = [ComparisonTask(id="q1", prompt="Describe honeybees in two sentences.",
                            responses=["Honeybees live in hives. They make honey.", "bee bee bee bee", "Cars."],
                            example={"prompt": "Describe honeybees in two sentences.", "topic": None,
                                     "constraints": []}),
             ComparisonTask(id="q2", prompt="Name a fruit.", responses=["An apple.", "A red apple from Kent."])]
    source, out = tmp_path / "tasks.jsonl", tmp_path / "out" / "rankings.jsonl"
    atomic_write_jsonl(source, task_rows(tasks))
    report = simulate_command(source, out, LabelerConfig(seed=1))
    labeled = read_tasks(out, require_ranking=True)
    assert [t.id for t in labeled] == ["q1", "q2"]
    assert all(t.labeler in {a.name for a in DEFAULT_POOL} for t in labeled)
    assert labeled[0].example == tasks[0].example and labeled[1].example is None
    assert report["tasks"] == 2 and 0.0 <= report["gold_agreement"] <= 1.0


def test_config_rejects_impossible_noise():
    with pytest.raises(InputError, match="flip_probability"):
        from_dict(LabelerConfig, {"flip_probability": 0.7})
    assert from_dict(LabelerConfig, {"flip_probability": "0.5", "tie_margin": 0.01}).flip_probability == 0.5
