"""How the judge reads a response: words, sentences, paragraphs and list lines.

Every verifier counts through these few functions, so "a word" or "a sentence" means the same thing to
all of them (and to the tests that pin them down).
"""

from __future__ import annotations

import re

WORD = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)*")
# A sentence ends at . ! or ? followed by whitespace, or at a line break (list items, headings).
SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\n+")
PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
BULLET_LINE = re.compile(r"^\s*[*\-\u2022]\s+\S", re.MULTILINE)
NUMBERED_LINE = re.compile(r"^\s*\d+[.)]\s+\S", re.MULTILINE)


def words(text: str) -> list[str]:
    """Words as written (letters, digits and inner apostrophes); punctuation and markup are not words."""
    return WORD.findall(text.replace("\u2019", "'"))


def sentences(text: str) -> list[str]:
    """Non-empty sentences; a piece without any word (a divider, a lone quote) is not a sentence."""
    return [s.strip() for s in SENTENCE_BREAK.split(text.strip()) if WORD.search(s)]


def paragraphs(text: str) -> list[str]:
    """Blocks separated by blank lines that contain at least one word."""
    return [p.strip() for p in PARAGRAPH_BREAK.split(text.strip()) if WORD.search(p)]


def count_word(text: str, word: str) -> int:
    """Occurrences of `word` as a whole word, ignoring case."""
    return len(re.findall(rf"(?<![A-Za-z0-9]){re.escape(word)}(?![A-Za-z0-9])", text, re.IGNORECASE))
