"""The verifiable constraint kinds (modelled on IFEval) and their verifiers.

A constraint is `{"kind": name, "args": {...}}`. Each `ConstraintKind` knows how to sample its args for a
topic, how to phrase itself as an instruction, how to verify a response, how to bend a demonstration so
that it passes (`plan` narrows the facts, `shape` sets layout and decorations; see `draft.py`), and
which kinds it cannot be combined with. Phrase matching ignores case, so every kind composes with the
upper/lowercase kinds.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from typing import Callable

from instrugo.judge.draft import TWO_RESPONSE_DIVIDER, Draft, FactPlan
from instrugo.judge.english import STOPWORDS
from instrugo.judge.text import BULLET_LINE, NUMBERED_LINE, count_word, paragraphs, sentences, words

RELATIONS = ("exactly", "at least", "at most")


def compare(value: int, relation: str, n: int) -> bool:
    return {"exactly": value == n, "at least": value >= n, "at most": value <= n}[relation]


def no_args(rng: random.Random, topic: dict) -> dict:
    return {}


def nothing(*_: object) -> None:
    return None


@dataclass(frozen=True)
class ConstraintKind:
    name: str
    phrasings: tuple[str, ...]                      # instruction sentences, formatted with the args
    verify: Callable[[str, dict], bool]             # (response, args) -> passed
    sample: Callable[[random.Random, dict], dict | None] = no_args  # None: no args fit this topic
    plan: Callable[[FactPlan, dict], None] = nothing
    shape: Callable[[Draft, dict, random.Random], None] = nothing
    conflicts: frozenset[str] = frozenset()
    list_joiner: str = "and"                        # how list args read in the instruction

    def instruction(self, args: dict, rng: random.Random) -> str:
        shown = {k: join_quoted(v, self.list_joiner) if isinstance(v, list) else v for k, v in args.items()}
        return rng.choice(self.phrasings).format(**shown)


def join_quoted(items: list[str], joiner: str) -> str:
    quoted = [f'"{item}"' for item in items]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} {joiner} {quoted[-1]}"


# ---- helpers the kinds share -------------------------------------------------------------------------

def fact_words(topic: dict) -> dict[str, int]:
    """Lowercase content words (4+ letters) of the topic's facts, not of its title -> facts containing them."""
    title = {w.lower() for w in words(topic["title"])}
    counts: dict[str, int] = {}
    for fact in topic["facts"]:
        for w in {w.lower() for w in words(fact)}:
            if len(w) >= 4 and w.isalpha() and w not in title and w not in STOPWORDS:
                counts[w] = counts.get(w, 0) + 1
    return counts


def topic_terms(topic: dict, fact_count: Callable[[int], bool]) -> list[str]:
    """Topic keywords (else other fact words) whose number of carrying facts passes `fact_count`."""
    counts = fact_words(topic)
    keywords = [k for k in topic["keywords"] if fact_count(counts.get(k, 0))]
    return keywords or sorted(w for w, c in counts.items() if fact_count(c))


def mark_words(draft: Draft, n: int, mark: Callable[[str], str], rng: random.Random) -> None:
    """Apply `mark` to the first occurrence of n random distinct longer words of the facts (emphasis kinds)."""
    candidates = sorted({w.lower() for f in draft.facts for w in re.findall(r"[A-Za-z]{5,}", f)} - STOPWORDS)
    chosen = set(rng.sample(candidates, min(n, len(candidates))))
    for i, fact in enumerate(draft.facts):
        pieces = re.split(r"([A-Za-z]+)", fact)
        for j in range(1, len(pieces), 2):
            if pieces[j].lower() in chosen:
                chosen.discard(pieces[j].lower())
                pieces[j] = mark(pieces[j])
        draft.facts[i] = "".join(pieces)


def title_case(title: str) -> str:
    small = {"a", "an", "and", "as", "at", "for", "in", "of", "on", "or", "the", "to"}
    out = [w if (w.lower() in small and i) or not w[0].islower() else w[0].upper() + w[1:]
           for i, w in enumerate(title.split())]
    return " ".join(out)


def set_layout(layout: str, groups_arg: str | None = None, marker: str | None = None):
    def shape(draft: Draft, args: dict, rng: random.Random) -> None:
        draft.layout = layout
        if groups_arg:
            draft.groups = args[groups_arg]
        if marker:
            draft.marker = args.get(marker) or rng.choice(["*", "-"])
    return shape


def exact_facts(arg: str, per_item: int = 1):
    def plan(p: FactPlan, args: dict) -> None:
        p.allow_counts(args[arg], args[arg] * per_item)
    return plan


# ---- the kinds ------------------------------------------------------------------------------------------

LAYOUT_KINDS = {"paragraph_count", "bullet_list", "numbered_list", "sections", "two_responses", "json_format"}
OPENINGS = ("Here is a short overview.", "Happy to help.", "Sure thing.", "Here is what I know about {title}.",
            "Let me explain {title}.", "Glad you asked about {title}.")
CLOSINGS = ("Is there anything else I can help with?", "Let me know if you have more questions.",
            "Hope this helps.", "That is all for now.", "Thanks for asking.")
QUESTIONS = ("Would you like to know more about {title}?", "What else would you like to learn about {title}?",
             "Have you ever seen this for yourself?", "Which part do you find most interesting?")
POSTSCRIPT_NOTES = ("I hope you found this useful.", "Feel free to ask a follow-up question.",
                    "There is always more to learn about {title}.")
PLACEHOLDER_SENTENCES = {
    2: ("For a guided visit contact [name] at [address].", "Check [website] for events on [date]."),
    3: ("Write to [name] at [address] or visit [website] to learn more.",),
}
ANSWER_OPTIONS = ["My answer is yes.", "My answer is no.", "My answer is maybe."]
PLACEHOLDER = re.compile(r"\[[^\[\]\n]+\]")
HIGHLIGHT = re.compile(r"\*[^\n*]+\*")
TITLE = re.compile(r"<<[^\n<>]*[A-Za-z0-9][^\n<>]*>>")


def has_letters(text: str) -> bool:
    return any(c.isalpha() for c in text)


def verify_json(text: str, args: dict) -> bool:
    body = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip(), flags=re.IGNORECASE)
    try:
        return isinstance(json.loads(body), (dict, list))
    except ValueError:
        return False


def verify_sections(text: str, args: dict) -> bool:
    heading = re.compile(rf"^\s*#*\s*{re.escape(args['marker'])}\s+(\d+)\b", re.IGNORECASE | re.MULTILINE)
    numbers = [int(m.group(1)) for m in heading.finditer(text)]
    bodies = heading.split(text)[2::2]  # split keeps the captured number; bodies follow each heading
    return numbers == list(range(1, args["n"] + 1)) and all(words(b) for b in bodies)


def verify_postscript(text: str, args: dict) -> bool:
    letters = r"\.\s?".join(re.escape(c) for c in args["marker"].rstrip(".").split("."))
    return re.search(rf"^\s*{letters}\.?\s*[A-Za-z0-9]", text, re.IGNORECASE | re.MULTILINE) is not None


def verify_two_responses(text: str, args: dict) -> bool:
    parts = [p.strip() for p in text.split(TWO_RESPONSE_DIVIDER)]
    return len(parts) == 2 and all(words(p) for p in parts) and parts[0].lower() != parts[1].lower()


def sample_word_count(rng: random.Random, topic: dict) -> dict:
    relation = rng.choice(["at least", "at most"])
    return {"relation": relation, "n": rng.choice([25, 30, 40, 50] if relation == "at least" else [40, 50, 60, 80])}


def sample_sentence_count(rng: random.Random, topic: dict) -> dict:
    relation = rng.choice(RELATIONS)
    return {"relation": relation, "n": rng.randint(*{"exactly": (2, 5), "at least": (2, 4), "at most": (3, 5)}[relation])}


def plan_sentence_count(p: FactPlan, args: dict) -> None:
    n, relation = args["n"], args["relation"]
    p.allow_counts(*{"exactly": (n, n), "at least": (n, n + 2), "at most": (2, n)}[relation])


def sample_keywords(rng: random.Random, topic: dict) -> dict | None:
    terms = topic_terms(topic, lambda c: c >= 1)
    return {"keywords": sorted(rng.sample(terms, min(len(terms), rng.choice([1, 2]))))} if terms else None


def sample_forbidden(rng: random.Random, topic: dict) -> dict | None:
    # Words that some facts use but at least eight avoid, so a demonstration can still be written.
    limit = len(topic["facts"]) - 8
    terms = topic_terms(topic, lambda c: 1 <= c <= limit)
    return {"words": [rng.choice(terms)]} if terms else None


def sample_frequency(rng: random.Random, topic: dict) -> dict | None:
    terms = topic_terms(topic, lambda c: c >= 3)
    return {"keyword": rng.choice(terms), "n": rng.choice([2, 3])} if terms else None


def phrase_choice(options: tuple[str, ...]):
    def sample(rng: random.Random, topic: dict) -> dict:
        return {"phrase": rng.choice(options).format(title=topic["title"])}
    return sample


KINDS: list[ConstraintKind] = [
    ConstraintKind(
        "lowercase",
        ("Your entire answer must be in lowercase letters.", "Use only lowercase letters; no capital letters at all.",
         "Write everything in lowercase."),
        verify=lambda t, a: has_letters(t) and t == t.lower(),
        shape=lambda d, a, r: setattr(d, "case", "lower"),
        conflicts=frozenset({"uppercase", "capital_words"})),
    ConstraintKind(
        "uppercase",
        ("Your entire answer must be in capital letters.", "Write your whole answer in uppercase letters.",
         "Answer in all caps."),
        verify=lambda t, a: has_letters(t) and t == t.upper(),
        shape=lambda d, a, r: setattr(d, "case", "upper"),
        conflicts=frozenset({"lowercase", "capital_words"})),
    ConstraintKind(
        "capital_words",
        ("Use at least {n} words written entirely in capital letters.",
         "Stress at least {n} words by writing them in all capital letters."),
        verify=lambda t, a: sum(len(w) >= 2 and w.isupper() for w in words(t)) >= a["n"],
        sample=lambda r, t: {"n": r.randint(2, 4)},
        shape=lambda d, a, r: mark_words(d, a["n"], str.upper, r),
        conflicts=frozenset({"lowercase", "uppercase"})),
    ConstraintKind(
        "word_count",
        ("Answer with {relation} {n} words.", "Your response should contain {relation} {n} words.",
         "Use {relation} {n} words."),
        verify=lambda t, a: compare(len(words(t)), a["relation"], a["n"]),
        sample=sample_word_count),
    ConstraintKind(
        "sentence_count",
        ("Your answer must have {relation} {n} sentences.", "Write {relation} {n} sentences."),
        verify=lambda t, a: compare(len(sentences(t)), a["relation"], a["n"]),
        sample=sample_sentence_count, plan=plan_sentence_count,
        conflicts=frozenset({"title", "bullet_list", "numbered_list", "sections", "postscript", "placeholders",
                             "start_phrase", "end_phrase", "answer_options", "end_question", "two_responses",
                             "json_format"})),
    ConstraintKind(
        "paragraph_count",
        ("Write exactly {n} paragraphs, separated by a blank line.",
         "Your answer must have {n} paragraphs. Separate paragraphs with a blank line."),
        verify=lambda t, a: len(paragraphs(t)) == a["n"],
        sample=lambda r, t: {"n": r.randint(2, 3)}, plan=exact_facts("n", per_item=2),
        shape=set_layout("paragraphs", "n"),
        conflicts=frozenset(LAYOUT_KINDS | {"title", "postscript", "answer_options"})),
    ConstraintKind(
        "bullet_list",
        ('Answer with exactly {n} bullet points, each on its own line starting with "* ".',
         "Format your answer as a list of exactly {n} markdown bullet points."),
        verify=lambda t, a: len(BULLET_LINE.findall(t)) == a["n"],
        sample=lambda r, t: {"n": r.randint(2, 5)}, plan=exact_facts("n"),
        shape=set_layout("bullets", marker="bullet"),
        conflicts=frozenset(LAYOUT_KINDS | {"highlights", "sentence_count", "answer_options"})),
    ConstraintKind(
        "numbered_list",
        ("Answer with a numbered list of exactly {n} items (1., 2., ...).",
         "Give exactly {n} points as a numbered list."),
        verify=lambda t, a: len(NUMBERED_LINE.findall(t)) == a["n"],
        sample=lambda r, t: {"n": r.randint(2, 5)}, plan=exact_facts("n"),
        shape=set_layout("numbered"),
        conflicts=frozenset(LAYOUT_KINDS | {"sentence_count", "answer_options"})),
    ConstraintKind(
        "sections",
        ("Your answer must have {n} sections. Mark the beginning of each section with {marker} X, "
         "where X is the section number.",
         "Divide your answer into {n} sections, starting each with {marker} 1, {marker} 2 and so on."),
        verify=verify_sections,
        sample=lambda r, t: {"n": r.randint(2, 3), "marker": r.choice(["Section", "Part"])},
        plan=exact_facts("n", per_item=2), shape=set_layout("sections", "n", marker="marker"),
        conflicts=frozenset(LAYOUT_KINDS | {"sentence_count", "answer_options"})),
    ConstraintKind(
        "two_responses",
        ("Give two different responses, separated by six asterisk symbols: ******.",
         "Write two different answers and put ****** between them."),
        verify=verify_two_responses,
        plan=lambda p, a: p.allow_counts(2, 6), shape=set_layout("two_responses"),
        conflicts=frozenset(LAYOUT_KINDS | {"title", "start_phrase", "end_phrase", "postscript", "quotation",
                                            "answer_options", "end_question", "sentence_count"})),
    ConstraintKind(
        "json_format",
        ("Wrap your entire output in JSON format.", "Give your whole answer as a JSON object."),
        verify=verify_json,
        plan=lambda p, a: setattr(p, "plain", True), shape=set_layout("json"),
        conflicts=frozenset(LAYOUT_KINDS | {"title", "start_phrase", "end_phrase", "quotation", "postscript",
                                            "placeholders", "no_commas", "sentence_count", "answer_options",
                                            "end_question", "sentence_length"})),
    ConstraintKind(
        "include_keywords",
        ("Include {keywords} in your answer.", "Make sure your answer uses {keywords}."),
        verify=lambda t, a: all(count_word(t, k) for k in a["keywords"]),
        sample=sample_keywords,
        plan=lambda p, a: p.require.update({k: max(1, p.require.get(k, 0)) for k in a["keywords"]})),
    ConstraintKind(
        "forbidden_words",
        ("Do not use the word {words} anywhere in your answer.", "Avoid the word {words} completely."),
        verify=lambda t, a: not any(count_word(t, w) for w in a["words"]),
        sample=sample_forbidden, plan=lambda p, a: p.avoid.update(a["words"])),
    ConstraintKind(
        "keyword_frequency",
        ('Use the word "{keyword}" at least {n} times.', 'The word "{keyword}" should appear at least {n} times.'),
        verify=lambda t, a: count_word(t, a["keyword"]) >= a["n"],
        sample=sample_frequency,
        plan=lambda p, a: p.require.update({a["keyword"]: max(a["n"], p.require.get(a["keyword"], 0))})),
    ConstraintKind(
        "start_phrase",
        ('Begin your answer with the exact words "{phrase}"', 'Start your response with "{phrase}"'),
        verify=lambda t, a: t.strip().lower().startswith(a["phrase"].lower()),
        sample=phrase_choice(OPENINGS), shape=lambda d, a, r: setattr(d, "opening", a["phrase"]),
        conflicts=frozenset({"title", "quotation", "json_format", "answer_options", "two_responses",
                             "sentence_count"})),
    ConstraintKind(
        "end_phrase",
        ('Finish your response with this exact phrase: "{phrase}" No other words should follow it.',
         'End your answer with the exact phrase "{phrase}"'),
        verify=lambda t, a: t.strip().lower().endswith(a["phrase"].lower()),
        sample=phrase_choice(CLOSINGS), shape=lambda d, a, r: setattr(d, "closing", a["phrase"]),
        conflicts=frozenset({"postscript", "quotation", "json_format", "end_question", "two_responses",
                             "sentence_count"})),
    ConstraintKind(
        "end_question",
        ("End your response with a question.", "Finish your answer by asking the reader a question."),
        verify=lambda t, a: t.strip().endswith("?"),
        shape=lambda d, a, r: setattr(d, "closing", r.choice(QUESTIONS).format(title=d.title)),
        conflicts=frozenset({"end_phrase", "postscript", "quotation", "json_format", "two_responses",
                             "sentence_count"})),
    ConstraintKind(
        "quotation",
        ("Wrap your entire response in double quotation marks.", "Put your whole answer inside double quotes."),
        verify=lambda t, a: len(t.strip()) >= 2 and t.strip()[0] in '"\u201c' and t.strip()[-1] in '"\u201d',
        shape=lambda d, a, r: setattr(d, "quoted", True),
        conflicts=frozenset({"json_format", "start_phrase", "end_phrase", "end_question", "two_responses"})),
    ConstraintKind(
        "title",
        ("Your answer must contain a title, wrapped in double angular brackets, such as <<my title>>.",
         "Give your answer a title in double angular brackets, like <<title>>."),
        verify=lambda t, a: TITLE.search(t) is not None,
        shape=lambda d, a, r: setattr(d, "heading", r.choice(["{t}", "All About {t}", "{t} in Brief",
                                                              "A Short Guide to {t}"]).format(t=title_case(d.title))),
        conflicts=frozenset({"json_format", "sentence_count", "paragraph_count", "start_phrase", "answer_options",
                             "two_responses"})),
    ConstraintKind(
        "no_commas",
        ("Do not use any commas in your response.", "Your entire answer must not contain a single comma."),
        verify=lambda t, a: "," not in t,
        plan=lambda p, a: setattr(p, "no_commas", True),
        conflicts=frozenset({"json_format"})),
    ConstraintKind(
        "postscript",
        ("At the end of your response, add a postscript starting with {marker}",
         "Finish with a postscript that starts with {marker}"),
        verify=verify_postscript,
        sample=lambda r, t: {"marker": r.choice(["P.S.", "P.P.S."])},
        shape=lambda d, a, r: setattr(d, "postscript", f"{a['marker']} "
                                      + r.choice(POSTSCRIPT_NOTES).format(title=d.title)),
        conflicts=frozenset({"end_phrase", "end_question", "json_format", "sentence_count", "paragraph_count",
                             "two_responses"})),
    ConstraintKind(
        "placeholders",
        ("Include at least {n} placeholders in square brackets, such as [address].",
         "Your answer must contain at least {n} placeholders written in square brackets like [name]."),
        verify=lambda t, a: len(PLACEHOLDER.findall(t)) >= a["n"],
        sample=lambda r, t: {"n": r.randint(2, 3)},
        shape=lambda d, a, r: d.endings.append(r.choice(PLACEHOLDER_SENTENCES[a["n"]])),
        conflicts=frozenset({"sentence_count", "json_format"})),
    ConstraintKind(
        "highlights",
        ("Highlight at least {n} parts of your answer with markdown, i.e. *highlighted part*.",
         "Use markdown to highlight at least {n} words or phrases, like *this*."),
        verify=lambda t, a: len(HIGHLIGHT.findall(t)) >= a["n"],
        sample=lambda r, t: {"n": r.randint(2, 3)},
        shape=lambda d, a, r: mark_words(d, a["n"], lambda w: f"*{w}*", r),
        conflicts=frozenset({"bullet_list"})),
    ConstraintKind(
        "sentence_length",
        ("Keep every sentence at most {n} words long.", "No sentence in your answer may be longer than {n} words."),
        verify=lambda t, a: bool(sentences(t)) and all(len(words(s)) <= a["n"] for s in sentences(t)),
        sample=lambda r, t: {"n": r.choice([12, 15, 18])},
        plan=lambda p, a: setattr(p, "max_words", a["n"]),
        conflicts=frozenset({"json_format"})),
    ConstraintKind(
        "answer_options",
        ("Start your answer with one of the following options: {options}",
         "Begin with exactly one of these options: {options}"),
        verify=lambda t, a: any(t.strip().lower().startswith(o.lower()) for o in a["options"]),
        sample=lambda r, t: {"options": list(ANSWER_OPTIONS)},
        shape=lambda d, a, r: setattr(d, "opening", a["options"][0]),
        conflicts=frozenset(LAYOUT_KINDS | {"start_phrase", "title", "quotation", "sentence_count"}),
        list_joiner="or"),
]

CONSTRAINT_KINDS: dict[str, ConstraintKind] = {kind.name: kind for kind in KINDS}


def compatible(a: str, b: str) -> bool:
    """Two kinds can share a prompt unless either names the other as a conflict (or they are the same)."""
    return a != b and b not in CONSTRAINT_KINDS[a].conflicts and a not in CONSTRAINT_KINDS[b].conflicts


def check_constraint(constraint: dict, response: str) -> bool:
    """Whether `response` satisfies one constraint `{"kind": ..., "args": {...}}`."""
    return CONSTRAINT_KINDS[constraint["kind"]].verify(response, constraint.get("args", {}))
