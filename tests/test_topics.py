"""The curated InstruGo ingredients obey the shape rules the generator and the verifiers rely on."""

import re
from collections import Counter

import pytest

from instrugo.data.topics import TOPICS

FACTS_PER_TOPIC = 12
MIN_TOPICS = 160
FORBIDDEN_CHARS = set("\"'`:;()[]{}!?*#_|<>~")
# Pronouns that would make a fact lean on the sentence before it.
DANGLING_OPENERS = {"it", "its", "they", "their", "them", "this", "these", "those", "he", "she", "his", "her"}
MAX_SAME_OPENER = 5


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _mentions(fact: str, keyword: str) -> bool:
    """A keyword counts when some word of the fact starts with it ("bee" is in "bees")."""
    return any(word.startswith(keyword) for word in _words(fact))


ALL_FACTS = [(topic["name"], fact) for topic in TOPICS for fact in topic["facts"]]


def test_enough_topics_with_unique_names_and_titles():
    names = [topic["name"] for topic in TOPICS]
    assert len(TOPICS) >= MIN_TOPICS
    assert len(set(names)) == len(names)
    assert len({topic["title"] for topic in TOPICS}) == len(TOPICS)
    for name in names:
        assert re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", name), name


def test_every_topic_has_exactly_the_expected_fields():
    for topic in TOPICS:
        assert set(topic) == {"name", "title", "keywords", "facts"}, topic["name"]
        assert topic["title"] and topic["title"] == topic["title"].strip(), topic["name"]
        assert topic["title"].isascii() and not FORBIDDEN_CHARS & set(topic["title"]), topic["name"]


def test_keywords_are_lowercase_words_and_each_occurs_in_a_fact():
    for topic in TOPICS:
        keywords = topic["keywords"]
        assert 6 <= len(keywords) <= 10, topic["name"]
        assert len(set(keywords)) == len(keywords), topic["name"]
        for keyword in keywords:
            assert re.fullmatch(r"[a-z]+", keyword), (topic["name"], keyword)
            assert any(_mentions(fact, keyword) for fact in topic["facts"]), (topic["name"], keyword)


def test_exactly_twelve_facts_per_topic_and_enough_without_commas():
    for topic in TOPICS:
        facts = topic["facts"]
        assert len(facts) == FACTS_PER_TOPIC, (topic["name"], len(facts))
        assert sum("," not in fact for fact in facts) >= 6, topic["name"]


def _fact_problems(fact: str) -> list[str]:
    """The rules one fact breaks, by name; empty for a good fact."""
    words = fact.split()
    problems = []
    if not 8 <= len(words) <= 25:
        problems.append("word count")
    if not fact.isascii() or FORBIDDEN_CHARS & set(fact):
        problems.append("character")
    if not fact[:1].isupper() or not fact.endswith(".") or fact != fact.strip():
        problems.append("shape")
    # One sentence: the only period is the final one, and no list or markdown leader.
    if "." in fact[:-1] or fact[:1] in "-+*>" or "  " in fact:
        problems.append("one sentence")
    if words and words[0].lower() in DANGLING_OPENERS:
        problems.append("dangling opener")
    return problems


def test_every_fact_is_one_plain_sentence():
    problems = [(name, _fact_problems(fact), fact) for name, fact in ALL_FACTS if _fact_problems(fact)]
    assert not problems, problems[:10]


def test_openings_vary_within_a_topic():
    for topic in TOPICS:
        openers = Counter(fact.split()[0] for fact in topic["facts"])
        word, count = openers.most_common(1)[0]
        assert count <= MAX_SAME_OPENER, (topic["name"], word, count)


def test_no_fact_appears_twice_in_the_file():
    counts = Counter(fact.lower() for _, fact in ALL_FACTS)
    assert [fact for fact, n in counts.items() if n > 1] == []


@pytest.mark.parametrize(
    "fact, rule",
    [
        ("Bees make honey.", "word count"),
        ("Honeybees (mostly workers) make honey from the nectar of flowers.", "character"),
        ("Honeybees make honey from nectar: a sugary liquid from flowers.", "character"),
        ("honeybees make honey from the nectar they collect from flowers.", "shape"),
        ("Honeybees make honey from the nectar they collect from flowers", "shape"),
        ("Honeybees make honey. Worker bees collect nectar from many flowers.", "one sentence"),
        ("It makes honey from the nectar that worker bees collect from flowers.", "dangling opener"),
        ("Honeybees make honey from the nectar they collect from fl\u00f6wers.", "character"),
    ],
)
def test_fact_rules_catch_broken_facts(fact, rule):
    assert rule in _fact_problems(fact)


def test_good_fact_passes_and_keywords_match_word_prefixes():
    assert _fact_problems("Honeybees make honey from the nectar they collect from flowers.") == []
    assert _mentions("Worker bees make honey.", "bee")
    assert not _mentions("Queens lay eggs in the hive.", "bee")
