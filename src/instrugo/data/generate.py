"""The InstruGo generator: topic prompts with verifiable constraints, demonstrations and plain text.

Every prompt is a request about one topic followed by 1-3 constraint instructions. A demonstration is
composed from the topic's facts and shaped by the constraints (see `judge/draft.py`); a prompt is kept
only if its demonstration passes every verifier with a high gold score, so every prompt in every split is
satisfiable. The same seed always gives the same records: all randomness flows from one `random.Random`
per split, seeded with a string.
"""

from __future__ import annotations

import random

from instrugo.data.topics import TOPICS
from instrugo.judge import CONSTRAINT_KINDS, check_constraint, compatible, gold_judge
from instrugo.judge.constraints import LAYOUT_KINDS
from instrugo.judge.draft import Draft, FactPlan, choose_facts, render

DATASET_VERSION = "2"  # bump when the generator's output changes
DATASET_SEED = 0        # the seed of the shipped files
SPLITS = ("sft", "rm", "ppo", "eval", "eval_unseen", "pretrain")
PROMPT_SPLIT_SIZES = {"sft": 2000, "rm": 2000, "ppo": 2000, "eval": 320, "eval_unseen": 320}
PRETRAIN_SIZE = 2200
# Every 10th topic's pretrain paragraphs are held out to measure the alignment tax. Whole topics, not
# records: paragraphs recombine a topic's facts, so a held-out record would share its sentences with
# the PPO-ptx training text, and its loss would measure memorising them.
PRETRAIN_HELDOUT_TOPIC_EVERY = 10
# Kinds that appear only in eval_unseen: does instruction following generalise to new constraint kinds?
UNSEEN_KINDS = ("numbered_list", "highlights", "end_question", "sentence_length", "two_responses")
SEEN_KINDS = tuple(k for k in CONSTRAINT_KINDS if k not in UNSEEN_KINDS)
CONSTRAINTS_PER_PROMPT = {1: 0.4, 2: 0.4, 3: 0.2}
DEFAULT_FACTS = (3, 6)             # 3-6 facts of ~13 words: demonstrations of roughly 40-80 words
FALLBACK_FACTS = (2, 7, 1, 8)      # tried when no default count passes (e.g. "at most 40 words")
MIN_DEMONSTRATION_SCORE = 0.9

REQUESTS = ("Tell me about {title}.", "Describe {title}.", "Explain {title} to me.", "What should I know about {title}?",
            "Give me an overview of {title}.", "Write about {title}.", "Share some facts about {title}.",
            "I am curious about {title}. What can you tell me?", "Can you explain {title}?",
            "Help me understand {title}.")
PROSE_REQUESTS = ("Write a short paragraph about {title}.", "Write a brief note about {title} for a curious friend.",
                  "Explain {title} in a few sentences.", "Describe {title} in a short passage.")
CLAIM_REQUESTS = ('Here is a claim about {title}: "{fact}" Is it accurate?',
                  'Is this statement about {title} true? "{fact}"')


def sample_constraints(rng: random.Random, topic: dict, pool: tuple[str, ...], first: tuple[str, ...] = ()) -> list[dict]:
    """1-3 mutually compatible constraints; the first is drawn from `first` when given."""
    n = rng.choices(list(CONSTRAINTS_PER_PROMPT), weights=list(CONSTRAINTS_PER_PROMPT.values()))[0]
    candidates = [rng.choice(first)] if first else []
    candidates += rng.sample(pool, len(pool))
    chosen: list[dict] = []
    for name in candidates:
        if len(chosen) == n:
            break
        if any(not compatible(name, c["kind"]) for c in chosen):
            continue
        args = CONSTRAINT_KINDS[name].sample(rng, topic)
        if args is not None:
            chosen.append({"kind": name, "args": args})
    return chosen


def fact_counts(plan: FactPlan, rng: random.Random) -> list[int]:
    """Numbers of facts to try, most natural first."""
    if plan.counts is not None:
        low, high = plan.counts
        return rng.sample(range(low, high + 1), max(0, high - low + 1))
    return rng.sample(range(DEFAULT_FACTS[0], DEFAULT_FACTS[1] + 1), DEFAULT_FACTS[1] - DEFAULT_FACTS[0] + 1) + list(FALLBACK_FACTS)


def compose_demonstration(topic: dict, constraints: list[dict], rng: random.Random) -> tuple[str, list[str]] | None:
    """(text, the facts it is built from) passing every constraint, or None if none was found."""
    plan = FactPlan()
    for c in constraints:
        CONSTRAINT_KINDS[c["kind"]].plan(plan, c["args"])
    for k in fact_counts(plan, rng):
        facts = choose_facts(topic["facts"], plan, k, rng)
        if facts is None:
            continue
        draft = Draft(title=topic["title"], facts=list(facts))
        for c in constraints:
            CONSTRAINT_KINDS[c["kind"]].shape(draft, c["args"], rng)
        text = render(draft)
        if all(check_constraint(c, text) for c in constraints):
            return text, facts
    return None


def make_request(rng: random.Random, topic: dict, constraints: list[dict], facts: list[str]) -> str:
    kinds = {c["kind"] for c in constraints}
    if "answer_options" in kinds:  # the demonstration opens with "My answer is yes." and then the claim
        return rng.choice(CLAIM_REQUESTS).format(title=topic["title"], fact=facts[0])
    templates = REQUESTS if kinds & LAYOUT_KINDS else REQUESTS + PROSE_REQUESTS
    return rng.choice(templates).format(title=topic["title"])


def make_prompt_record(rng: random.Random, topic: dict, pool: tuple[str, ...], first: tuple[str, ...]) -> dict | None:
    constraints = sample_constraints(rng, topic, pool, first)
    composed = compose_demonstration(topic, constraints, rng) if constraints else None
    if composed is None:
        return None
    response, facts = composed
    instructions = [CONSTRAINT_KINDS[c["kind"]].instruction(c["args"], rng) for c in constraints]
    prompt = " ".join([make_request(rng, topic, constraints, facts), *instructions])
    record = {"topic": topic["name"], "prompt": prompt, "constraints": constraints, "response": response}
    if gold_judge(record, response).score < MIN_DEMONSTRATION_SCORE:
        return None
    return record


def generate_prompt_split(split: str, seed: int, taken: set[str]) -> list[dict]:
    """`PROMPT_SPLIT_SIZES[split]` records with prompts not in `taken` (which grows)."""
    rng = random.Random(f"instrugo-{seed}-{split}")
    topics = rng.sample(TOPICS, len(TOPICS))
    unseen = split == "eval_unseen"
    pool = tuple(CONSTRAINT_KINDS) if unseen else SEEN_KINDS
    records: list[dict] = []
    attempt = 0
    while len(records) < PROMPT_SPLIT_SIZES[split]:
        topic = topics[attempt % len(topics)]  # round robin keeps topics balanced
        attempt += 1
        record = make_prompt_record(rng, topic, pool, UNSEEN_KINDS if unseen else ())
        if record is None or record["prompt"] in taken:
            continue
        taken.add(record["prompt"])
        if split != "sft":
            del record["response"]
        records.append({"id": f"{split}-{len(records) + 1:06d}", "split": split, **record})
    return records


def generate_pretrain(seed: int) -> list[dict]:
    """Plain multi-sentence paragraphs from the facts, for PPO-ptx and the alignment-tax measurement."""
    rng = random.Random(f"instrugo-{seed}-pretrain")
    seen: set[str] = set()
    records: list[dict] = []
    while len(records) < PRETRAIN_SIZE:
        topic_index = len(records) % len(TOPICS)
        topic = TOPICS[topic_index]
        facts = topic["facts"]
        text = " ".join(sorted(rng.sample(facts, rng.randint(3, 6)), key=facts.index))
        if text in seen:
            continue
        seen.add(text)
        index = len(records) + 1
        records.append({"id": f"pretrain-{index:06d}", "split": "pretrain", "topic": topic["name"], "text": text,
                        "heldout": topic_index % PRETRAIN_HELDOUT_TOPIC_EVERY == PRETRAIN_HELDOUT_TOPIC_EVERY - 1})
    return records


def generate(seed: int = 0) -> dict[str, list[dict]]:
    """Every split; deterministic: the same seed gives identical records. No prompt is in two splits."""
    taken: set[str] = set()
    splits = {split: generate_prompt_split(split, seed, taken) for split in PROMPT_SPLIT_SIZES}
    splits["pretrain"] = generate_pretrain(seed)
    return splits
