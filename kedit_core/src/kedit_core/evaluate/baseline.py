"""The unedited model's scores, cached: ``Editor.edit(..., baseline_dir=DIR)``.

Scoring the unedited model (the ``pre`` metrics, the locality references and, under the generation
protocol, its continuations) is the same work for every method run on the same model and requests; on
CounterFact with the generation protocol it costs as much as tens of edits. With a ``baseline_dir`` the
first run writes it to ``DIR/baseline-<key>.json`` and later runs read it back. The key covers
everything the scores depend on: the model's fingerprint, every request field, the protocol, the
evaluator's settings and the source of the evaluation code -- a change to any of them is a new file,
never a stale hit. Files are JSON (no pickle), written atomically: two runs racing on one key both
compute it and the last rename wins with identical content.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from ..fsutil import atomic_write_text
from .protocol import Reference

log = logging.getLogger(__name__)

FORMAT = 1


@dataclass
class Baseline:
    """The unedited model's per-request metrics, locality references and continuations."""

    pre: list[dict[str, float]]
    references: list[Reference]
    generations: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "pre": self.pre,
            "references": [r.to_dict() for r in self.references],
            "generations": self.generations,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Baseline:
        return cls(data["pre"], [Reference.from_dict(r) for r in data["references"]], data["generations"])


@cache
def evaluation_source() -> str:
    """sha256 of this package's source (the evaluation code the cached scores came from)."""
    h = hashlib.sha256()
    for p in sorted(Path(__file__).parent.glob("*.py")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def baseline_key(model_fingerprint: str, requests: list[Any], evaluator: Any) -> str:
    """The cache key of the unedited model's scores on ``requests`` under ``evaluator``'s settings."""
    from ..plugins import get_registry

    h = hashlib.sha256()
    settings = {
        "format": FORMAT,
        "model": model_fingerprint,
        "generation": evaluator.generation,
        "batch_size": evaluator.batch_size,
        "max_new_tokens": evaluator.max_new_tokens,
        "answer_slack": evaluator.answer_slack,
        "fluency_drop": evaluator.fluency_drop,
        "source": evaluation_source(),
        "metric_plugins": sorted(m.name for m in get_registry().metrics),
    }
    h.update(json.dumps(settings, sort_keys=True).encode())
    for r in requests:
        h.update(r.model_dump_json().encode())
    return h.hexdigest()[:24]


def scored_baseline(evaluator: Any, requests: list[Any], model_fingerprint: str, directory: Any = None) -> Baseline:
    """The unedited model's scores on ``requests``: read from ``directory`` when cached there, else
    computed (and written there when ``directory`` is given). Call before editing."""
    path = None
    if directory is not None:
        path = Path(directory) / f"baseline-{baseline_key(model_fingerprint, requests, evaluator)}.json"
        if path.is_file():
            log.info("unedited model's scores read from %s", path)
            return Baseline.from_dict(json.loads(path.read_text()))
    pre, refs = evaluator.evaluate_with_reference(requests)
    base = Baseline(pre, refs, [g.to_dict() for g in evaluator.last_generations])
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(base.to_dict()))
    return base
