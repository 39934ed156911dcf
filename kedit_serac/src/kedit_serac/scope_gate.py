"""IKE's scope gate: which inputs read an edit's in-context prompt.

The paper prepends the context C(f*, t*) to every input, so an input about another subject is
answered in the light of the new fact too; on CounterFact's neighbourhood prompts (same relation,
another subject) Gemma 3 270M then answers the new target (neighbourhood score 0.16 against 0.88
unedited). An edit (s, r, o → o*) is a statement about its subject s, so its scope here is the
inputs that name s:

    in_scope(x, e)  ⟺  norm(s_e) occurs in norm(x) on word boundaries,

``norm`` folding case and collapsing whitespace. An input in no edit's scope runs on the base
model with no context at all (its outputs are the unedited model's, exactly). Among several edits
whose subjects x names, the most specific one (longest subject) wins, then the one whose fact is
nearest to x in sentence-embedding space.

Why not a similarity threshold: on the tuning records (CounterFact 200-298), the MiniLM cosine of
a paraphrase to its fact and of a neighbourhood prompt to the same fact overlap (paraphrases: 5th
percentile 0.34, median 0.57; neighbourhood prompts: median 0.28, 95th percentile 0.54), so any
threshold gives up paraphrases or neighbours. The subject test separates them: of the paraphrases
of the packaged pool's training records, CounterFact 200-298 and ZsRE 400+, 3,625 of 3,633 name
their subject, and 4 of their 4,425 neighbourhood/locality prompts do ("Kingdom of Israel" for
"Israel", "Law & Order: LA" for "Law & Order"). Its limit: an input that refers to the subject by another name, a pronoun or an
inflected form ("Irbits" for "Irbit": the 8 misses) is out of scope. Allowing two trailing letters
would catch 7 of the 8 with no further neighbour on those records, but makes short subjects match
other words ("Al" in "Alan"), so the test stays exact.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

#: which inputs read an edit's context: those naming the edited subject, or every input (the paper)
SCOPES = ("subject", "all")


def normalize(text: str) -> str:
    """Case folded, runs of whitespace collapsed to one space."""
    return " ".join(text.split()).casefold()


def subject_pattern(subject: str) -> re.Pattern[str]:
    """Matches ``normalize(subject)`` in a normalized text, not inside a longer word."""
    return re.compile(r"(?<!\w)" + re.escape(normalize(subject)) + r"(?!\w)")


def mentions(text: str, subject: str) -> bool:
    """Whether ``text`` names ``subject`` (case-insensitive, on word boundaries)."""
    return subject_pattern(subject).search(normalize(text)) is not None


def subject_router(
    subjects: list[str], keys: torch.Tensor, embed: Callable[[list[str]], torch.Tensor]
) -> Callable[[list[str]], list[tuple[int, float] | None]]:
    """``route(texts)``: per text, ``(edit, 1.0)`` for the edit whose subject it names (the longest
    such subject, then the nearest fact by ``embed(texts) @ keys.T``), or ``None`` when it names
    none. ``embed`` runs only for texts that name more than one subject."""
    patterns = [subject_pattern(s) for s in subjects]
    lengths = [len(normalize(s)) for s in subjects]

    @torch.no_grad()
    def route(texts: list[str]) -> list[tuple[int, float] | None]:
        out: list[tuple[int, float] | None] = [None] * len(texts)
        ties: dict[int, list[int]] = {}
        for i, text in enumerate(texts):
            norm = normalize(text)
            named = [e for e, p in enumerate(patterns) if p.search(norm)]
            if not named:
                continue
            longest = max(lengths[e] for e in named)
            named = [e for e in named if lengths[e] == longest]
            if len(named) == 1:
                out[i] = (named[0], 1.0)
            else:
                ties[i] = named
        if ties:
            rows = list(ties)
            sims = embed([texts[i] for i in rows]) @ keys.T
            for j, i in enumerate(rows):
                named = ties[i]
                out[i] = (named[int(sims[j, named].argmax())], 1.0)
        return out

    return route
