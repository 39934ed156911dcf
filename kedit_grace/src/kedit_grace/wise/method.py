"""WISE (Wang et al., NeurIPS 2024): lifelong editing in a side memory with an activation router.

One edit trains the side memory ``W_v'`` (:mod:`.side_memory`) -- a copy of one MLP value matrix,
started from ``W_v`` -- on the edit's target loss plus the routing margin loss
(:func:`.routing.routing_loss`), with a fixed random gradient mask of ratio ``rho`` and each entry of
``W_v' - W_v`` kept within ``norm_constraint``. The routing threshold is then set from the edits'
activation scores (:func:`.routing.threshold`). The main memory is never changed, so an input the
router leaves on it runs the unedited model exactly.

Implemented: one side memory, the margin-based routing loss and the activation router with its
threshold, random gradient masks (``mask_ratio``), knowledge sharding into disjoint subspaces
(``shards``, ``shard_size``; merged by construction, see :mod:`.routing`), the norm constraint, batch
and sequential editing (each patch carries the whole side memory, so the newest patch alone
reproduces a run). Replay (``replay``): each edit also trains on a random draw of earlier edits' targets.
Not implemented: overlapping shards with Ties-merging's trimming and sign election, and WISE-Retrieve
(a choice among several saved side memories).
kedit departures (see :mod:`.side_memory` and :mod:`.routing`): routing per position with answer
spans instead of per input, earlier edits' keys in the ``beta`` term, and irrelevant inputs drawn from
what the method can know without the requests' own locality probes (evaluation data, never trained on):
a fixed list of generic prompts (``irrelevant_prompts``), texts sampled from the model itself
(``irrelevant_samples``) and the locality prompts of a training set's last records (``irrelevant_data``:
factual prompts about other subjects, the inputs a router most easily confuses with an edit; the
paper's ``x_i`` also come from its training set).
"""

from __future__ import annotations

import logging
import math
import random
from typing import Literal

import torch
from pydantic import Field, model_validator

from kedit_core.architecture import ArchitectureSpec, get_module, get_parameter
from kedit_core.edit import Edit
from kedit_core.errors import PatchError
from kedit_core.hparams import Hyperparams
from kedit_core.method import Detach, EditContext, EditMethod, ModelContext, PatchKind
from kedit_core.models import model_fingerprint
from kedit_core.ops.sampling import model_samples
from kedit_core.ops.tokens import encode_pairs
from kedit_core.patch import Patch
from kedit_core.request import EditRequest
from kedit_core.trainer import load_training_requests

from ..codebook import DecodingState, TailCache
from ..fit import FitResult, fit_targets
from ..keys import answer_span, sequence_inputs
from ..wrapping import aligned, install, replace_module, unwrap_base
from .routing import RoutingSet, activation_scores, active_positions, gradient_mask, routing_loss, threshold
from .side_memory import SideMemory

log = logging.getLogger(__name__)

#: inputs no edit is about, for the routing loss's ``x_i`` (generic text; never evaluation probes)
IRRELEVANT_PROMPTS = [
    "The weather forecast for tomorrow says",
    "She opened the door and saw",
    "In mathematics, a prime number is",
    "The recipe calls for two cups of",
    "He has been learning to play the",
    "The meeting has been moved to",
    "Water boils at a temperature of",
    "The best way to learn a new language is",
]


class WiseHyperparams(Hyperparams):
    #: decoder layer whose MLP value matrix (down-projection) gets the side memory
    layer: int = 12
    #: step size of the side memory's optimizer (the paper: SGD, 1.0 on LLaMA-2-7B)
    lr: float = Field(default=1.0, gt=0)
    optimizer: Literal["sgd", "adam"] = "sgd"
    max_steps: int = Field(default=70, ge=1)
    #: stop once every target token is the argmax, the mean loss is below this and the margins are met
    stop_loss: float = Field(default=0.1, ge=0)
    #: routing margins: irrelevant inputs score below alpha, edits above beta, with a gap of gamma
    alpha: float = Field(default=5.0, ge=0)
    beta: float = Field(default=20.0, gt=0)
    gamma: float = Field(default=10.0, ge=0)
    #: the threshold is act_ratio times the smallest score of an edit
    act_ratio: float = Field(default=0.88, gt=0, le=1)
    #: fraction rho of the side memory's entries that edits may change (1.0: all of them)
    mask_ratio: float = Field(default=0.2, gt=0, le=1)
    #: every entry of W_v' - W_v stays within +- this
    norm_constraint: float = Field(default=1.0, gt=0)
    irrelevant_prompts: list[str] = Field(default_factory=lambda: list(IRRELEVANT_PROMPTS), min_length=1)
    #: more irrelevant inputs: this many texts sampled from the model itself (cached per model) ...
    irrelevant_samples: int = Field(default=0, ge=0)
    #: ... of this many sampled tokens each
    irrelevant_sample_tokens: int = Field(default=24, ge=1)
    #: ... and the locality prompts of the last ``irrelevant_records`` records of this training data set
    #: (a shipped name such as ``counterfact-train``, or a path): factual prompts about other subjects,
    #: the inputs a router most easily confuses with an edit (the paper's x_i come from the training set)
    irrelevant_data: str | None = None
    irrelevant_records: int = Field(default=200, ge=1)
    #: each edit also trains on up to this many earlier edits of the side memory (their target loss
    #: beside the new ones', drawn at random), so that new edits do not overwrite what old ones wrote
    replay: int = Field(default=0, ge=0)
    #: knowledge sharding: the side memory's entries are split into this many disjoint random subspaces
    #: of ``mask_ratio`` each (``shards * mask_ratio <= 1``); the first ``shard_size`` edits train
    #: subspace 0, the next ``shard_size`` subspace 1, ..., then around again
    shards: int = Field(default=1, ge=1)
    shard_size: int = Field(default=100, ge=1)
    #: seed of the gradient masks (and of the replayed edits' draw)
    seed: int = 0
    batch_size: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _disjoint_shards(self) -> WiseHyperparams:
        if self.shards > 1 and self.shards * self.mask_ratio > 1 + 1e-9:
            raise ValueError(
                f"{self.shards} disjoint shards of mask_ratio {self.mask_ratio} need shards * mask_ratio <= 1"
            )
        return self

    def shard(self, edits_before: int) -> int:
        """The subspace that trains the edits made after ``edits_before`` earlier ones."""
        return (edits_before // self.shard_size) % self.shards


def replayed(members: list[list[str]], hparams: WiseHyperparams) -> list[tuple[str, str]]:
    """Up to ``hparams.replay`` of the side memory's earlier ``[prompt, target]`` edits, drawn at
    random (seeded by ``seed`` and how many there are, so a run is reproducible)."""
    k = min(hparams.replay, len(members))
    picked = random.Random(hparams.seed + len(members)).sample(range(len(members)), k) if k else []
    return [(members[i][0], members[i][1]) for i in sorted(picked)]


class WISE(EditMethod):
    """WISE: a routed side memory beside one MLP down-projection."""

    name = "wise"
    hparams_class = WiseHyperparams
    supports_batch = True
    supports_sequential = True
    cumulative_patches = True  # each patch carries the whole side memory
    edit_area = "side memory"
    kind = PatchKind.MODULE_STATE
    wraps = "mlp_out"
    preset_package = "kedit_grace"

    def __init__(self) -> None:
        self._tails = TailCache(size=4)
        self._data_prompts: dict[tuple[str, int], list[tuple[str, str]]] = {}

    def _irrelevant(self, model, tokenizer, requests, hparams: WiseHyperparams, ctx: EditContext) -> list[str]:
        """The routing loss's irrelevant inputs: the listed prompts, the model's own samples and the
        data set's locality prompts, without any that names a subject of ``requests``."""
        out = list(hparams.irrelevant_prompts)
        if hparams.irrelevant_samples:
            fp = ctx.model_fingerprint or model_fingerprint(model)
            n, length = hparams.irrelevant_samples, hparams.irrelevant_sample_tokens
            out += model_samples(model, tokenizer, fp, ctx.cache_dir, n, length, seed=hparams.seed)
        if hparams.irrelevant_data:
            key = (hparams.irrelevant_data, hparams.irrelevant_records)
            if key not in self._data_prompts:
                recs = load_training_requests(hparams.irrelevant_data)[-hparams.irrelevant_records :]
                self._data_prompts[key] = [(p.prompt, r.subject) for r in recs for p in r.locality]
            subjects = {r.subject for r in requests}
            out += [
                p for p, subj in self._data_prompts[key] if subj not in subjects and not any(s in p for s in subjects)
            ]
        return out

    # -- editing ---------------------------------------------------------------------------------
    def compute_edit(
        self,
        model,
        tokenizer,
        requests: list[EditRequest],
        hparams: WiseHyperparams,
        arch: ArchitectureSpec,
        ctx: EditContext,
    ) -> Edit:
        layer = arch.check_layer(model, hparams.layer, "layer")
        path, param = arch.layer_path(layer, arch.mlp_out), arch.mlp_out_param(layer)
        current = get_module(model, path)
        existing = current if isinstance(current, SideMemory) else None
        main = arch.weight(model, param).detach()
        start = existing.side_weight.float() if existing is not None else main.float().clone()
        old_keys = existing.keys.float() if existing is not None else main.new_zeros(0, main.shape[1]).float()
        members = [list(m) for m in existing.members] if existing is not None else []
        old_spans = existing.spans.tolist() if existing is not None else []
        prompts, targets = [r.prompt for r in requests], [r.target_new for r in requests]
        irrelevant = self._irrelevant(model, tokenizer, requests, hparams, ctx)
        shard = hparams.shard(len(members))
        keys, others = self._activations(model, tokenizer, current, prompts, targets, irrelevant)
        new_keys = self._tails.grow(old_keys).append(keys)
        spans = [*old_spans, *(answer_span(tokenizer, [p], t) for p, t in zip(prompts, targets, strict=True))]
        weight, fit = self._train(
            model,
            tokenizer,
            arch,
            path,
            current,
            start,
            RoutingSet(keys, old_keys, others),
            [*zip(prompts, targets, strict=True), *replayed(members, hparams)],
            hparams,
            shard=shard,
        )
        delta = weight.float() - main.float()
        scores = activation_scores(new_keys, delta)
        eps = threshold(scores, hparams.act_ratio)
        irrelevant_max = float(activation_scores(others, delta).max())
        if irrelevant_max > eps:
            log.warning(
                "wise: an irrelevant position scores %.4g, above the threshold %.4g (margins not met)",
                irrelevant_max,
                eps,
            )
        log.debug(
            "wise at %s: %d edits, threshold %.4g, loss %.4f after %d steps", path, len(spans), eps, fit.loss, fit.steps
        )
        return Edit(
            state={path: {"weight": weight, "keys": new_keys}},
            modules=[path],
            fingerprint_params=[param],
            extra={
                "members": [*members, *([p, t] for p, t in zip(prompts, targets, strict=True))],
                "spans": spans,
                "threshold": eps,
                "edit_scores": [float(s) for s in scores],
                "irrelevant_max": irrelevant_max,
                "supersedes": existing.state_id if existing is not None else "",
                "edits": len(spans),
                "shard": shard,
                "fit": {
                    "steps": fit.steps,
                    "loss": fit.loss,
                    "accuracy": fit.accuracy,
                    "routing_loss": fit.regularizer,
                },
            },
        )

    @staticmethod
    def _activations(model, tokenizer, module, prompts, targets, irrelevant):
        """The keys (each edit prompt's last-token activation, ``[E, in]``) and every other position's
        activation seen while editing (``[M, in]``: the edit sequences' other tokens, the irrelevant
        prompts). The side memory sits above them: they are constants of the training."""
        seqs = sequence_inputs(model, tokenizer, module, prompts, targets)
        plens = encode_pairs(tokenizer, prompts, targets).prompt_lens
        keys = torch.stack([s[n - 1] for s, n in zip(seqs, plens, strict=True)])
        rest = [torch.cat([s[: n - 1], s[n:]]) for s, n in zip(seqs, plens, strict=True)]
        others = torch.cat([*rest, *sequence_inputs(model, tokenizer, module, irrelevant)])
        return keys, others

    @staticmethod
    def _train(
        model, tokenizer, arch, path, current, start, routing: RoutingSet, pairs, hparams, shard: int = 0
    ) -> tuple[torch.Tensor, FitResult]:
        """Install a provisional side memory (around the main memory, replacing ``current`` for a
        while) that serves the positions predicting the targets; train ``W_v' = start + M * D``
        (``D`` free, ``M`` the gradient mask of ``shard``); return ``W_v'`` in the weight's dtype."""
        layer = arch.check_layer(model, hparams.layer, "layer")
        main = arch.weight(model, arch.mlp_out_param(layer)).detach()
        existing = current if isinstance(current, SideMemory) else None
        keys, old_keys, others = routing
        prompts, targets = [p for p, _ in pairs], [t for _, t in pairs]
        device = main.device
        mask = gradient_mask(tuple(main.shape), hparams.mask_ratio, hparams.seed, device, shard)
        offset = start - main.float()  # W_v' - W_v before this edit
        free = torch.zeros_like(start, requires_grad=True)
        bound = hparams.norm_constraint

        def side() -> torch.Tensor:
            return start + mask * free

        def regularizer() -> torch.Tensor:
            delta = offset + mask * free
            edit = torch.cat([activation_scores(keys, delta), activation_scores(old_keys, delta)])
            with torch.no_grad():
                active = active_positions(activation_scores(others, delta), hparams.alpha)
            irr = activation_scores(others[active], delta)
            return routing_loss(edit, irr, hparams.alpha, hparams.beta, hparams.gamma, n_irrelevant=len(others))

        def project() -> None:  # |W_v' - W_v| <= norm_constraint, entry by entry
            free.copy_(torch.clamp(free, min=-bound - offset, max=bound - offset))

        enc = encode_pairs(tokenizer, prompts, targets, device)
        rows, cols = enc.target_positions()
        forced = torch.zeros(enc.input_ids.shape, dtype=torch.bool, device=device)
        forced[rows.to(device), cols.to(device)] = True
        base = existing.base if existing is not None else current
        memory = SideMemory(
            base,
            start,
            old_keys,
            existing.spans if existing is not None else torch.zeros(0, dtype=torch.long, device=device),
            math.inf,
            conv1d=arch.weight_layout == "conv1d",
        )
        memory.trainable, memory.forced = side, forced
        replace_module(model, path, memory)
        try:
            fit = fit_targets(
                model,
                tokenizer,
                arch,
                prompts,
                targets,
                [free],
                first_layer=layer,
                lr=hparams.lr,
                max_steps=hparams.max_steps,
                stop_loss=hparams.stop_loss,
                regularizer=regularizer,
                after_step=project,
                optimizer=hparams.optimizer,
            )
        finally:
            replace_module(model, path, current)
        return side().detach().to(main.dtype), fit

    # -- applying --------------------------------------------------------------------------------
    def attach(self, target: ModelContext, patch: Patch) -> Detach:
        model, arch = target.model, target.arch
        meta, pid = patch.metadata, patch.patch_id
        modules, extra = meta.get("modules") or [], meta.get("extra") or {}
        params = list(meta.get("fingerprints") or [])
        if len(modules) != 1 or len(params) != 1:
            raise PatchError(f"wise patch {pid} must name exactly one wrapped module and its weight, not {modules}")
        path, param = modules[0], params[0]
        weight, keys = (aligned(t) for t in patch.require_state(path, "weight", "keys"))
        out_dim, in_dim = arch.weight(model, param).shape
        if tuple(weight.shape) != (out_dim, in_dim) or keys.ndim != 2 or keys.shape[1] != in_dim:
            raise PatchError(
                f"wise patch {pid}: side memory {tuple(weight.shape)} / keys {tuple(keys.shape)} do not fit "
                f"module {path!r} ({in_dim}->{out_dim})"
            )
        n = keys.shape[0]
        spans, members, eps = extra.get("spans"), extra.get("members"), extra.get("threshold")
        if not isinstance(spans, list) or len(spans) != n or not all(type(s) is int and s >= 1 for s in spans):
            raise PatchError(f"wise patch {pid}: extra metadata needs {n} positive answer spans")
        if not isinstance(members, list) or len(members) != n:
            raise PatchError(f"wise patch {pid}: extra metadata needs the {n} edits it holds (members)")
        if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
            raise PatchError(f"wise patch {pid}: extra metadata needs a finite routing threshold")
        for name, t in (("weight", weight), ("keys", keys)):
            if not torch.isfinite(t).all():
                raise PatchError(f"wise patch {pid}: {name} has non-finite values")
        device = get_parameter(model, param).device
        memory = SideMemory(
            unwrap_base(get_module(model, path), SideMemory, extra.get("supersedes", "")),
            weight.to(device),
            keys.to(device),
            torch.tensor(spans, dtype=torch.long, device=device),
            float(eps),
            conv1d=arch.weight_layout == "conv1d",
            state_id=pid,
        )
        memory.members = members
        uninstall = install(model, {path: memory})
        memory.decoding = DecodingState().attach(model)  # after install: a failed install leaves no hook

        def detach() -> None:
            uninstall()
            memory.decoding.detach()

        return detach
