"""Simulated labelers: a seeded pool of noisy annotators that rank comparison tasks (AlpacaFarm-style).

Each task gets one annotator from the pool, by a seeded choice per task id (so a task's label does not
depend on which other tasks are in the file or in what order). The annotator judges every response with
the gold judge's components and ranks them by its own utility, with two kinds of noise:

1. Preference noise: the ranking is a Plackett–Luce sample, i.e. responses are sorted by
   utility / temperature + Gumbel noise. For any two responses this orders them Bradley–Terry style,
   P(i above j) = σ((u_i − u_j) / temperature), because the difference of two Gumbels is logistic.
2. Label flips: with probability 2·flip_probability the whole ranking is replaced by a uniformly random
   permutation. A random permutation orders any given pair either way with probability ½, so each pair
   is flipped with probability exactly `flip_probability`. This is AlpacaFarm's definition: "25% label
   flip" = with probability 0.5 a uniformly random label (REFERENCE §7).

The default noise is calibrated to people: two annotators of the pool agree on 67% of pairs, as people do
(AlpacaFarm ~66%, InstructGPT 72.6%). AlpacaFarm's 25% flips, added to this pool's own preference noise,
gave 55.7%, below any human group, and labels agreeing with the gold judge on only 64-66% of pairs, on which
a reward model from a few thousand comparisons stayed near chance; `--flip-probability 0.25
--temperature-scale 1` restores that setting.

Responses whose utilities lie within `tie_margin` of each other form a tie group, ranked together; the
noise orders groups, never splits them. A noise-free pool (flip_probability 0, temperature_scale 0) ranks
by utility alone, and the gold ranking (`gold_ranking`) is the ranking by gold score.

`simulate_command` is what `instrugo label simulate` runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from instrugo.comparisons import ComparisonTask, read_tasks, task_rows
from instrugo.config import option, require
from instrugo.runio import atomic_write_jsonl, format_percent

Ranking = list[list[int]]  # response indices, best tie group first (the comparison-task format)
# gold_judge(example, response) -> GoldVerdict; replaceable so tests can hand-make the judgements.
Judge = Callable[[dict, str], Any]


@dataclass(frozen=True)
class Annotator:
    """One simulated labeler: what it values in a response and how consistently it ranks.

    utility = quality · (w_constraints·constraint_fraction + w_topicality·topicality + w_quality)
              − length_weight · |log((n_words + 1) / (length_preference + 1))|

    The gold score has this form with weights (0.6, 0.25, 0.15) and no length term, so each annotator is
    a plausible labeler who weighs the same evidence differently; the length term is a preference for
    shorter or longer answers measured as a ratio (40 words against a preferred 20 costs about as much as 10).
    `temperature` is the utility difference at which the annotator prefers the better response with
    probability σ(1) ≈ 0.73.
    """

    name: str
    w_constraints: float
    w_topicality: float
    w_quality: float
    length_preference: int = 0  # words; 0 = no preference
    length_weight: float = 0.0
    temperature: float = 0.05

    def utility(self, verdict: Any) -> float:
        value = verdict.quality * (self.w_constraints * verdict.constraint_fraction
                                   + self.w_topicality * verdict.topicality + self.w_quality)
        if self.length_preference:
            value -= self.length_weight * abs(math.log((verdict.n_words + 1) / (self.length_preference + 1)))
        return value


DEFAULT_POOL: tuple[Annotator, ...] = (
    Annotator("sim-strict", w_constraints=0.8, w_topicality=0.1, w_quality=0.1, temperature=0.04),
    Annotator("sim-topical", w_constraints=0.45, w_topicality=0.4, w_quality=0.15, temperature=0.05),
    Annotator("sim-fluency", w_constraints=0.4, w_topicality=0.2, w_quality=0.4, temperature=0.05),
    Annotator("sim-concise", w_constraints=0.6, w_topicality=0.25, w_quality=0.15, length_preference=30,
              length_weight=0.05, temperature=0.06),
    Annotator("sim-thorough", w_constraints=0.6, w_topicality=0.25, w_quality=0.15, length_preference=120,
              length_weight=0.05, temperature=0.06),
)


@dataclass
class LabelerConfig:
    """The simulated labeler pool's noise. Defaults: annotators agree with each other as often as people do."""

    flip_probability: float = option(0.1, "Share of response pairs whose label is flipped (AlpacaFarm: 0.25 "
                                          "for training labels, 0 for evaluation); implemented as a uniformly "
                                          "random ranking with twice this probability.")
    temperature_scale: float = option(0.5, "Multiplies every annotator's temperature (0 = no preference noise).")
    tie_margin: float = option(0.0, "Responses whose utilities differ by at most this are ranked as a tie.")
    seed: int = option(0, "Seed of the annotator choice and the noise (combined with each task id).")

    def validate(self) -> None:
        require(0.0 <= self.flip_probability <= 0.5, "flip_probability",
                "must be 0..0.5 (0.5 already makes every label a coin flip)")
        require(self.temperature_scale >= 0.0, "temperature_scale", "must be >= 0")
        require(self.tie_margin >= 0.0, "tie_margin", "must be >= 0")


def task_rng(seed: int, task_id: str, stream: str) -> np.random.Generator:
    """A random generator that depends only on the seed, the task id and the purpose of its draws."""
    digest = hashlib.sha256(f"{seed}/{task_id}/{stream}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def tie_groups(values: Sequence[float], margin: float) -> Ranking:
    """Indices sorted by value, best first, grouped so that neighbours within `margin` share a group.

    Grouping chains (a ~ b and b ~ c puts a, b, c in one group even if a and c differ by more than the
    margin), so a ranking never contradicts itself.
    """
    order = sorted(range(len(values)), key=lambda i: -values[i])
    groups: Ranking = []
    for previous, index in zip([None] + order[:-1], order):
        if previous is not None and values[previous] - values[index] <= margin:
            groups[-1].append(index)
        else:
            groups.append([index])
    return [sorted(group) for group in groups]


def noisy_ranking(utilities: Sequence[float], temperature: float, flip_probability: float, tie_margin: float,
                  rng: np.random.Generator) -> Ranking:
    """One annotator's ranking: Plackett–Luce over tie groups, or a random order with prob. 2·flip_probability.

    All random numbers are drawn whatever the settings, so two configs that differ only in their noise
    levels see the same draws for the same task (their labels differ only where the settings do).
    """
    groups = tie_groups(utilities, tie_margin)
    coin, gumbel, permutation = rng.random(), rng.gumbel(size=len(groups)), rng.permutation(len(groups))
    if coin < 2 * flip_probability:
        return [groups[i] for i in permutation]
    group_utility = np.array([np.mean([utilities[i] for i in group]) for group in groups])
    keys = group_utility / temperature + gumbel if temperature > 0 else group_utility
    return [groups[i] for i in np.argsort(-keys, kind="stable")]


def judge_responses(task: ComparisonTask, judge: Judge | None = None) -> list[Any]:
    """Gold-judge verdicts of the task's responses.

    A task without an InstruGo record (`example`) is judged against its prompt alone: quality and
    topicality count, and with no constraints to check every response passes them all.
    """
    if judge is None:
        from instrugo.judge import gold_judge as judge
    example = task.example if task.example is not None else {"prompt": task.prompt}
    return [judge(example, response) for response in task.responses]


def annotate(annotator: Annotator, verdicts: list[Any], config: LabelerConfig, rng: np.random.Generator) -> Ranking:
    utilities = [annotator.utility(v) for v in verdicts]
    return noisy_ranking(utilities, annotator.temperature * config.temperature_scale, config.flip_probability,
                         config.tie_margin, rng)


def first_opinion(task: ComparisonTask, verdicts: list[Any], config: LabelerConfig,
                  pool: Sequence[Annotator]) -> tuple[Annotator, Ranking]:
    """The label a task gets: its seeded annotator's ranking."""
    rng = task_rng(config.seed, task.id, "label")
    annotator = pool[rng.integers(len(pool))]
    return annotator, annotate(annotator, verdicts, config, rng)


def second_opinion(task: ComparisonTask, verdicts: list[Any], config: LabelerConfig, pool: Sequence[Annotator],
                   first: Annotator) -> Ranking:
    """The same task labeled by another annotator of the pool (with its own noise), to measure agreement."""
    rng = task_rng(config.seed, task.id, "second opinion")
    others = [a for a in pool if a.name != first.name] or list(pool)
    return annotate(others[rng.integers(len(others))], verdicts, config, rng)


def gold_ranking(task: ComparisonTask, judge: Judge | None = None) -> Ranking:
    """The noise-free ranking by gold score (exactly equal scores tie): ground truth for evaluation."""
    return tie_groups([v.score for v in judge_responses(task, judge)], 0.0)


def simulate_labels(tasks: Sequence[ComparisonTask], config: LabelerConfig, judge: Judge | None = None,
                    pool: Sequence[Annotator] = DEFAULT_POOL) -> list[ComparisonTask]:
    """Labeled copies of `tasks`: the ranking and the name of the annotator who made it."""
    labeled = []
    for task in tasks:
        annotator, ranking = first_opinion(task, judge_responses(task, judge), config, pool)
        labeled.append(dataclasses.replace(task, ranking=ranking, labeler=annotator.name))
    return labeled


def pair_agreement(task: ComparisonTask, reference: Ranking, other: Ranking) -> tuple[float, int]:
    """(agreements, pairs) over the pairs `reference` orders strictly; a tie in `other` counts half."""
    reference_pairs = dataclasses.replace(task, ranking=reference).pairs()
    levels = dataclasses.replace(task, ranking=other).rank_levels()
    agreements = sum(1.0 if levels[i] < levels[j] else 0.5 if levels[i] == levels[j] else 0.0
                     for i, j in reference_pairs)
    return agreements, len(reference_pairs)


def agreement_report(tasks: Sequence[ComparisonTask], config: LabelerConfig, judge: Judge | None = None,
                     pool: Sequence[Annotator] = DEFAULT_POOL) -> dict[str, Any]:
    """How the simulated labels compare with the gold ranking and with each other, pair by pair.

    - `gold_agreement`: share of the pairs the gold score orders that the labels order the same way;
    - `noise_free_gold_agreement`: the same for the annotators without noise (their preferences alone);
    - `inter_annotator_agreement`: share of the pairs one annotator orders that a second, different
      annotator (own noise) orders the same way; compare with humans: InstructGPT 72.6 ± 1.5%,
      AlpacaFarm ~66%.
    A tie where the reference has an order counts half.
    """
    noise_free = dataclasses.replace(config, flip_probability=0.0, temperature_scale=0.0)
    totals = {"gold": [0.0, 0], "noise_free": [0.0, 0], "inter": [0.0, 0]}
    by_annotator: dict[str, dict[str, float]] = {}
    for task in tasks:
        verdicts = judge_responses(task, judge)
        gold = tie_groups([v.score for v in verdicts], 0.0)
        annotator, label = first_opinion(task, verdicts, config, pool)
        _, clean_label = first_opinion(task, verdicts, noise_free, pool)
        measured = {"gold": pair_agreement(task, gold, label),
                    "noise_free": pair_agreement(task, gold, clean_label),
                    "inter": pair_agreement(task, label, second_opinion(task, verdicts, config, pool, annotator))}
        for key, (agreements, pairs) in measured.items():
            totals[key][0] += agreements
            totals[key][1] += pairs
        own = by_annotator.setdefault(annotator.name, {"tasks": 0, "agreements": 0.0, "pairs": 0})
        own["tasks"] += 1
        own["agreements"] += measured["gold"][0]
        own["pairs"] += measured["gold"][1]

    def share(agreements: float, pairs: int) -> float | None:
        return round(agreements / pairs, 4) if pairs else None

    return {
        "tasks": len(tasks),
        "gold_pairs": totals["gold"][1],
        "gold_agreement": share(*totals["gold"]),
        "noise_free_gold_agreement": share(*totals["noise_free"]),
        "inter_annotator_agreement": share(*totals["inter"]),
        "by_annotator": {name: {"tasks": own["tasks"], "gold_agreement": share(own["agreements"], own["pairs"])}
                         for name, own in sorted(by_annotator.items())},
        "config": dataclasses.asdict(config),
    }


def simulate_command(tasks_path: str | os.PathLike, out_path: str | os.PathLike, config: LabelerConfig) -> dict:
    """`instrugo label simulate`: label a task file with the pool, write it atomically, report agreement."""
    tasks = read_tasks(tasks_path)
    atomic_write_jsonl(out_path, task_rows(simulate_labels(tasks, config)))
    return agreement_report(tasks, config)


@dataclass
class SimulateConfig(LabelerConfig):
    """`instrugo label simulate`: the pool's settings plus the files to read and write."""

    tasks: str = option("tasks.jsonl", "Comparison tasks to rank (from `instrugo sample`).")
    out: str = option("labeled.jsonl", "Where to write the ranked tasks.")


def run_simulate(config: SimulateConfig) -> dict:
    pool_config = LabelerConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(LabelerConfig)})
    report = simulate_command(config.tasks, config.out, pool_config)
    print(f"label: ranked {report['tasks']} tasks into {config.out}; pairwise agreement with the noise-free gold "
          f"judge {format_percent(report['gold_agreement'])}, between annotators {format_percent(report['inter_annotator_agreement'])} "
          f"(people: ~66-73%)")
    return report

