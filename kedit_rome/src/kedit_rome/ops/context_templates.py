"""Context templates: short text prefixes sampled from the model itself (ROME Sec. 3.1).

A fact's key and value are computed over ``prefix + prompt`` for a handful of prefixes so that
the edit generalizes beyond the exact wording of the request. Templates are ``"{}"`` (the bare
prompt) plus ``n`` generations of ``length`` tokens from generic openers; they depend only on the
model, so they are sampled once (seeded) and cached on disk per model fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from kedit_core.fsutil import atomic_write_text
from kedit_core.ops.sampling import OPENERS, sample_texts
from kedit_core.progress import step

log = logging.getLogger(__name__)


def _sample(model: nn.Module, tokenizer: Any, openers: Sequence[str], length: int, top_k: int, seed: int) -> list[str]:
    texts = sample_texts(model, tokenizer, openers, length, top_k, seed)
    return [t.replace("{", " ").replace("}", " ").strip() + ". {}" for t in texts]


def context_templates(
    model: nn.Module,
    tokenizer: Any,
    model_fingerprint: str,
    cache_dir: Path,
    spec: Sequence[tuple[int, int]] = ((10, 5),),
    top_k: int = 5,
    seed: int = 0,
) -> list[str]:
    """``["{}", "<sampled prefix>. {}", ...]``; ``spec`` lists (length in tokens, how many)."""
    key = hashlib.sha256(json.dumps([list(map(list, spec)), top_k, seed]).encode()).hexdigest()[:12]
    path = Path(cache_dir) / "templates" / model_fingerprint / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    templates = ["{}"]
    with step(f"sampling {sum(n for _, n in spec)} context templates from the model", one_time=True):
        for length, n in spec:
            if n <= 0:
                continue
            openers = [OPENERS[i % len(OPENERS)] for i in range(n)]
            templates.extend(_sample(model, tokenizer, openers, length, top_k, seed + length))
    atomic_write_text(path, json.dumps(templates, ensure_ascii=False, indent=1))
    log.info("sampled %d context templates -> %s", len(templates) - 1, path)
    return templates
