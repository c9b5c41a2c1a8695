"""Demonstrations that pass by construction: choose facts a constraint set allows, then write them out.

A demonstration is composed in two passes. Every constraint first narrows the `FactPlan` (how many facts,
which words must or must not appear, no commas, short sentences); facts are then chosen from the topic,
and every constraint shapes the `Draft` (layout, title, opening, closing, case, ...). `render` writes the
draft out; the generator keeps it only if every verifier passes on the rendered text.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

from instrugo.judge.text import count_word, words

LAYOUTS = ("prose", "paragraphs", "bullets", "numbered", "sections", "two_responses", "json")
TWO_RESPONSE_DIVIDER = "******"


@dataclass
class FactPlan:
    """What the chosen facts must satisfy, gathered from every constraint before any fact is chosen."""

    counts: tuple[int, int] | None = None              # allowed numbers of facts (None: no constraint cares)
    require: dict[str, int] = field(default_factory=dict)  # word -> minimum occurrences
    avoid: set[str] = field(default_factory=set)
    no_commas: bool = False
    max_words: int | None = None                       # per fact
    plain: bool = False                                # no quotes or backslashes (facts go into JSON strings)

    def allow_counts(self, low: int, high: int) -> None:
        if self.counts is not None:
            low, high = max(low, self.counts[0]), min(high, self.counts[1])
        self.counts = (low, high)

    def allows(self, fact: str) -> bool:
        return not (any(count_word(fact, w) for w in self.avoid)
                    or (self.no_commas and "," in fact)
                    or (self.max_words is not None and len(words(fact)) > self.max_words)
                    or (self.plain and ('"' in fact or "\\" in fact)))


def choose_facts(facts: list[str], plan: FactPlan, k: int, rng: random.Random) -> list[str] | None:
    """k allowed facts covering the required words, in the topic's order; None if the plan can't be met."""
    pool = [f for f in facts if plan.allows(f)]
    chosen: list[str] = []
    for word, needed in plan.require.items():
        have = sum(count_word(f, word) for f in chosen)
        carriers = [f for f in pool if f not in chosen and count_word(f, word)]
        rng.shuffle(carriers)
        while have < needed and carriers:
            fact = carriers.pop()
            chosen.append(fact)
            have += count_word(fact, word)
        if have < needed:
            return None
    rest = [f for f in pool if f not in chosen]
    rng.shuffle(rest)
    chosen += rest[:max(0, k - len(chosen))]
    if len(chosen) != k:
        return None
    return sorted(chosen, key=facts.index)


@dataclass
class Draft:
    """A demonstration before it is written out: its facts plus what the constraints asked for."""

    title: str                          # the topic as it reads in a sentence
    facts: list[str]
    layout: str = "prose"               # one of LAYOUTS
    groups: int = 1                     # paragraphs or sections
    marker: str = "*"                   # bullet symbol, or the word that starts each section
    heading: str | None = None          # written as <<heading>> above everything
    opening: str | None = None          # first sentence
    endings: list[str] = field(default_factory=list)  # sentences after the facts
    closing: str | None = None          # last sentence
    postscript: str | None = None
    case: str | None = None             # "lower" or "upper"
    quoted: bool = False


def split_evenly(items: list[str], groups: int) -> list[list[str]]:
    size, extra = divmod(len(items), groups)
    out, start = [], 0
    for g in range(groups):
        end = start + size + (g < extra)
        out.append(items[start:end])
        start = end
    return out


def layout_blocks(d: Draft) -> list[str]:
    """The body as blocks that will be separated by blank lines."""
    if d.layout == "paragraphs":
        return [" ".join(g) for g in split_evenly(d.facts, d.groups)]
    if d.layout == "bullets":
        return ["\n".join(f"{d.marker} {f}" for f in d.facts)]
    if d.layout == "numbered":
        return ["\n".join(f"{i}. {f}" for i, f in enumerate(d.facts, start=1))]
    if d.layout == "sections":
        return [f"{d.marker} {i}\n" + " ".join(g) for i, g in enumerate(split_evenly(d.facts, d.groups), start=1)]
    if d.layout == "two_responses":
        first, second = split_evenly(d.facts, 2)
        return [" ".join(first), TWO_RESPONSE_DIVIDER, " ".join(second)]
    return [" ".join(d.facts)]


def render(d: Draft) -> str:
    if d.layout == "json":
        # Facts are plain ASCII without quotes, so changing case below cannot break the JSON.
        text = json.dumps({"topic": d.title, "answer": " ".join(d.facts)})
    else:
        blocks = layout_blocks(d)
        tail = d.endings + ([d.closing] if d.closing else [])
        # In running text the opening and closing sentences join the first and last paragraph; next to
        # lists and headings they stand on their own.
        if d.opening:
            if d.layout in ("prose", "paragraphs"):
                blocks[0] = f"{d.opening} {blocks[0]}"
            else:
                blocks.insert(0, d.opening)
        if tail:
            if d.layout in ("prose", "paragraphs", "sections"):
                blocks[-1] = " ".join([blocks[-1], *tail])
            else:
                blocks.append(" ".join(tail))
        if d.heading:
            blocks.insert(0, f"<<{d.heading}>>")
        if d.postscript:
            blocks.append(d.postscript)
        text = "\n\n".join(blocks)
    if d.case == "lower":
        text = text.lower()
    elif d.case == "upper":
        text = text.upper()
    return f'"{text}"' if d.quoted else text
