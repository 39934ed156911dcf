"""IKE's demonstrations (Zheng et al. 2023, Sec. 3): for every pool record (fact f, target t) three
kinds of demonstration,

    copy:    "New Fact: f t\\n" + "f t"                      (the fact itself)
    update:  "New Fact: f t\\n" + "paraphrase(f) t"          (the fact applies to rephrasings)
    retain:  "New Fact: f t\\n" + "neighbour(f) its answer"  (unrelated facts stay as they were)

and for a new fact the k demonstrations whose sentence embedding is closest to it (cosine of the
normalized MiniLM embeddings), nearest last, followed by the new fact:

    C(f*, t*) = d_(k) ⊕ ... ⊕ d_(1) ⊕ "New Fact: f* t*\\n"
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kedit_core.request import EditRequest

from .encoder import SentenceEncoder, embed_cached


def new_fact(prompt: str, target: str) -> str:
    return f"New Fact: {prompt.rstrip()} {target.strip()}\n"


def demonstrations_of(r: EditRequest) -> list[tuple[str, str]]:
    """``(kind, text)`` of the copy, update and retain demonstrations of one pool record."""
    head = new_fact(r.prompt, r.target_new)
    out = [("copy", head + f"{r.prompt.rstrip()} {r.target_new.strip()}\n\n")]
    for p in r.rephrase_prompts[:1]:
        out.append(("update", head + f"{p.rstrip()} {r.target_new.strip()}\n\n"))
    for probe in r.locality[:1]:
        out.append(("retain", head + f"{probe.prompt.rstrip()} {probe.target.strip()}\n\n"))
    return out


@dataclass
class DemonstrationPool:
    texts: list[str]
    kinds: list[str]
    embeddings: torch.Tensor

    @classmethod
    def build(cls, records: list[EditRequest], encoder: SentenceEncoder, cache_dir: Path | None) -> DemonstrationPool:
        pairs = [d for r in records for d in demonstrations_of(r)]
        texts = [t for _, t in pairs]
        return cls(texts, [k for k, _ in pairs], embed_cached(encoder, texts, cache_dir))

    def nearest(self, query: torch.Tensor, k: int) -> list[int]:
        """Indices of the ``k`` demonstrations closest to ``query`` ``[D]``, nearest last."""
        if k <= 0 or not self.texts:
            return []
        sims = self.embeddings @ query
        top = torch.topk(sims, min(k, len(self.texts))).indices.tolist()
        return list(reversed(top))

    def context(self, encoder: SentenceEncoder, prompt: str, target: str, k: int) -> str:
        """C(f*, t*): the retrieved demonstrations, then the new fact."""
        fact = new_fact(prompt, target)
        query = encoder.embed([fact + f"{prompt.rstrip()} {target.strip()}"])[0]
        return "".join(self.texts[i] for i in self.nearest(query, k)) + fact
