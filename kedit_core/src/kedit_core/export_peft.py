"""Weight-delta patches as peft LoRA adapters: ``kedit patch export --format peft`` and ``kedit patch import``.

A LoRA layer adds ``scaling * B @ A`` to a projection's ``[out, in]`` weight. kedit writes ``lora_alpha == r``
for every module, so ``scaling`` is exactly 1 and ``B @ A`` is the patch's delta:

- a low-rank delta ``a @ b`` (ROME: rank one, MEMIT: rank <= edits per layer) in the parameter's storage
  layout becomes ``B, A = a, b`` -- or, for GPT-2's Conv1D, which stores weights ``[in, out]``,
  ``B, A = b.T, a.T`` (and ``fan_in_fan_out`` in the config). Exact: the factors are copied, not recomputed.
- a dense delta (FT-L, FT-M) becomes the truncated SVD ``U_r sqrt(S_r), sqrt(S_r) V_r^T`` at ``--rank``;
  the measured relative Frobenius error ``|D - B A| / |D|`` is reported and recorded.
- a chain of sequential patches becomes one adapter: the factors of every patch touching a module are
  stacked (``[B1 B2] @ [A1; A2] = B1 A1 + B2 A2``), the dense parts summed and SVD'd.

``kedit_provenance.json`` beside the adapter keeps each patch's metadata, how each module's rows were made
and the sha256 of every adapter tensor; :func:`import_peft` reads only adapters whose tensors match it,
and gives back the original patch (same id, same tensors) when the adapter holds one exact patch.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .architecture import ArchitectureSpec
from .edit import Edit
from .errors import KeditError, PatchError
from .fsutil import atomic_path
from .method import PatchKind
from .patch import FORMAT_VERSION, Patch, parse_layout, tensor_fingerprint

CONFIG, WEIGHTS, PROVENANCE = "adapter_config.json", "adapter_model.safetensors", "kedit_provenance.json"
PROVENANCE_FORMAT = "kedit-peft-provenance/1"
PEFT_HINT = "pip install 'kedit-core[peft]'"
PREFIX = "base_model.model."


def require_peft() -> Any:
    """The ``peft`` module, or a one-line :class:`KeditError` saying how to install it."""
    try:
        import peft
    except ImportError:
        raise KeditError(f"exporting a patch as a peft adapter needs peft: {PEFT_HINT}") from None
    return peft


@dataclass
class ModuleFactors:
    """One LoRA target: ``B [out, r] @ A [r, in]``, how its rows were made, and the measured error."""

    module: str
    param: str
    B: torch.Tensor
    A: torch.Tensor
    parts: list[dict[str, Any]] = field(default_factory=list)
    relative_error: float = 0.0

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


@dataclass
class ExportReport:
    out: Path
    patches: list[str]
    modules: dict[str, ModuleFactors]
    exact: bool
    svd_rank: int | None

    @property
    def max_relative_error(self) -> float:
        return max((m.relative_error for m in self.modules.values()), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "format": "peft",
            "patches": self.patches,
            "exact": self.exact,
            "svd_rank": self.svd_rank,
            "max_relative_error": self.max_relative_error,
            "modules": {n: {"rank": m.rank, "relative_error": m.relative_error} for n, m in self.modules.items()},
        }

    def describe(self) -> str:
        ranks = sorted({m.rank for m in self.modules.values()})
        rank = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
        how = (
            "exact"
            if self.exact
            else f"dense deltas as a truncated SVD at rank {self.svd_rank}: "
            f"max relative error {self.max_relative_error:.3g}"
        )
        return (
            f"exported {len(self.patches)} patch(es) as a peft LoRA adapter in {self.out}: "
            f"{len(self.modules)} module(s), rank {rank}, {how}"
        )


# -- export -------------------------------------------------------------------------------------
def export_peft(patches: list[Patch], out: str | Path, *, rank: int | None = None) -> ExportReport:
    """Write ``patches`` (applied in this order) as one peft LoRA adapter in ``out``.

    Low-rank deltas are exact; dense deltas need ``rank`` (a truncated SVD, error measured). Module-state
    and memory patches, and deltas LoRA cannot carry (biases, norms, embeddings), are refused before
    anything is written.
    """
    peft = require_peft()
    if not patches:
        raise KeditError("no patches to export")
    arch = check_chain(patches)
    modules = stack_factors(patches, arch, rank)
    exact = all(p["kind"] == "lowrank" for m in modules.values() for p in m.parts)
    config = adapter_config(peft, modules, arch, patches[0])
    weights = {}
    for name, m in modules.items():
        weights[f"{PREFIX}{name}.lora_A.weight"] = m.A.contiguous()
        weights[f"{PREFIX}{name}.lora_B.weight"] = m.B.contiguous()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise KeditError(f"--out {out} is a file; give a directory for the adapter")
    provenance = {
        "format": PROVENANCE_FORMAT,
        "kedit_core_version": patches[0].metadata.get("core_version", ""),
        "peft_version": getattr(peft, "__version__", ""),
        "exported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "exact": exact,
        "svd_rank": None if exact else rank,
        "scaling": 1.0,
        "layout": arch.weight_layout,
        "patches": [p.metadata for p in patches],
        "modules": {
            n: {"param": m.param, "rank": m.rank, "parts": m.parts, "relative_error": m.relative_error}
            for n, m in modules.items()
        },
        "tensors": {k: tensor_fingerprint(t) for k, t in weights.items()},
    }
    with atomic_path(out / WEIGHTS) as tmp:
        save_file(weights, str(tmp), metadata={"format": "pt"})
    _write_json(out / CONFIG, config)
    _write_json(out / PROVENANCE, provenance)
    return ExportReport(out, [p.patch_id for p in patches], modules, exact, None if exact else rank)


def check_chain(patches: list[Patch]) -> ArchitectureSpec:
    """Refuse what is no LoRA adapter, or patches that do not apply in the order given; the architecture."""
    from .plugins import get_registry

    for p in patches:
        if p.kind is not PatchKind.WEIGHT_DELTA:
            raise KeditError(
                f"patch {p.patch_id} is a {p.kind.value} patch ({p.method}): only weight-delta patches are LoRA "
                "adapters; serve it with kedit (kedit patch apply)"
            )
    archs = {p.metadata["base_model"].get("architecture") for p in patches}
    if len(archs) > 1:
        raise KeditError(f"the patches were made on different architectures ({', '.join(sorted(map(str, archs)))})")
    name = archs.pop()
    arch = get_registry().architectures.get(name)
    if arch is None:
        raise KeditError(f"architecture {name!r} of patch {patches[0].patch_id} is not registered in kedit")
    written: dict[str, tuple[str, str | None]] = {}  # parameter -> (patch id, post-edit sha256)
    ids = {p.patch_id for p in patches}
    for prev, p in zip([None, *patches], patches, strict=False):
        if p.parent and (p.parent != prev.patch_id if prev is not None else p.parent in ids):
            raise KeditError(
                f"patch {p.patch_id} was made on top of {p.parent}, not {prev.patch_id if prev else 'the base model'}: "
                "list a chain's patches in the order they were made"
            )
        post = p.post_fingerprints() or {}
        for param in p.parameters():
            by, sha = written.get(param, (None, None))
            if sha is not None and p.metadata["fingerprints"][param] != sha:
                raise KeditError(
                    f"patch {p.patch_id} was not computed on the weights patch {by} writes ({param!r}): the "
                    "patches do not apply in this order"
                )
            written[param] = (p.patch_id, post.get(param))
    return arch


def stack_factors(patches: list[Patch], arch: ArchitectureSpec, rank: int | None) -> dict[str, ModuleFactors]:
    """Per module, the low-rank factors of every patch stacked in order, then the SVD of the summed
    dense deltas (when there are any)."""
    lowrank: dict[str, list[tuple[str, torch.Tensor, torch.Tensor]]] = {}
    dense: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for p in patches:
        for param, parts in parse_layout(p.tensors).items():
            _check_target(p, param, parts, arch)
            if "delta" in parts:
                dense.setdefault(param, []).append((p.patch_id, _out_in(arch, parts["delta"])))
            else:
                # the transpose is its own inverse: storage-layout factors -> [out, in] factors
                b_fac, a_fac = arch.lowrank_to_param_layout(parts["a"], parts["b"])
                lowrank.setdefault(param, []).append((p.patch_id, b_fac, a_fac))
    if dense and rank is None:
        pid = next(iter(dense.values()))[0][0]
        raise KeditError(
            f"patch {pid} holds dense deltas ({next(iter(dense))!r}): LoRA carries them only as a truncated-SVD "
            "approximation; pass --rank R (the relative error is measured and reported)"
        )
    out: dict[str, ModuleFactors] = {}
    for param in [*lowrank, *(p for p in dense if p not in lowrank)]:
        out[param.removesuffix(".weight")] = _module_factors(param, lowrank.get(param, []), dense.get(param, []), rank)
    return dict(sorted(out.items()))


def _module_factors(
    param: str,
    lowrank: list[tuple[str, torch.Tensor, torch.Tensor]],
    dense: list[tuple[str, torch.Tensor]],
    rank: int | None,
) -> ModuleFactors:
    shapes = {(b.shape[0], a.shape[1]) for _, b, a in lowrank} | {tuple(d.shape) for _, d in dense}
    if len(shapes) > 1:
        raise KeditError(f"the patches give {param!r} deltas of different shapes {sorted(shapes)}")
    dtypes = [t.dtype for _, b, a in lowrank for t in (b, a)] + [d.dtype for _, d in dense]
    dtype = dtypes[0]
    for d in dtypes[1:]:
        dtype = torch.promote_types(dtype, d)
    Bs, As, parts = [], [], []
    for pid, b, a in lowrank:
        Bs.append(b.to(dtype))
        As.append(a.to(dtype))
        parts.append({"patch_id": pid, "kind": "lowrank", "rank": int(a.shape[0])})
    error = 0.0
    if dense:
        total = sum(d.double() for _, d in dense)
        u, s, vh = torch.linalg.svd(total, full_matrices=False)
        r = min(int(rank or 0), s.numel())
        root = s[:r].sqrt()
        b_svd, a_svd = (u[:, :r] * root).to(dtype), (root[:, None] * vh[:r]).to(dtype)
        Bs.append(b_svd)
        As.append(a_svd)
        residual = float((total - b_svd.double() @ a_svd.double()).norm())
        whole = float(sum((b.double() @ a.double() for _, b, a in lowrank), total).norm())
        error = residual / whole if whole else 0.0
        part_error = residual / float(total.norm()) if residual else 0.0
        parts.append({"patch_ids": [pid for pid, _ in dense], "kind": "svd", "rank": r, "relative_error": part_error})
    return ModuleFactors(param.removesuffix(".weight"), param, torch.cat(Bs, 1), torch.cat(As, 0), parts, error)


def _check_target(p: Patch, param: str, parts: dict[str, torch.Tensor], arch: ArchitectureSpec) -> None:
    two_d = parts["delta"].ndim == 2 if "delta" in parts else True
    if not param.endswith(".weight") or not two_d:
        raise KeditError(
            f"patch {p.patch_id} changes {param!r}, which is no weight matrix: LoRA adapts projections only"
        )
    if param.removesuffix(".weight") == arch.embed:
        raise KeditError(f"patch {p.patch_id} changes the embedding {param!r}: kedit exports LoRA for projections only")


def _out_in(arch: ArchitectureSpec, delta: torch.Tensor) -> torch.Tensor:
    """A storage-layout delta as ``[out, in]`` (the transpose is its own inverse)."""
    return arch.to_param_layout(delta)


def adapter_config(peft: Any, modules: dict[str, ModuleFactors], arch: ArchitectureSpec, first: Patch) -> dict:
    """peft's ``LoraConfig`` as saved: ``target_modules`` names exactly the edited modules, the most common
    rank is ``r`` (others in ``rank_pattern``), and ``lora_alpha == r`` everywhere (scaling 1)."""
    ranks = Counter(m.rank for m in modules.values())
    r = min(ranks, key=lambda k: (-ranks[k], k))
    pattern = {_pattern_key(n, modules): m.rank for n, m in modules.items() if m.rank != r}
    config = peft.LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=sorted(modules),
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=arch.weight_layout == "conv1d",
        task_type="CAUSAL_LM",
        inference_mode=True,
        base_model_name_or_path=first.metadata["base_model"].get("id") or None,
    )
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}


def _pattern_key(module: str, modules: dict[str, ModuleFactors]) -> str:
    """The module's name as a ``rank_pattern`` key (peft reads keys as regular expressions matching the
    end of a module name): escaped only where the plain name would also match another target."""
    others = [n for n in modules if n != module]
    return re.escape(module) if any(_pattern_value({module: True}, n, False) for n in others) else module


def _write_json(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


# -- import -------------------------------------------------------------------------------------
def import_peft(directory: str | Path) -> Patch:
    """The kedit patch an adapter exported by :func:`export_peft` holds.

    One exact patch comes back as itself (same id, bit-identical tensors); a chain or an SVD
    approximation comes back as one low-rank patch of the adapter's factors (method ``peft``) that
    applies to the chain's base weights. Refused, with the reason, for adapters kedit did not export
    or whose tensors or scaling changed since.
    """
    directory = Path(directory)
    if not (directory / CONFIG).is_file() or not (directory / WEIGHTS).is_file():
        raise PatchError(f"{directory}: not a peft adapter (needs {CONFIG} and {WEIGHTS})")
    if not (directory / PROVENANCE).is_file():
        raise PatchError(
            f"{directory}: a peft adapter kedit did not export (no {PROVENANCE}): kedit imports only adapters "
            "whose provenance says which patches they hold"
        )
    try:
        prov = json.loads((directory / PROVENANCE).read_text())
        config = json.loads((directory / CONFIG).read_text())
        weights = load_file(str(directory / WEIGHTS))
    except (OSError, ValueError) as exc:
        raise PatchError(f"{directory}: unreadable adapter ({exc})") from None
    if not isinstance(prov, dict) or prov.get("format") != PROVENANCE_FORMAT:
        raise PatchError(f"{directory}/{PROVENANCE}: not a kedit provenance file ({PROVENANCE_FORMAT})")
    _check_adapter(directory, prov, config, weights)
    layout = "conv1d" if prov["layout"] == "conv1d" else "linear"
    lowrank = {}
    for name, m in prov["modules"].items():
        a_fac, b_fac = weights[f"{PREFIX}{name}.lora_A.weight"], weights[f"{PREFIX}{name}.lora_B.weight"]
        # [out, in] factors -> storage layout (for Conv1D: a = A.T, b = B.T)
        lowrank[m["param"]] = (a_fac.T.contiguous(), b_fac.T.contiguous()) if layout == "conv1d" else (b_fac, a_fac)
    tensors = Edit(lowrank=lowrank).tensors()
    metas = prov["patches"]
    if prov["exact"] and len(metas) == 1:
        patch = Patch(tensors, dict(metas[0]))
    else:
        patch = Patch(tensors, _combined_metadata(prov))
        patch.metadata["patch_id"] = patch.content_id()
    try:
        patch.validate()
    except PatchError as exc:
        raise PatchError(f"{directory}: the adapter does not reproduce its patch: {exc}") from None
    return patch


def _check_adapter(directory: Path, prov: dict, config: dict, weights: dict[str, torch.Tensor]) -> None:
    """Refuse unless the adapter's tensors are those kedit wrote and its config gives each module scaling 1."""
    recorded = prov.get("tensors") or {}
    changed = sorted(set(recorded) ^ set(weights)) or sorted(
        k for k, t in weights.items() if tensor_fingerprint(t) != recorded[k]
    )
    if changed:
        raise PatchError(
            f"{directory}: {WEIGHTS} does not match {PROVENANCE} (tensor {changed[0]!r}): the adapter changed "
            "after kedit exported it"
        )
    if str(config.get("peft_type", "")).upper() != "LORA" or config.get("use_dora") or config.get("use_rslora"):
        raise PatchError(f"{directory}: {CONFIG} is no plain LoRA config (peft_type LORA, no DoRA, no rsLoRA)")
    targets = config.get("target_modules")
    targets = [targets] if isinstance(targets, str) else targets or []
    if sorted(targets) != sorted(prov["modules"]):
        raise PatchError(f"{directory}: {CONFIG} targets other modules than {PROVENANCE} records")
    for name, m in prov["modules"].items():
        r = _pattern_value(config.get("rank_pattern") or {}, name, config.get("r"))
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha"))
        if r != m["rank"] or alpha != r:
            raise PatchError(
                f"{directory}: {CONFIG} gives {name!r} rank {r} and lora_alpha {alpha}; kedit wrote rank "
                f"{m['rank']} with lora_alpha == r (scaling 1)"
            )


def _pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    """peft's ``rank_pattern``/``alpha_pattern`` lookup: the first key matching the end of the module name."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _combined_metadata(prov: dict) -> dict[str, Any]:
    """Metadata of the one patch a chain or approximation imports as: the pre-edit fingerprints are
    those of the first patch touching each parameter; the provenance of every patch is kept in ``extra``."""
    from .plugins import core_version

    metas = {m["patch_id"]: m for m in prov["patches"]}
    first = prov["patches"][0]
    fingerprints = {}
    for m in prov["modules"].values():
        pids = [pid for part in m["parts"] for pid in part.get("patch_ids", [part.get("patch_id")])]
        earliest = min(pids, key=[p["patch_id"] for p in prov["patches"]].index)
        fingerprints[m["param"]] = metas[earliest]["fingerprints"][m["param"]]
    return {
        "format_version": FORMAT_VERSION,
        "kind": PatchKind.WEIGHT_DELTA.value,
        "method": "peft",
        "plugin": "",
        "plugin_version": "",
        "core_version": core_version(),
        "base_model": first["base_model"],
        "fingerprints": fingerprints,
        "hparams": {},
        "requests": [r for m in prov["patches"] for r in m.get("requests", [])],
        "modules": [],
        "extra": {
            "peft_import": {
                "patches": [{k: m.get(k) for k in ("patch_id", "method", "plugin", "parent")} for m in prov["patches"]],
                "exact": prov["exact"],
                "svd_rank": prov.get("svd_rank"),
                "max_relative_error": max((m["relative_error"] for m in prov["modules"].values()), default=0.0),
            }
        },
        "parent": first.get("parent") or "",
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
