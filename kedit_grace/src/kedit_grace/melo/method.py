"""MELO (Yu et al. 2024): model editing with neuron-indexed dynamic LoRA.

Each edit adds a key to the index (:mod:`.router`) and trains one LoRA block (:mod:`.lora`) --
a fresh one, or the block of a nearby cluster of edits (:mod:`.allocate`). The patch carries the
whole index and every block, so the last patch of a sequential run reproduces all edits. Each key
also records its edit's answer span (patch extra ``spans``): a hit routes the positions that
predict the answer to the block, and nothing after them (issue 16).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from kedit_core.architecture import ArchitectureSpec, get_module, get_parameter
from kedit_core.edit import Edit
from kedit_core.errors import HparamsError, KeditError, PatchError
from kedit_core.hparams import Hyperparams
from kedit_core.method import Detach, EditContext, EditMethod, ModelContext, PatchKind
from kedit_core.ops.logits import model_device
from kedit_core.patch import Patch
from kedit_core.request import EditRequest

from ..codebook import TailCache
from ..fit import fit_targets
from ..keys import answer_span, last_token_input
from ..wrapping import aligned, install, replace_module, unwrap_base
from .allocate import allocate_block
from .lora import MeloLoRA
from .router import MeloRouter

log = logging.getLogger(__name__)


class MeloHyperparams(Hyperparams):
    #: the key index reads the input of this layer's attention (the normalized residual stream)
    router_layer: int = 16
    #: layers whose MLP output projection carries LoRA blocks (all >= router_layer)
    lora_layers: list[int] = Field(default=[16, 17], min_length=1)
    rank: int = Field(default=4, ge=1)
    scale: float = Field(default=1.0, gt=0)
    #: routing radius of each key
    radius: float = Field(default=0.45, gt=0)
    #: a new edit joins the block of a key this close (and trains it with that block's edits)
    cluster_radius: float = Field(default=0.1, ge=0)
    max_cluster: int = Field(default=4, ge=1)
    metric: Literal["euclidean", "cosine"] = "cosine"
    lr: float = Field(default=1e-2, gt=0)
    max_steps: int = Field(default=100, ge=1)
    stop_loss: float = Field(default=0.1, ge=0)
    seed: int = 0
    batch_size: int = Field(default=1, ge=1, le=1)

    @model_validator(mode="after")
    def _lora_above_router(self) -> MeloHyperparams:
        if any(layer >= 0 and layer < self.router_layer for layer in self.lora_layers if self.router_layer >= 0):
            raise ValueError("lora_layers must not lie below router_layer (LoRA would change the routing input)")
        return self


class MELO(EditMethod):
    """MELO: LoRA blocks on MLP output projections, routed per input by a key index."""

    name = "melo"
    hparams_class = MeloHyperparams
    supports_batch = False
    supports_sequential = True
    cumulative_patches = True  # each patch carries the whole codebook / block set
    edit_area = "LoRA blocks"
    kind = PatchKind.MODULE_STATE
    wraps = "mlp_out"  # core refuses a patch naming any other module
    preset_package = "kedit_grace"

    def __init__(self) -> None:
        self._tails = TailCache(size=16)

    # -- editing ---------------------------------------------------------------------------------
    def compute_edit(
        self,
        model,
        tokenizer,
        requests: list[EditRequest],
        hparams: MeloHyperparams,
        arch: ArchitectureSpec,
        ctx: EditContext,
    ) -> Edit:
        if len(requests) != 1:
            raise KeditError("melo edits one request at a time (no batch editing)")
        request = requests[0]
        router_layer = arch.check_layer(model, hparams.router_layer, "router_layer")
        layers = sorted(arch.check_layers(model, hparams.lora_layers, "lora_layers"))
        if layers[0] < router_layer:
            raise HparamsError("lora_layers must not lie below router_layer")
        router_path = arch.layer_path(router_layer, arch.attn)
        paths = [arch.layer_path(layer, arch.mlp_out) for layer in layers]
        currents = {p: get_module(model, p) for p in paths}
        existing = self._existing(currents)
        keys, radii, blocks, members, tables = self._current_state(model, arch, paths, existing, hparams.rank)
        spans = existing_spans(existing, tokenizer, members)
        device = model_device(model)
        key = last_token_input(model, tokenizer, get_module(model, router_path), request.prompt)
        alloc = allocate_block(keys, blocks, key, hparams.cluster_radius, hparams.max_cluster, hparams.metric)
        new_block = int(tables[paths[0]][0].shape[0])
        new_blocks = blocks.clone()
        new_blocks[alloc.cluster] = new_block
        new_blocks = torch.cat([new_blocks, new_blocks.new_tensor([new_block])])
        new_keys = self._tails.grow(keys).append(key[None])
        new_radii = torch.cat([radii, radii.new_tensor([hparams.radius])])
        new_members = [*members, [request.prompt, request.target_new]]
        new_spans = [*spans, answer_span(tokenizer, [request.prompt], request.target_new)]
        start = self._start_block(tables, paths, alloc.start_block, hparams, new_block)
        train = [new_members[j] for j in alloc.cluster] + [new_members[-1]]
        router = MeloRouter(
            new_keys,
            new_radii.to(device),
            new_blocks.to(device),
            hparams.metric,
            spans=torch.tensor(new_spans, dtype=torch.long, device=device),
        )
        fit = self._train_block(
            model,
            tokenizer,
            arch,
            router,
            router_path,
            currents,
            existing,
            tables,
            start,
            new_block,
            train,
            hparams,
            router_layer,
        )
        state = {router_path: {"keys": new_keys, "radii": new_radii, "blocks": new_blocks.float()}}
        for path, (a, b) in zip(paths, start, strict=True):
            state[path] = {
                "lora_a": self._tails.grow(tables[path][0]).append(a.detach()[None]),
                "lora_b": self._tails.grow(tables[path][1]).append(b.detach()[None]),
            }
        log.debug(
            "melo %s block %d (%d edits), loss %.4f after %d steps",
            alloc.action,
            new_block,
            len(train),
            fit.loss,
            fit.steps,
        )
        return Edit(
            state=state,
            modules=paths,
            fingerprint_params=[f"{p}.weight" for p in paths],
            extra={
                "router": router_path,
                "metric": hparams.metric,
                "scale": hparams.scale,
                "members": new_members,
                "spans": new_spans,
                "supersedes": existing.state_id if existing is not None else "",
                "action": alloc.action,
                "block": new_block,
                "cluster_size": len(train),
                "keys": len(new_members),
                "fit": {"steps": fit.steps, "loss": fit.loss, "accuracy": fit.accuracy},
            },
        )

    @staticmethod
    def _existing(currents: dict) -> MeloLoRA | None:
        mods = list(currents.values())
        if all(isinstance(m, MeloLoRA) for m in mods) and len({id(m.router) for m in mods}) == 1:
            return mods[0]
        return None

    @staticmethod
    def _current_state(model, arch, paths, existing, rank):
        if existing is not None:
            r = existing.router
            tables = {}
            for p in paths:
                mod = get_module(model, p)
                tables[p] = (mod.lora_a.float(), mod.lora_b.float())
            return r.keys.float(), r.radii.float(), r.blocks.long(), list(existing.members), tables
        device = model_device(model)
        tables = {}
        for p in paths:
            out_dim, in_dim = arch.weight(model, f"{p}.weight").shape
            tables[p] = (torch.zeros(0, rank, in_dim, device=device), torch.zeros(0, out_dim, rank, device=device))
        hidden = get_module(model, arch.embed).weight.shape[1]
        return (
            torch.zeros(0, hidden, device=device),
            torch.zeros(0, device=device),
            torch.zeros(0, dtype=torch.long, device=device),
            [],
            tables,
        )

    @staticmethod
    def _start_block(tables, paths, start_block, hparams, new_block):
        """Trainable (A, B) per layer: copies of the cluster's block, or A ~ N(0, 1/d_in), B = 0."""
        out = []
        for k, p in enumerate(paths):
            a_tab, b_tab = tables[p]
            if start_block is not None:
                a, b = a_tab[start_block].clone(), b_tab[start_block].clone()
            else:
                gen = torch.Generator().manual_seed(hparams.seed * 1_000_003 + new_block * 101 + k)
                rank, in_dim = a_tab.shape[1:]
                a = (torch.randn(rank, in_dim, generator=gen) / in_dim**0.5).to(a_tab.device)
                b = torch.zeros(b_tab.shape[1:], device=b_tab.device)
            out.append((a.requires_grad_(True), b.requires_grad_(True)))
        return out

    def _train_block(
        self,
        model,
        tokenizer,
        arch,
        router,
        router_path,
        currents,
        existing,
        tables,
        start,
        new_block,
        train,
        hparams,
        router_layer,
    ):
        """Install a provisional index and LoRA bank whose ``new_block`` is trainable; fit it."""
        wrappers = {}
        for p, (a, b) in zip(currents, start, strict=True):
            base = existing_base(currents[p], existing)
            w = MeloLoRA(base, tables[p][0], tables[p][1], hparams.scale, router)
            w.trainable = (new_block, a, b)
            wrappers[p] = w
        if existing is not None:
            existing.router.enabled = False
        router.attach_to(get_module(model, router_path))
        try:
            for p, w in wrappers.items():
                replace_module(model, p, w)
            return fit_targets(
                model,
                tokenizer,
                arch,
                [m[0] for m in train],
                [m[1] for m in train],
                [t for pair in start for t in pair],
                first_layer=router_layer,
                lr=hparams.lr,
                max_steps=hparams.max_steps,
                stop_loss=hparams.stop_loss,
            )
        finally:
            for p, current in currents.items():
                replace_module(model, p, current)
            router.detach()
            if existing is not None:
                existing.router.enabled = True

    # -- applying --------------------------------------------------------------------------------
    def attach(self, target: ModelContext, patch: Patch) -> Detach:
        model, arch = target.model, target.arch
        meta = patch.metadata
        extra, paths = meta.get("extra") or {}, meta.get("modules") or []
        pid = patch.patch_id
        router_path = extra.get("router")
        if not paths or not isinstance(router_path, str):
            raise PatchError(f"melo patch {pid} names no LoRA modules or no router")
        keys, radii, blocks = (aligned(t) for t in patch.require_state(router_path, "keys", "radii", "blocks"))
        lora = {p: tuple(aligned(t) for t in patch.require_state(p, "lora_a", "lora_b")) for p in paths}
        n_keys, n_blocks = keys.shape[0], lora[paths[0]][0].shape[0]
        members = extra.get("members")
        if (
            radii.shape != (n_keys,)
            or blocks.shape != (n_keys,)
            or not isinstance(members, list)
            or len(members) != n_keys
        ):
            raise PatchError(
                f"melo patch {pid}: index shapes disagree (keys {tuple(keys.shape)}, radii "
                f"{tuple(radii.shape)}, blocks {tuple(blocks.shape)})"
            )
        if n_keys and (blocks.min() < 0 or blocks.max() >= n_blocks or not torch.equal(blocks, blocks.round())):
            raise PatchError(f"melo patch {pid}: block ids must be integers in [0, {n_blocks})")
        if extra.get("metric") not in ("euclidean", "cosine") or not isinstance(extra.get("scale"), (int, float)):
            raise PatchError(f"melo patch {pid}: extra metadata needs a metric and a scale")
        spans = extra.get("spans")
        if spans is None:  # patches written before keys recorded their answer's length
            if target.tokenizer is None:
                raise PatchError(f"melo patch {pid} has no answer spans; applying it needs the tokenizer")
            spans = member_spans(target.tokenizer, members)
        if not isinstance(spans, list) or len(spans) != n_keys or not all(type(s) is int and s >= 1 for s in spans):
            raise PatchError(f"melo patch {pid}: extra metadata needs {n_keys} positive answer spans")
        if router_path not in arch.role_paths(model, "attn"):
            raise PatchError(f"melo patch {pid} would route on {router_path!r}, not an attention module of this model")
        for p in paths:
            self._check_lora(model, arch, patch, p, *lora[p], n_blocks)
        for name, t in patch.state().items():
            if not torch.isfinite(t).all():
                raise PatchError(f"melo patch {pid}: {name} has non-finite values")
        device = get_parameter(model, f"{paths[0]}.weight").device
        router = MeloRouter(
            keys.to(device),
            radii.to(device),
            blocks.to(device),
            extra["metric"],
            state_id=pid,
            spans=torch.tensor(spans, dtype=torch.long, device=device),
        )
        supersedes = extra.get("supersedes", "")
        wrappers, old_routers = {}, []
        for p in paths:
            current = get_module(model, p)
            base = unwrap_base(current, MeloLoRA, supersedes)
            if base is not current and current.router not in old_routers:
                old_routers.append(current.router)
            wrappers[p] = MeloLoRA(
                base, lora[p][0].to(device), lora[p][1].to(device), float(extra["scale"]), router, state_id=pid
            )
            wrappers[p].members = members
        uninstall = install(model, wrappers)
        router.attach_to(get_module(model, router_path), model)
        for old in old_routers:
            old.enabled = False

        def detach() -> None:
            uninstall()
            router.detach()
            for old in old_routers:
                old.enabled = True

        return detach

    @staticmethod
    def _check_lora(model, arch, patch, path, a, b, n_blocks) -> None:
        param = f"{path}.weight"
        if param not in patch.metadata["fingerprints"]:
            raise PatchError(f"melo patch {patch.patch_id}: no fingerprint for {param!r}")
        out_dim, in_dim = arch.weight(model, param).shape
        if a.ndim != 3 or b.ndim != 3 or a.shape[0] != n_blocks or b.shape[0] != n_blocks:
            raise PatchError(
                f"melo patch {patch.patch_id}: LoRA bank of {path!r} has shapes {tuple(a.shape)}, {tuple(b.shape)}"
            )
        if a.shape[2] != in_dim or b.shape[1] != out_dim or a.shape[1] != b.shape[2]:
            raise PatchError(
                f"melo patch {patch.patch_id}: LoRA bank of {path!r} does not fit a {in_dim}->{out_dim} module"
            )


def member_spans(tokenizer: Any, members: list) -> list[int]:
    """The answer span of each ``[prompt, target]`` edit of the index."""
    if not all(isinstance(m, (list, tuple)) and len(m) == 2 and all(isinstance(x, str) for x in m) for m in members):
        raise PatchError("melo members must be [prompt, target] pairs")
    return [answer_span(tokenizer, [prompt], target) for prompt, target in members]


def existing_spans(existing: MeloLoRA | None, tokenizer: Any, members: list) -> list[int]:
    """The spans of the index being extended (derived from its members when its router has none)."""
    if existing is None:
        return []
    if existing.router.spans is not None:
        return [int(s) for s in existing.router.spans.tolist()]
    return member_spans(tokenizer, members)


def existing_base(current, existing):
    """The module under ``current`` when it belongs to the state being extended, else ``current``."""
    if existing is not None and isinstance(current, MeloLoRA) and current.router is existing.router:
        return current.base
    return current
