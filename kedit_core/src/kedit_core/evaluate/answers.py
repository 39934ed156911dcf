"""Scoring what the model says: the answer span of a greedy continuation, its match with the target, and
the signs of a degenerate continuation. Pure text functions (no torch); the evaluator generates.

The generation protocol: greedy decoding from the prompt alone (no target in context), stopped at a
natural end -- EOS, a newline after the answer has begun, the end of a sentence -- or a token budget.
The *answer text* is that continuation; the *answer span* is its leading phrase: the answer text cut at
its first clause break (``,`` ``;`` ``:`` ``(`` a dash, a sentence end) or at the first word that opens a
new phrase (a preposition, conjunction, auxiliary verb or relative pronoun: :data:`PHRASE_BREAKS`) --
except inside the target itself when the text starts with it. "Rome, Italy." -> "Rome"; "Constantinople
in 1851." -> "Constantinople"; "bishop of Jerusalem" -> "bishop"; for the target "Bank of America",
"Bank of America in 1998" -> "Bank of America". Articles are dropped by normalization.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

#: a sentence ends at . ! ? followed by a space and a capital letter, a quote, or the end of the text --
#: not after a single capital ("J. R. R. Tolkien") or a common abbreviation
_SENTENCE_END = re.compile(r"[.!?](?=\s+[\"'A-Z\u00c0-\u024f]|\s*$)")
_ABBREVIATIONS = {"st", "mr", "mrs", "ms", "dr", "jr", "sr", "no", "vs", "inc", "ltd", "co", "mt", "ft"}
_CLAUSE_BREAK = re.compile(r"[,;:(]|\s[-\u2013\u2014]\s")
_ARTICLES = {"a", "an", "the"}
#: words that open a new phrase after the answer's own
PHRASE_BREAKS = frozenset(
    "in on at of for from by with to into during since until after before and or but nor so yet "
    "who whom whose which that where when while because as is was are were be been has have had "
    "will would can could should may might must".split()
)
_WORD = re.compile(r"\w+", re.UNICODE)


#: an HTML/XML tag in generated text (``<strong>actor</strong>``): markup, not words of the answer
_MARKUP = re.compile(r"</?[A-Za-z][A-Za-z0-9]*(\s[^<>]*)?/?>")


def normalize(text: str) -> str:
    """Lower case, NFKC, markup tags, punctuation and the articles a/an/the removed, spaces collapsed."""
    words = _WORD.findall(_MARKUP.sub(" ", unicodedata.normalize("NFKC", text)).lower())
    return " ".join(w for w in words if w not in _ARTICLES)


def _is_sentence_end(text: str, pos: int) -> bool:
    if text[pos] != ".":
        return True
    before = re.search(r"(\w+)$", text[:pos])
    word = before.group(1) if before else ""
    if len(word) == 1 and word.isupper() or word.lower() in _ABBREVIATIONS:
        return False
    return not (pos + 1 < len(text) and text[pos + 1].isdigit())


def sentence_end(text: str, start: int = 0) -> int | None:
    """Index just past the first sentence end in ``text`` at or after ``start``, or None."""
    for m in _SENTENCE_END.finditer(text, start):
        if _is_sentence_end(text, m.start()):
            return m.start() + 1
    return None


def answer_text(continuation: str) -> str:
    """The continuation from its first non-blank character to the first newline or sentence end."""
    text = continuation.lstrip()
    newline = text.find("\n")
    if newline >= 0:
        text = text[:newline]
    end = sentence_end(text)
    return (text[:end] if end is not None else text).strip()


def answer_span(continuation: str, target: str | None = None) -> str:
    """The answer text cut at its first clause break or sentence end, never inside the target when the
    text starts with it."""
    text = answer_text(continuation)
    skip = 0
    if target and normalize(text).startswith(normalize(target)) and normalize(target):
        skip = _covering_prefix(text, target)
    m = _CLAUSE_BREAK.search(text, skip)
    cut = m.start() if m else len(text)
    for w in _WORD.finditer(text, skip, cut):
        if w.start() > 0 and w.group().lower() in PHRASE_BREAKS:
            cut = w.start()
            break
    return text[:cut].strip().rstrip(".!?").strip()


def _covering_prefix(text: str, target: str) -> int:
    """Length of the shortest prefix of ``text`` whose normalized form covers the normalized target."""
    want = normalize(target)
    for i in range(1, len(text) + 1):
        if normalize(text[:i]).startswith(want):
            return i
    return len(text)


def exact_match(continuation: str, target: str) -> bool:
    """The normalized answer span equals the normalized target."""
    want = normalize(target)
    return bool(want) and normalize(answer_span(continuation, target)) == want


def starts_with(continuation: str, target: str) -> bool:
    """The normalized answer text starts with the normalized target at a word boundary."""
    want, text = normalize(target), normalize(answer_text(continuation))
    return bool(want) and (text == want or text.startswith(want + " "))


def contains(continuation: str, target: str) -> bool:
    """The normalized target occurs, as whole words, in the normalized answer text."""
    want, text = normalize(target), normalize(answer_text(continuation))
    return bool(want) and f" {want} " in f" {text} "


MATCHES = {"exact": exact_match, "starts": starts_with, "contains": contains}


def same_answer(edited: str, unedited: str) -> bool:
    """Locality in the generation protocol: the edited model's answer span is the unedited model's."""
    return normalize(answer_span(edited, answer_span(unedited))) == normalize(answer_span(unedited))


# -- degeneracy ----------------------------------------------------------------------------------


def repeated_ngram(text: str, max_n: int = 4, times: int = 3) -> str | None:
    """The first word n-gram (n <= ``max_n``) that repeats ``times`` times in a row ("Madrid Madrid
    Madrid", "of the city of the city of the city"), or None."""
    words = [w.lower() for w in _WORD.findall(text)]
    for n in range(1, max_n + 1):
        for i in range(len(words) - n * times + 1):
            gram = words[i : i + n]
            if all(words[i + k * n : i + (k + 1) * n] == gram for k in range(1, times)):
                return " ".join(gram)
    return None


def special_tokens_in(token_ids: Iterable[int], special_ids: set[int]) -> list[int]:
    """The special/control token ids among a continuation's tokens (EOS and padding end a continuation
    and are not passed here)."""
    return [t for t in token_ids if t in special_ids]
