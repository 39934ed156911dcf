"""IKE's demonstrations (Zheng et al. 2023, Sec. 3): for every pool record (fact f, target t, a
paraphrase f' of the fact, an unrelated neighbour prompt n with its answer a) three kinds of
demonstration, each the new fact then a prompt answered,

    copy:    "New Fact: f t\\nPrompt: f t\\n\\n"     (the fact itself)
    update:  "New Fact: f t\\nPrompt: f' t\\n\\n"    (the fact applies to rephrasings)
    retain:  "New Fact: f t\\nPrompt: n a\\n\\n"     (unrelated facts stay as they were)

For a new fact (f*, t*) the demonstrations of each kind are taken from the pool records whose
facts are closest to it (cosine of normalized MiniLM embeddings of "f t"), n_copy : n_update :
n_retain of them, all ordered by similarity with the nearest last, then the new fact and the
query's label:

    C(f*, t*) = d_(k) ⊕ ... ⊕ d_(1) ⊕ "New Fact: f* t*\\nPrompt:"

The input x is read right after C (``h(x) = p(· | C ⊕ x)``), so a demonstration's prompt is written
on a new line after the label, exactly as the input's tokens follow the context's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kedit_core.request import EditRequest

from .encoder import SentenceEncoder, embed_cached

KINDS = ("copy", "update", "retain")
#: the line the input is read after
LABEL = "Prompt:\n"


def new_fact(prompt: str, target: str) -> str:
    """``"New Fact: f t\\n"``."""
    return f"New Fact: {prompt.strip()} {target.strip()}\n"


def fact_text(prompt: str, target: str) -> str:
    """The text retrieval embeds: ``"f t"``."""
    return f"{prompt.strip()} {target.strip()}"


def answered(prompt: str, answer: str, label: str = LABEL) -> str:
    return f"{label}{prompt.strip()} {answer.strip()}\n\n"


def demonstrations_of(r: EditRequest, label: str = LABEL) -> list[tuple[str, str]]:
    """``(kind, text)`` of the copy, update and retain demonstrations of one pool record."""
    head = new_fact(r.prompt, r.target_new)
    out = [("copy", head + answered(r.prompt, r.target_new, label))]
    for p in r.rephrase_prompts[:1]:
        out.append(("update", head + answered(p, r.target_new, label)))
    for probe in r.locality[:1]:
        out.append(("retain", head + answered(probe.prompt, probe.target, label)))
    return out


def kind_counts(k: int, ratio: tuple[float, float, float]) -> dict[str, int]:
    """Split ``k`` demonstrations over the kinds in proportion to ``ratio`` (largest remainders)."""
    total = sum(ratio)
    if k <= 0 or total <= 0:
        return dict.fromkeys(KINDS, 0)
    exact = [k * w / total for w in ratio]
    counts = [int(x) for x in exact]
    for i in sorted(range(3), key=lambda i: exact[i] - counts[i], reverse=True)[: k - sum(counts)]:
        counts[i] += 1
    return dict(zip(KINDS, counts, strict=False))


@dataclass
class DemonstrationPool:
    """Demonstrations of every pool record (``demos[r][kind]``) and the embeddings of their facts."""

    demos: list[dict[str, str]]
    embeddings: torch.Tensor
    subjects: list[str]
    label: str = LABEL

    @classmethod
    def build(
        cls, records: list[EditRequest], encoder: SentenceEncoder, cache_dir: Path | None, label: str = LABEL
    ) -> DemonstrationPool:
        demos = [dict(demonstrations_of(r, label)) for r in records]
        facts = [fact_text(r.prompt, r.target_new) for r in records]
        return cls(demos, embed_cached(encoder, facts, cache_dir), [r.subject.strip().lower() for r in records], label)

    def __len__(self) -> int:
        return len(self.demos)

    def select(self, query: torch.Tensor, counts: dict[str, int], subject: str = "") -> list[str]:
        """Per kind, the demonstrations of the ``counts[kind]`` records nearest to ``query`` ``[D]``
        that have one; all of them ordered by similarity, nearest last. Records about ``subject``
        are skipped: a demonstration is never the edit itself (training files can hold it)."""
        if not self.demos or not any(counts.values()):
            return []
        sims = self.embeddings @ query
        skip = subject.strip().lower()
        order = [i for i in torch.argsort(sims, descending=True).tolist() if not skip or self.subjects[i] != skip]
        chosen: list[tuple[float, int, str]] = []
        for rank, kind in enumerate(KINDS):
            n = counts.get(kind, 0)
            for i in order:
                if n <= 0:
                    break
                if kind in self.demos[i]:
                    chosen.append((float(sims[i]), rank, self.demos[i][kind]))
                    n -= 1
        chosen.sort(key=lambda c: (c[0], c[1]))
        return [text for _, _, text in chosen]

    def context(
        self, encoder: SentenceEncoder, request: EditRequest, counts: dict[str, int], copy_new_fact: bool = True
    ) -> str:
        """C(f*, t*): the retrieved demonstrations, (with ``copy_new_fact``) the copy demonstration of
        the new fact itself, then the new fact and the input's label."""
        prompt, target = request.prompt, request.target_new
        query = encoder.embed([fact_text(prompt, target)])[0]
        demos = self.select(query, counts, request.subject)
        if copy_new_fact:
            demos.append(new_fact(prompt, target) + answered(prompt, target, self.label))
        return "".join(demos) + new_fact(prompt, target) + self.label
