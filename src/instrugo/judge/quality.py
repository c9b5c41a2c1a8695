"""Degeneration and topicality: what keeps nonsense from scoring well by satisfying a constraint.

Both are pure Python over the response's words and run on every PPO rollout, so they stay simple:
vocabulary look-ups, n-gram counts and a letter-shape test for unknown words.
"""

from __future__ import annotations

import functools
import re
from collections import Counter

from instrugo.judge.english import COMMON_WORDS, STOPWORDS, word_forms
from instrugo.judge.text import words

MIN_FLUENT_WORDS = 8      # fewer words than this scale quality down linearly


def clip01(x: float) -> float:
    return min(1.0, max(0.0, x))


@functools.cache
def topics_by_name() -> dict[str, dict]:
    from instrugo.data.topics import TOPICS  # imported late: instrugo.data imports the judge

    return {t["name"]: t for t in TOPICS}


@functools.cache
def vocabulary() -> frozenset[str]:
    """Words the judge knows: common English plus everything the topics and instructions use."""
    from instrugo.judge import constraints

    texts = [t["title"] + " " + " ".join(t["keywords"] + t["facts"]) for t in topics_by_name().values()]
    texts += [s for group in (constraints.OPENINGS, constraints.CLOSINGS, constraints.QUESTIONS,
                              constraints.POSTSCRIPT_NOTES, constraints.ANSWER_OPTIONS) for s in group]
    texts += [s for group in constraints.PLACEHOLDER_SENTENCES.values() for s in group]
    return COMMON_WORDS | {w.lower() for text in texts for w in words(text)}


@functools.lru_cache(maxsize=1 << 16)
def word_score(word: str) -> float:
    """1 for a known word or number, 0.5 for an unknown word shaped like English, 0 for gibberish."""
    if not word.isalpha():
        return 1.0 if any(c.isdigit() for c in word) and len(word) <= 8 else 0.5
    lower = word.lower()
    if any(form in vocabulary() for form in word_forms(lower)):
        return 1.0
    plausible = (len(lower) <= 15 and re.search(r"[aeiouy]", lower) and not re.search(r"(.)\1\1", lower)
                 and not re.search(r"[^aeiouy]{5,}", lower))
    return 0.5 if plausible else 0.0


def repeated_ngram_share(tokens: list[str], n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier one (0 for varied text, near 1 for loops)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def repeated_line_share(text: str) -> float:
    lines = [line.strip().lower() for line in text.splitlines() if len(line.split()) >= 3]
    return 1 - len(set(lines)) / len(lines) if lines else 0.0


def degeneration(text: str, tokens: list[str]) -> tuple[float, list[str]]:
    """Quality in [0, 1] (1 = fluent) and the reasons it is lower."""
    if not tokens:
        return 0.0, ["empty"]
    reasons = []
    lower = [t.lower() for t in tokens]
    wordlike = sum(word_score(t) for t in tokens) / len(tokens)
    # All known words is fluent; half of them unknown-or-worse is gibberish.
    gibberish = clip01((wordlike - 0.5) / 0.3)
    # Loops repeat n-grams or lines; stutters ("bees bees bees") repeat the previous word.
    stutter = sum(a == b for a, b in zip(lower, lower[1:])) / max(1, len(lower) - 1)
    repetition = max(repeated_ngram_share(lower), repeated_line_share(text), 2 * stutter)
    content = [t for t in lower if t not in STOPWORDS]
    if len(content) >= 6:
        repetition = max(repetition, Counter(content).most_common(1)[0][1] / len(content) - 0.15)
    varied = clip01((0.5 - repetition) / 0.35)
    length = min(1.0, len(tokens) / MIN_FLUENT_WORDS)
    if gibberish < 1:
        reasons.append("gibberish" if gibberish < 0.5 else "unusual words")
    if varied < 1:
        reasons.append("repetitive")
    if length < 1:
        reasons.append("very short")
    return gibberish * varied * length, reasons


@functools.lru_cache(maxsize=4096)
def topic_terms(topic_name: str | None, prompt: str) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """(title terms, keywords, vocabulary) of a topic as word forms; without a known topic, the prompt's words."""
    topic = topics_by_name().get(topic_name) if topic_name else None
    if topic:
        title, keys = words(topic["title"]), topic["keywords"]
        vocab = [*title, *keys, *(w for fact in topic["facts"] for w in words(fact))]
    else:
        title, keys = [], words(prompt)
        vocab = keys

    def forms(items: list[str]) -> frozenset[str]:
        return frozenset(f for w in items if w.lower() not in STOPWORDS for f in word_forms(w.lower()))
    return forms(title), forms(keys), forms(vocab)


def topicality(example: dict, tokens: list[str]) -> float:
    """Overlap with the topic in [0, 1]: half for naming it (its title, or two keywords), half for using
    its vocabulary (full marks when half the content words are topic words). Case does not matter."""
    title, keys, vocab = topic_terms(example.get("topic"), example.get("prompt", ""))
    content = [t.lower() for t in tokens if t.isalpha() and t.lower() not in STOPWORDS]
    if not content:
        return 0.0
    content_forms = [set(word_forms(t)) for t in content]
    names_topic = any(f & title for f in content_forms)
    keyword_hits = {t for t, f in zip(content, content_forms) if f & keys}
    on_topic = sum(bool(f & vocab) for f in content_forms) / len(content)
    return 0.5 * min(1.0, (2 * names_topic + len(keyword_hits)) / 2) + 0.5 * min(1.0, on_topic / 0.5)
