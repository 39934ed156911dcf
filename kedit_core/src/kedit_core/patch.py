"""Patch: an edit as data -- one safetensors file, applied and reverted by kedit-core.

Tensors are named ``delta/<param>`` (dense), ``lowrank/<param>/a`` + ``lowrank/<param>/b``
(``delta = a @ b`` in the parameter's storage layout) and ``state/<module>/<tensor>`` (codebooks,
adapters, memories installed by the method's plugin). ``__metadata__`` holds provenance: strings,
nested values JSON-encoded.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .architecture import get_parameter, weight_value, write_weight
from .errors import FingerprintMismatch, KeditError, PatchError
from .fsutil import atomic_path
from .method import ModelContext, PatchKind
from .patch_checks import check_module_targets, check_shared_storage, describe_revert, revert_error_bound

log = logging.getLogger(__name__)

FORMAT_VERSION = "1"
SUFFIX = ".kedit.safetensors"
JSON_KEYS = ("base_model", "fingerprints", "post_fingerprints", "hparams", "requests", "extra", "modules")
REQUIRED_KEYS = ("format_version", "kind", "method", "patch_id", "base_model", "fingerprints")
STACK_ATTR = "_kedit_applied_patches"


def tensor_fingerprint(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and raw bytes."""
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()


@dataclass
class Patch:
    """An edit: tensors plus provenance metadata. Build with :meth:`create`, or :meth:`load` a file."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any]

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        *,
        method: str,
        kind: PatchKind,
        model: nn.Module,
        tensors: dict[str, torch.Tensor],
        base_model: dict[str, Any] | None = None,
        hparams: dict[str, Any] | None = None,
        requests: list[dict[str, Any]] | None = None,
        plugin: str = "",
        plugin_version: str = "",
        parent: str | None = None,
        modules: list[str] | None = None,
        fingerprint_params: list[str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Patch:
        """Make a patch for ``model`` in its current state (fingerprints are taken now).

        A weight-delta patch also records ``post_fingerprints``: the sha256 of each parameter as
        :meth:`apply` will write it, so that :meth:`revert_from_file` can check a model holds the patch.
        """
        from .plugins import core_version

        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        layout = parse_layout(tensors)
        params = fingerprint_params if fingerprint_params is not None else sorted(layout)
        fingerprints = {p: tensor_fingerprint(weight_value(model, p)) for p in params}
        arch = (
            list(getattr(model.config, "architectures", None) or [type(model).__name__])[0]
            if hasattr(model, "config")
            else type(model).__name__
        )
        meta: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "kind": PatchKind(kind).value,
            "method": method,
            "plugin": plugin,
            "plugin_version": plugin_version,
            "core_version": core_version(),
            "base_model": {"architecture": arch, **(base_model or {})},
            "fingerprints": fingerprints,
            "hparams": hparams or {},
            "requests": requests or [],
            "modules": modules or [],
            "extra": extra or {},
            "parent": parent or "",
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        patch = cls(tensors, meta)
        if patch.kind is PatchKind.WEIGHT_DELTA:
            deltas = patch._checked_deltas(model)
            post = {n: tensor_fingerprint(_added(weight_value(model, n), d)) for n, d in deltas.items()}
            meta["post_fingerprints"] = post
        patch.metadata["patch_id"] = patch.content_id()
        return patch

    # -- identity and views ---------------------------------------------------------------------
    def content_id(self) -> str:
        """sha256 over tensors and metadata (excluding ``patch_id`` and ``created_at``), 16 hex digits."""
        h = hashlib.sha256()
        for name in sorted(self.tensors):
            h.update(name.encode())
            h.update(tensor_fingerprint(self.tensors[name]).encode())
        stable = {k: v for k, v in self.metadata.items() if k not in ("patch_id", "created_at")}
        h.update(json.dumps(stable, sort_keys=True, default=str).encode())
        return h.hexdigest()[:16]

    @property
    def patch_id(self) -> str:
        return self.metadata["patch_id"]

    @property
    def kind(self) -> PatchKind:
        return PatchKind(self.metadata["kind"])

    @property
    def method(self) -> str:
        return self.metadata["method"]

    @property
    def parent(self) -> str | None:
        return self.metadata.get("parent") or None

    def post_fingerprints(self) -> dict[str, str] | None:
        """sha256 of each parameter after :meth:`apply` (None for patches made before kedit recorded them)."""
        return self.metadata.get("post_fingerprints")

    def parameters(self) -> list[str]:
        """Names of the parameters a weight-delta patch changes."""
        return list(parse_layout(self.tensors))

    def deltas(self) -> dict[str, torch.Tensor]:
        """Dense delta per parameter (low-rank factors multiplied out)."""
        out = {}
        for param, parts in parse_layout(self.tensors).items():
            if "delta" in parts:
                out[param] = parts["delta"]
            elif "a" in parts:
                out[param] = parts["a"].double().matmul(parts["b"].double()).to(parts["a"].dtype)
        return out

    def state(self) -> dict[str, torch.Tensor]:
        """Module-state tensors, keyed without the ``state/`` prefix."""
        return {k[len("state/") :]: v for k, v in self.tensors.items() if k.startswith("state/")}

    def state_groups(self) -> dict[str, dict[str, torch.Tensor]]:
        """Module-state and memory tensors as the method's :class:`~kedit_core.edit.Edit` gave them:
        group (module path or memory name) -> tensor name -> tensor."""
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in self.state().items():
            group, _, name = key.rpartition("/")
            groups.setdefault(group, {})[name] = t
        return groups

    def require_state(self, group: str, *names: str) -> list[torch.Tensor]:
        """The tensors ``names`` of ``group``, or a :class:`PatchError` naming the first that is missing."""
        tensors = self.state_groups().get(group, {})
        for name in names:
            if name not in tensors:
                raise PatchError(f"{self.method} patch {self.patch_id} lacks tensor state/{group}/{name}")
        return [tensors[name] for name in names]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def summary(self) -> dict[str, Any]:
        m = self.metadata
        return {
            "patch_id": m["patch_id"],
            "method": m["method"],
            "kind": m["kind"],
            "plugin": f"{m.get('plugin', '')} {m.get('plugin_version', '')}".strip(),
            "core_version": m.get("core_version"),
            "base_model": m["base_model"],
            "parent": m.get("parent") or None,
            "created_at": m.get("created_at"),
            "requests": [{k: r.get(k) for k in ("prompt", "subject", "target_new")} for r in m.get("requests", [])],
            "tensors": {
                k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                for k, v in self.tensors.items()
            },
            "params": sorted(m["fingerprints"]),
            "bytes": self.nbytes(),
        }

    # -- file format ----------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write atomically; refuses non-finite tensors."""
        for name, t in self.tensors.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise PatchError(f"refusing to save: tensor {name!r} has non-finite values")
        meta = {k: (v if isinstance(v, str) else json.dumps(v, sort_keys=True)) for k, v in self.metadata.items()}
        path = Path(path)
        with atomic_path(path) as tmp:
            save_file(self.tensors, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Patch:
        """Read and validate a patch file; any defect is a :class:`PatchError` naming the file."""
        path = Path(path)
        if not path.is_file():
            raise PatchError(f"patch file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as fh:
                raw_meta = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
            raise PatchError(f"{path}: not a readable kedit patch (corrupt or truncated safetensors: {exc})") from None
        try:
            patch = cls(tensors, decode_metadata(raw_meta))
            patch.validate()
        except PatchError as exc:
            raise PatchError(f"{path}: {exc}") from None
        return patch

    def validate(self) -> None:
        meta = self.metadata
        missing = [k for k in REQUIRED_KEYS if k not in meta]
        if missing:
            raise PatchError(f"not a kedit patch: metadata lacks {', '.join(missing)}")
        if meta["format_version"] != FORMAT_VERSION:
            raise PatchError(
                f"unsupported patch format version {meta['format_version']!r} (this kedit reads {FORMAT_VERSION})"
            )
        try:
            PatchKind(meta["kind"])
        except ValueError:
            raise PatchError(f"unknown patch kind {meta['kind']!r}") from None
        if not isinstance(meta["fingerprints"], dict) or not isinstance(meta["base_model"], dict):
            raise PatchError("metadata 'fingerprints' and 'base_model' must be JSON objects")
        layout = parse_layout(self.tensors)
        if self.kind is PatchKind.WEIGHT_DELTA:
            if not layout:
                raise PatchError("weight_delta patch has no delta tensors")
            unfingerprinted = set(layout) - set(meta["fingerprints"])
            if unfingerprinted:
                raise PatchError(f"no fingerprint for {sorted(unfingerprinted)[0]!r}")
        post = meta.get("post_fingerprints")
        if post is not None and (
            not isinstance(post, dict) or set(post) != set(layout) or not all(isinstance(v, str) for v in post.values())
        ):
            raise PatchError("metadata 'post_fingerprints' must map each changed parameter to its sha256")
        for name, t in self.tensors.items():
            if not t.is_floating_point():
                raise PatchError(f"tensor {name!r} has dtype {t.dtype}; patches hold floating-point tensors")
        if self.content_id() != meta["patch_id"]:
            raise PatchError(f"content does not match patch id {meta['patch_id']!r} (file altered or damaged)")

    # -- apply / revert -------------------------------------------------------------------------
    def apply(
        self,
        model: nn.Module,
        *,
        tokenizer: Any = None,
        check_fingerprint: bool = True,
        keep_copy: bool = True,
        snapshot: dict[str, torch.Tensor] | None = None,
    ) -> AppliedPatch:
        """Apply to ``model``; everything is checked before the first weight is written. Module-state and
        memory patches are attached by their method, which may need the model's ``tokenizer`` (SERAC, IKE).

        ``keep_copy=False`` (weight deltas) keeps no copy of the overwritten weights: the handle
        cannot ``revert()``; whoever applies it keeps its own snapshot (a long sequential run keeps
        one per parameter, not one per edit) and calls ``release()``. Passing that snapshot as
        ``snapshot`` records each weight not yet in it, after the checks and before the write.
        """
        from .plugins import get_registry

        self.validate()
        if self.kind is PatchKind.WEIGHT_DELTA:
            new_values = self._new_values(model, check_fingerprint)
            saved = {}
            with torch.no_grad():
                for name, value in new_values.items():
                    p = weight_value(model, name)
                    if keep_copy:
                        saved[name] = p.detach().clone()
                    elif snapshot is not None and name not in snapshot:
                        snapshot[name] = p.detach().clone()
                    write_weight(model, name, value)
            handle = AppliedPatch(self, model, saved=saved, copyless=not keep_copy)
        else:
            if check_fingerprint:
                self._check_fingerprints(model)
            registry = get_registry()
            try:
                method = registry.method_for_patch(self.method, self.metadata.get("plugin"))
            except KeditError:
                plugin = self.metadata.get("plugin") or "the plugin that provides it"
                raise PatchError(
                    f"patch {self.patch_id} needs method {self.method!r} from {plugin}, which is not installed"
                ) from None
            from .architecture import resolve_architecture

            target = ModelContext(model, resolve_architecture(model), tokenizer)
            check_module_targets(self, model, target.arch, method.wraps)
            detach = method.attach(target, self)
            handle = AppliedPatch(self, model, detach=detach)
        stack(model).append(handle)
        get_registry().notify("patch_applied", patch=self, model=model)
        return handle

    @contextlib.contextmanager
    def applied(
        self, model: nn.Module, *, tokenizer: Any = None, check_fingerprint: bool = True
    ) -> Iterator[AppliedPatch]:
        handle = self.apply(model, tokenizer=tokenizer, check_fingerprint=check_fingerprint)
        try:
            yield handle
        finally:
            handle.revert()

    def _check_fingerprints(self, model: nn.Module) -> None:
        def fingerprint_of(name: str) -> str | None:
            try:
                return tensor_fingerprint(weight_value(model, name))
            except KeditError:
                return None

        self.check_fingerprints(fingerprint_of)

    def check_fingerprints(
        self, fingerprint_of: Callable[[str], str | None], *, skip: Collection[str] = (), note: str = ""
    ) -> None:
        """Refuse unless each parameter the patch fingerprinted (but those in ``skip``) holds the weights the
        edit was made on: ``fingerprint_of(name)`` is its sha256 now, None where the model has no such
        parameter. ``note`` says where the fingerprints came from."""
        for name, expected in self.metadata["fingerprints"].items():
            if name in skip:
                continue
            actual = fingerprint_of(name)
            if actual is None:
                raise PatchError(f"patch {self.patch_id} touches {name!r}, which this model does not have")
            if actual != expected:
                base = self.metadata["base_model"].get("id", "another model")
                raise FingerprintMismatch(
                    f"patch {self.patch_id} was computed on other weights ({base}): parameter {name!r} differs "
                    f"from the one the edit was made on{note}. Apply it to that model, or apply its parent patches "
                    "first."
                )

    def _checked_deltas(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Dense deltas, each checked to name a parameter of ``model`` of its shape, none sharing storage."""
        deltas = self.deltas()
        for name, delta in deltas.items():
            try:
                p = get_parameter(model, name)
            except KeditError:
                pid = self.metadata.get("patch_id", "(new)")
                raise PatchError(f"patch {pid} touches {name!r}, which this model does not have") from None
            if tuple(delta.shape) != tuple(p.shape):
                raise PatchError(f"delta for {name!r} has shape {tuple(delta.shape)}, the parameter {tuple(p.shape)}")
        check_shared_storage(self, model, deltas)
        return deltas

    def _new_values(self, model: nn.Module, check_fingerprint: bool) -> dict[str, torch.Tensor]:
        deltas = self._checked_deltas(model)
        if check_fingerprint:
            self._check_fingerprints(model)
        new_values = {}
        with torch.no_grad():
            for name, delta in deltas.items():
                value = _added(weight_value(model, name), delta)
                if not torch.isfinite(value).all():
                    raise PatchError(f"refusing patch {self.patch_id}: {name!r} would hold non-finite values")
                new_values[name] = value
        return new_values

    def revert_from_file(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        """Revert without a saved copy. First checks that ``model`` holds exactly the weights this patch
        writes (its ``post_fingerprints``); otherwise refuses and changes nothing. Then subtracts the
        deltas and reports per parameter ``exact`` (the result's sha256 is the pre-edit fingerprint),
        ``max_abs_error_bound`` (0 when exact, else a bound on ``|reverted - pre-edit|``, see
        :func:`~kedit_core.patch_checks.revert_error_bound`) and ``summary``, the same in words."""
        if self.kind is not PatchKind.WEIGHT_DELTA:
            raise PatchError(
                "only weight_delta patches can be reverted from the file; unwrap module patches with the handle"
            )
        self.validate()
        deltas = self._checked_deltas(model)
        self._check_holds(model)
        pre, post = self.metadata["fingerprints"], self.post_fingerprints() or {}
        report: dict[str, dict[str, Any]] = {}
        new_values = {}
        with torch.no_grad():
            for name, delta in deltas.items():
                p = weight_value(model, name)
                # a delta that rounds away at this precision left the weight as it was: keep it
                value = p.detach().clone() if post[name] == pre[name] else _subtracted(p, delta)
                if not torch.isfinite(value).all():
                    raise PatchError(f"refusing revert: {name!r} would hold non-finite values")
                exact = tensor_fingerprint(value) == pre[name]
                bound = 0.0 if exact else revert_error_bound(p, value, delta)
                report[name] = {"exact": exact, "max_abs_error_bound": bound, "summary": describe_revert(exact, bound)}
                new_values[name] = value
            for name, value in new_values.items():
                write_weight(model, name, value)
        return report

    def _check_holds(self, model: nn.Module) -> None:
        """Refuse unless every parameter of ``model`` this patch changes holds what :meth:`apply` writes."""
        post = self.post_fingerprints()
        if post is None:
            raise PatchError(
                f"patch {self.patch_id} records no post-edit fingerprints (made by an older kedit): kedit cannot "
                "check that the model holds it, so it is not reverted from the file; revert with the handle of apply"
            )
        for name, expected in post.items():
            held = tensor_fingerprint(weight_value(model, name))
            if held != expected:
                state = (
                    "it holds the pre-edit weights"
                    if held == self.metadata["fingerprints"].get(name)
                    else "they differ from both the pre-edit weights and the ones the patch writes"
                )
                raise PatchError(
                    f"model does not hold patch {self.patch_id}: parameter {name!r} is not what the "
                    f"patch writes ({state}); nothing reverted"
                )


def _added(p: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``p + delta`` as :meth:`Patch.apply` writes it: added in float32, rounded to the parameter's dtype."""
    return (p.detach().float() + delta.to(p.device, torch.float32)).to(p.dtype)


def _subtracted(p: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return (p.detach().float() - delta.to(p.device, torch.float32)).to(p.dtype)


@dataclass
class AppliedPatch:
    """Handle of an applied patch: ``revert()`` restores the model bit-exactly (LIFO order)."""

    patch: Patch
    model: nn.Module
    saved: dict[str, torch.Tensor] = field(default_factory=dict)
    detach: Any = None
    reverted: bool = False
    #: applied with ``keep_copy=False``: the weights can only come back from the caller's snapshot
    copyless: bool = False

    def revert(self) -> None:
        if self.reverted:
            return
        if self.copyless:
            raise PatchError(
                f"patch {self.patch.patch_id} was applied without a copy of the weights it overwrote; restore the "
                "snapshot of whoever applied it (Editor.restore), or use Patch.revert_from_file"
            )
        self._pop()
        with torch.no_grad():
            for name, value in self.saved.items():
                write_weight(self.model, name, value)
        if self.detach is not None:
            self.detach()
        self._done()

    def release(self) -> None:
        """Take a ``keep_copy=False`` patch off the stack without touching the weights (the caller
        restores its own snapshot next)."""
        if self.reverted:
            return
        if not self.copyless:
            raise PatchError(f"patch {self.patch.patch_id} holds a copy: revert() it instead")
        self._pop()
        self._done()

    def _pop(self) -> None:
        applied = stack(self.model)
        if not applied or applied[-1] is not self:
            later = applied[-1].patch.patch_id if applied else "?"
            raise PatchError(f"patches revert in last-in-first-out order: revert {later} before {self.patch.patch_id}")
        applied.pop()

    def _done(self) -> None:
        from .plugins import get_registry

        self.reverted = True
        self.saved = {}
        get_registry().notify("patch_reverted", patch=self.patch, model=self.model)


def stack(model: nn.Module) -> list[AppliedPatch]:
    """Patches applied to ``model`` (oldest first)."""
    if STACK_ATTR not in model.__dict__:
        model.__dict__[STACK_ATTR] = []
    return model.__dict__[STACK_ATTR]


def revert_all(model: nn.Module) -> int:
    """Revert every applied patch, newest first; returns how many."""
    applied = stack(model)
    n = len(applied)
    while applied:
        applied[-1].revert()
    return n


def decode_metadata(raw: dict[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = dict(raw)
    for key in JSON_KEYS:
        if key in meta:
            try:
                meta[key] = json.loads(meta[key])
            except (json.JSONDecodeError, TypeError):
                raise PatchError(f"metadata field {key!r} is not valid JSON") from None
    return meta


def parse_layout(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Group ``delta/`` and ``lowrank/`` tensors by parameter, checking names and shapes."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        if name.startswith("delta/"):
            out.setdefault(name[len("delta/") :], {})["delta"] = t
        elif name.startswith("lowrank/"):
            param, _, part = name[len("lowrank/") :].rpartition("/")
            if part not in ("a", "b") or not param:
                raise PatchError(f"bad tensor name {name!r} (expected lowrank/<param>/a or /b)")
            out.setdefault(param, {})[part] = t
        elif not name.startswith("state/"):
            raise PatchError(f"bad tensor name {name!r} (expected delta/, lowrank/ or state/)")
    for param, parts in out.items():
        if "delta" in parts and len(parts) > 1:
            raise PatchError(f"parameter {param!r} has both a dense and a low-rank delta")
        if "delta" not in parts:
            a, b = parts.get("a"), parts.get("b")
            if a is None or b is None:
                raise PatchError(f"low-rank delta for {param!r} lacks its {'a' if a is None else 'b'} factor")
            if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
                raise PatchError(
                    f"low-rank factors for {param!r} have incompatible shapes {tuple(a.shape)} and {tuple(b.shape)}"
                )
    return out
