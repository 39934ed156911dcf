"""GRACE (Hartvigsen et al. 2023): lifelong editing with a discrete key-value codebook at one layer.

One edit = one codebook update (:mod:`.codebook_update`) plus the optimization of one value
(:func:`kedit_grace.fit.fit_targets`). The patch carries the whole codebook, so the last patch of a
sequential run reproduces every edit on an unedited model. Each entry also records its span, the
number of tokens of its answer (:func:`answer_span`): a hit replaces the layer's output at the
positions that predict the answer and nowhere after them.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from pydantic import Field

from kedit_core.architecture import ArchitectureSpec, get_module, get_parameter
from kedit_core.edit import Edit
from kedit_core.errors import KeditError, PatchError
from kedit_core.hparams import Hyperparams
from kedit_core.method import Detach, EditContext, EditMethod, ModelContext, PatchKind
from kedit_core.ops.logits import model_device
from kedit_core.patch import Patch
from kedit_core.request import EditRequest

from ..codebook import DecodingState, TailCache
from ..fit import fit_targets
from ..keys import answer_span, last_token_input
from ..wrapping import install, replace_module, unwrap_base
from .adaptor import GraceAdaptor
from .codebook_update import update_codebook

log = logging.getLogger(__name__)


class GraceHyperparams(Hyperparams):
    #: decoder layer whose MLP output projection carries the codebook
    layer: int = 14
    #: initial deferral radius of a new entry (in the distance's units)
    eps_init: float = Field(default=1.0, gt=0)
    metric: Literal["euclidean", "cosine"] = "euclidean"
    #: Adam step size for the value
    lr: float = Field(default=0.05, gt=0)
    max_steps: int = Field(default=100, ge=1)
    #: stop once every target token is the argmax and the mean loss is below this
    stop_loss: float = Field(default=0.1, ge=0)
    batch_size: int = Field(default=1, ge=1, le=1)


class GRACE(EditMethod):
    """GRACE: a codebook adaptor (keys, values, deferral radii) around one MLP output projection."""

    name = "grace"
    hparams_class = GraceHyperparams
    supports_batch = False
    supports_sequential = True
    cumulative_patches = True  # each patch carries the whole codebook / block set
    edit_area = "codebook"
    kind = PatchKind.MODULE_STATE
    wraps = "mlp_out"  # core refuses a patch naming any other module
    preset_package = "kedit_grace"

    def __init__(self) -> None:
        self._tails = TailCache(size=8)

    # -- editing ---------------------------------------------------------------------------------
    def compute_edit(
        self,
        model,
        tokenizer,
        requests: list[EditRequest],
        hparams: GraceHyperparams,
        arch: ArchitectureSpec,
        ctx: EditContext,
    ) -> Edit:
        if len(requests) != 1:
            raise KeditError("grace edits one request at a time (no batch editing)")
        request = requests[0]
        layer = arch.check_layer(model, hparams.layer, "layer")
        path = arch.layer_path(layer, arch.mlp_out)
        param = arch.mlp_out_param(layer)
        current = get_module(model, path)
        existing = current if isinstance(current, GraceAdaptor) else None
        keys, values, radii, labels = self._current_codebook(model, arch, param, existing)
        prompts = [list(p) for p in existing.prompts] if existing is not None else []
        spans = existing.spans.tolist() if existing is not None else []
        device = model_device(model)
        key = last_token_input(model, tokenizer, current, request.prompt)
        upd = update_codebook(keys, radii, labels, key, request.target_new, hparams.eps_init, hparams.metric)
        new_keys = self._tails.grow(keys).append(key[None]) if upd.new_key is not None else keys
        if upd.row == len(prompts):
            prompts.append([request.prompt])
        else:  # expand: the entry now answers its earlier prompts and this one; replace: this one only
            prompts[upd.row] = [*prompts[upd.row], request.prompt] if upd.action == "expand" else [request.prompt]
        span = answer_span(tokenizer, prompts[upd.row], request.target_new)
        spans = [*spans, span] if upd.row == len(spans) else [*spans[: upd.row], span, *spans[upd.row + 1 :]]
        spans_t = torch.tensor(spans, dtype=torch.long, device=device)
        base = existing.base if existing is not None else current
        if upd.row < values.shape[0]:
            start = values[upd.row].clone()
        else:
            with torch.no_grad():
                start = base(key[None].to(get_parameter(model, param).dtype))[0].float()
        value, fit = self._optimize_value(
            model,
            tokenizer,
            arch,
            prompts[upd.row],
            request.target_new,
            hparams,
            path,
            current,
            base,
            new_keys,
            values,
            upd.radii.to(device),
            upd.labels,
            spans_t,
            upd.row,
            start,
        )
        if upd.row == values.shape[0]:
            new_values = self._tails.grow(values).append(value[None])
        else:
            new_values = values.clone()
            new_values[upd.row] = value
        log.debug("grace %s at %s: entry %d, loss %.4f after %d steps", upd.action, path, upd.row, fit.loss, fit.steps)
        return Edit(
            state={path: {"keys": new_keys, "values": new_values, "radii": upd.radii}},
            modules=[path],
            fingerprint_params=[param],
            extra={
                "labels": upd.labels,
                "prompts": prompts,
                "spans": spans,
                "metric": hparams.metric,
                "supersedes": existing.state_id if existing is not None else "",
                "action": upd.action,
                "entry": upd.row,
                "entries": len(upd.labels),
                "fit": {"steps": fit.steps, "loss": fit.loss, "accuracy": fit.accuracy},
            },
        )

    @staticmethod
    def _current_codebook(model, arch, param, existing):
        if existing is not None:
            return existing.keys.float(), existing.values.float(), existing.radii.float(), list(existing.labels)
        out_dim, in_dim = arch.weight(model, param).shape
        device = get_parameter(model, param).device
        return (
            torch.zeros(0, in_dim, device=device),
            torch.zeros(0, out_dim, device=device),
            torch.zeros(0, device=device),
            [],
        )

    def _optimize_value(
        self,
        model,
        tokenizer,
        arch,
        prompts,
        label,
        hparams,
        path,
        current,
        base,
        keys,
        values,
        radii,
        labels,
        spans,
        row,
        start,
    ):
        """Install a provisional adaptor whose entry ``row`` is a free tensor; fit it so that every
        prompt the entry answers gets ``label``."""
        table = values if row < values.shape[0] else torch.cat([values, start[None]])
        value = start.detach().clone().requires_grad_(True)
        adaptor = GraceAdaptor(base, keys, table, radii, labels, hparams.metric, spans=spans)
        adaptor.trainable = (row, value)
        replace_module(model, path, adaptor)
        try:
            fit = fit_targets(
                model,
                tokenizer,
                arch,
                prompts,
                [label] * len(prompts),
                [value],
                first_layer=arch.check_layer(model, hparams.layer, "layer"),
                lr=hparams.lr,
                max_steps=hparams.max_steps,
                stop_loss=hparams.stop_loss,
            )
        finally:
            replace_module(model, path, current)
        return value.detach(), fit

    # -- applying --------------------------------------------------------------------------------
    def attach(self, target: ModelContext, patch: Patch) -> Detach:
        model, arch = target.model, target.arch
        meta = patch.metadata
        modules, extra = meta.get("modules") or [], meta.get("extra") or {}
        if len(modules) != 1:
            raise PatchError(f"grace patch {patch.patch_id} must name exactly one wrapped module, not {modules}")
        path = modules[0]
        keys, values, radii = patch.require_state(path, "keys", "values", "radii")
        labels, metric = extra.get("labels"), extra.get("metric")
        n = keys.shape[0]
        if keys.ndim != 2 or values.ndim != 2 or radii.ndim != 1 or values.shape[0] != n or radii.shape[0] != n:
            raise PatchError(
                f"grace patch {patch.patch_id}: codebook shapes disagree "
                f"(keys {tuple(keys.shape)}, values {tuple(values.shape)}, radii {tuple(radii.shape)})"
            )
        prompts = extra.get("prompts", [[] for _ in range(n)])
        if not isinstance(labels, list) or len(labels) != n or metric not in ("euclidean", "cosine"):
            raise PatchError(f"grace patch {patch.patch_id}: extra metadata needs {n} labels and a metric")
        if not isinstance(prompts, list) or len(prompts) != n:
            raise PatchError(f"grace patch {patch.patch_id}: extra metadata needs the prompts of {n} entries")
        spans = extra.get("spans")
        if spans is None:  # patches written before entries recorded their answer's length
            if target.tokenizer is None:
                raise PatchError(f"grace patch {patch.patch_id} has no answer spans; applying it needs the tokenizer")
            spans = [answer_span(target.tokenizer, p, label) for p, label in zip(prompts, labels, strict=True)]
        if not isinstance(spans, list) or len(spans) != n or not all(type(s) is int and s >= 1 for s in spans):
            raise PatchError(f"grace patch {patch.patch_id}: extra metadata needs {n} positive answer spans")
        current = get_module(model, path)
        params = list(meta["fingerprints"])
        if len(params) != 1:
            raise PatchError(f"grace patch {patch.patch_id} must fingerprint exactly the wrapped weight, not {params}")
        param = params[0]
        out_dim, in_dim = arch.weight(model, param).shape
        if keys.shape[1] != in_dim or values.shape[1] != out_dim:
            raise PatchError(
                f"grace patch {patch.patch_id}: codebook is {keys.shape[1]}->{values.shape[1]}, "
                f"module {path!r} is {in_dim}->{out_dim}"
            )
        for name, t in (("keys", keys), ("values", values), ("radii", radii)):
            if not torch.isfinite(t).all():
                raise PatchError(f"grace patch {patch.patch_id}: {name} has non-finite values")
        device = get_parameter(model, param).device
        adaptor = GraceAdaptor(
            unwrap_base(current, GraceAdaptor, extra.get("supersedes", "")),
            keys.to(device),
            values.to(device),
            radii.to(device),
            labels,
            metric,
            state_id=patch.patch_id,
            spans=torch.tensor(spans, dtype=torch.long, device=device),
        )
        adaptor.prompts = prompts
        uninstall = install(model, {path: adaptor})
        adaptor.decoding = DecodingState().attach(model)  # after install: a failed install leaves no hook

        def detach() -> None:
            uninstall()
            adaptor.decoding.detach()

        return detach


def codebook_summary(model, path: str) -> dict[str, Any]:
    """Entries, bytes and radius statistics of the GRACE adaptor at ``path`` (for reports)."""
    adaptor = get_module(model, path)
    if not isinstance(adaptor, GraceAdaptor):
        return {"entries": 0, "bytes": 0}
    nbytes = sum(t.numel() * t.element_size() for t in (adaptor.keys, adaptor.values, adaptor.radii))
    r = adaptor.radii.float()
    return {
        "entries": len(adaptor),
        "bytes": nbytes,
        "radius_min": float(r.min()),
        "radius_median": float(r.median()),
        "radius_max": float(r.max()),
    }
