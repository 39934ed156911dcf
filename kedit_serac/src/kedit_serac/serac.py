"""SERAC (Mitchell et al. 2022b, "Memory-Based Model Editing at Scale").

The edit is an explicit memory of edit descriptors z_e. At inference (their eq. 1):

    f(x) = h_ψ(z_e*, x)  if  max_e g_φ(z_e, x) > threshold  (e* the argmax),   else  f_base(x)

g_φ is the trained scope classifier (:mod:`.scope_classifier`, trained by :mod:`.train_scope`),
h_ψ the counterfactual model (:mod:`.counterfactual`). Base weights never change: the patch is the
memory (edit embeddings, the classifier's parameters, the contexts), applied by routing the model's
forward and generate calls through it (:mod:`.memory`).
"""

from __future__ import annotations

import functools
import logging
from importlib import resources
from pathlib import Path

import torch
from pydantic import Field

from kedit_core.architecture import ArchitectureSpec
from kedit_core.edit import Edit
from kedit_core.errors import CheckpointError, KeditError, PatchError
from kedit_core.method import Detach, EditContext, EditMethod, ModelContext, PatchKind
from kedit_core.patch import Patch
from kedit_core.request import EditRequest
from kedit_core.trainer import Checkpoint, CheckpointCache, TrainingHyperparams

from .counterfactual import context
from .encoder import ENCODER_ID, shared_encoder
from .memory import Memory, attach_memory, require_tokenizer
from .scope_classifier import STATE_KEYS, ScopeClassifier
from .train_scope import ScopeTrainer, edit_text

log = logging.getLogger(__name__)

PACKAGED_CHECKPOINT = "serac-scope-minilm"


class SERACHyperparams(TrainingHyperparams):
    #: route an input to the counterfactual model when g_φ exceeds this probability
    threshold: float = Field(default=0.5, gt=0, lt=1)
    #: demonstrations the counterfactual model reads before the edit (picked at training time)
    n_demonstrations: int = Field(default=2, ge=0)
    batch_size: int = Field(default=200, ge=1)


def input_embedding_name(model: torch.nn.Module) -> str:
    weight = model.get_input_embeddings().weight
    for name, p in model.named_parameters():
        if p is weight:
            return name
    raise KeditError("cannot find the input embedding among the model's parameters")


def identity_params(model: torch.nn.Module) -> list[str]:
    """The parameters a memory patch fingerprints to recognise its base model: every 1-D one (norm
    scales, biases: few values, quick to hash), else the input embedding."""
    names = sorted(name for name, p in model.named_parameters() if p.ndim == 1)
    return names or [input_embedding_name(model)]


def checkpoint_dir(ctx: EditContext) -> Path:
    """``ctx.checkpoint`` or the classifier checkpoint shipped with the package."""
    if ctx.checkpoint is not None:
        return Path(ctx.checkpoint)
    return Path(str(resources.files("kedit_serac") / "checkpoints" / PACKAGED_CHECKPOINT))


def check_scope_checkpoint(ckpt: Checkpoint, dim: int) -> list[str]:
    """The demonstrations of a scope-classifier checkpoint for an encoder of size ``dim``, once its
    config and tensors are checked (a malformed one is a :class:`CheckpointError`)."""
    config, tensors, where = ckpt.config, ckpt.tensors, ckpt.directory
    if config.get("encoder") != ENCODER_ID:
        raise CheckpointError(f"{where}: not a SERAC scope-classifier checkpoint for {ENCODER_ID}")
    demos = config.get("demonstrations", [])
    if not isinstance(demos, list) or not all(isinstance(d, str) for d in demos):
        raise CheckpointError(f"{where}: config.json 'demonstrations' must be a list of strings")
    for name in sorted(set(STATE_KEYS) | tensors.keys()):
        if name not in tensors:
            raise CheckpointError(f"{where}: model.safetensors lacks tensor {name!r}")
        if name not in STATE_KEYS:
            raise CheckpointError(f"{where}: model.safetensors holds tensor {name!r}, which a scope classifier lacks")
        t = tensors[name]
        if not t.is_floating_point():
            raise CheckpointError(f"{where}: tensor {name!r} is {t.dtype}, not floating point")
        if name == "proj" and list(t.shape) != [dim, dim]:
            raise CheckpointError(f"{where}: tensor 'proj' has shape {list(t.shape)}, the encoder needs [{dim}, {dim}]")
        if name != "proj" and t.numel() != 1:
            raise CheckpointError(f"{where}: tensor {name!r} has shape {list(t.shape)}, expected one value")
    return demos


class SERAC(EditMethod):
    name = "serac"
    hparams_class = SERACHyperparams
    supports_batch = True
    supports_sequential = True
    requires_training = True
    edit_area = "memory (scope classifier + counterfactual model)"
    kind = PatchKind.MEMORY
    preset_package = "kedit_serac"

    @functools.cached_property
    def _checkpoints(self) -> CheckpointCache:
        return CheckpointCache()

    def compute_edit(
        self,
        model,
        tokenizer,
        requests: list[EditRequest],
        hparams: SERACHyperparams,
        arch: ArchitectureSpec,
        ctx: EditContext,
    ) -> Edit:
        ckpt = self._checkpoints.read(checkpoint_dir(ctx))
        encoder = shared_encoder()
        demos = check_scope_checkpoint(ckpt, encoder.dim)[: hparams.n_demonstrations]
        keys = encoder.embed([edit_text(r) for r in requests])
        return Edit(
            state={
                "scope_classifier": {k: ckpt.tensors[k].float().clone() for k in STATE_KEYS},
                "memory": {"keys": keys},
            },
            fingerprint_params=identity_params(model),
            extra={
                "encoder": ENCODER_ID,
                "threshold": hparams.threshold,
                "contexts": [context(demos, r.prompt, r.target_new) for r in requests],
                "checkpoint": {"source": str(ckpt.directory), "id": ckpt.id},
            },
        )

    def attach(self, target: ModelContext, patch: Patch) -> Detach:
        tokenizer = require_tokenizer(target.tokenizer, f"SERAC patch {patch.patch_id}")
        extra = patch.metadata.get("extra", {})
        classifier_state = dict(zip(STATE_KEYS, patch.require_state("scope_classifier", *STATE_KEYS), strict=True))
        (keys,) = patch.require_state("memory", "keys")
        contexts = list(extra.get("contexts", []))
        if len(contexts) != keys.shape[0]:
            raise PatchError(f"SERAC patch {patch.patch_id}: {keys.shape[0]} keys but {len(contexts)} contexts")
        classifier = ScopeClassifier.from_tensors(classifier_state)
        route = scope_router(classifier, keys, float(extra["threshold"]))
        return attach_memory(target.model, tokenizer, Memory(contexts, route))

    def trainer(
        self,
        model,
        tokenizer,
        hparams: SERACHyperparams,
        arch: ArchitectureSpec,
        ctx: EditContext,
        *,
        train: list[EditRequest],
        val: list[EditRequest] | None,
        out_dir: Path,
    ) -> ScopeTrainer:
        """The scope classifier's trainer (the counterfactual model is the base model in context)."""
        return ScopeTrainer(
            hparams, out_dir, train, val, shared_encoder(), ctx.cache_dir / "serac", progress=ctx.progress
        )


def scope_router(classifier: ScopeClassifier, keys: torch.Tensor, threshold: float):
    """``route(texts)``: the edit of highest g_φ per text, if above ``threshold``."""
    encoder = shared_encoder()

    @torch.no_grad()
    def route(texts: list[str]) -> list[tuple[int, float] | None]:
        probs = torch.sigmoid(classifier.logits(keys, encoder.embed(texts)))
        best, idx = probs.max(dim=1)
        return [(int(i), float(p)) if p > threshold else None for p, i in zip(best.tolist(), idx.tolist(), strict=True)]

    return route
