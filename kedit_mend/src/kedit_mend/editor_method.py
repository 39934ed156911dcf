"""What MEND and KE share: a trained editor network, loaded from a checkpoint, turns the edit's
fine-tuning gradient into a low-rank weight update -- one forward and one backward pass per edit,
no optimization at edit time.

Checkpoints are ``model.safetensors`` + ``config.json`` written by :class:`~.train_editor.EditorTrainer`.
The checkpoint used is ``--checkpoint``/``ctx.checkpoint``, else the hyperparameters' ``checkpoint``
(the name of one shipped in ``kedit_mend/checkpoints/``, or a directory), else none: the untrained
network (identity gradient network, initial step size), which is logged as a warning.
"""

from __future__ import annotations

import functools
import logging
from abc import abstractmethod
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from kedit_core.architecture import ArchitectureSpec, get_parameter
from kedit_core.edit import Edit
from kedit_core.errors import CheckpointError
from kedit_core.method import EditContext, EditMethod, PatchKind
from kedit_core.ops.logits import model_device
from kedit_core.ops.tokens import encode_pairs
from kedit_core.request import EditRequest
from kedit_core.trainer import Checkpoint, CheckpointCache, TrainingHyperparams, one_line

from .gradient_factors import gradient_factors
from .train_editor import EditorTrainer, edit_embeddings

log = logging.getLogger(__name__)


class EditorHyperparams(TrainingHyperparams):
    """Edited layers (their MLP down-projection weights), the editor's checkpoint and training knobs."""

    layers: list[int] = Field(default=[-1], min_length=1)
    #: initial step size of the update (learned per layer during training)
    edit_lr: float = Field(default=1e-3, gt=0)
    #: at edit time (not in training), the trained network's update times this: the learned step sizes
    #: are fitted to teacher-forced losses, and a smaller step trades a little of the target's
    #: probability for text that does not loop on the target (see the presets' measurements)
    edit_scale: float = Field(default=1.0, gt=0)
    #: a checkpoint shipped with kedit-mend (by name) or a directory; ``--checkpoint`` overrides it
    checkpoint: str | None = None
    #: no gradient terms from special tokens (BOS): their hidden states are the same in every input,
    #: so an update there reaches every input
    exclude_special_tokens: bool = True
    #: requests per chunk in ``Editor.edit`` (their gradients are summed into one update)
    batch_size: int = Field(default=1, ge=1)
    #: training: softmax over the targets, the unedited model's top-k and this many sampled tokens
    #: (null: the full vocabulary)
    train_vocab_sample: int | None = Field(default=4096, ge=1)
    train_top_k: int = Field(default=64, ge=1)
    #: training: weight of the continuation KL -- at the position after the new target in the edit
    #: prompt, and along the next ``continuation_tokens - 1`` tokens of the unedited model's greedy
    #: continuation there, the edited model's next-token distribution is held to the unedited model's
    #: (the edit should make the model say the target, then go on as it would have; 0: the papers' objective)
    continuation_loss_weight: float = Field(default=0.0, ge=0)
    continuation_tokens: int = Field(default=2, ge=1)


def packaged_checkpoint(name: str) -> Path:
    return Path(str(resources.files("kedit_mend") / "checkpoints" / name))


def resolve_checkpoint(hparams: EditorHyperparams, ctx: EditContext) -> Path | None:
    if ctx.checkpoint is not None:
        return Path(ctx.checkpoint)
    if hparams.checkpoint is None:
        return None
    shipped = packaged_checkpoint(hparams.checkpoint)
    return shipped if shipped.is_dir() else Path(hparams.checkpoint)


def excluded_ids(tokenizer: Any, hparams: Any) -> list[int] | None:
    """Token ids that give no gradient terms (the tokenizer's special tokens, if configured)."""
    return list(tokenizer.all_special_ids) if hparams.exclude_special_tokens else None


def check_trained_for(ckpt: Checkpoint, model: nn.Module, arch: ArchitectureSpec, ctx: EditContext) -> None:
    """Refuse a checkpoint whose edited weights, or whose base model's fingerprint, are not this model's."""
    config, where = ckpt.config, ckpt.directory
    params, shapes = config.get("params"), config.get("shapes")
    if not (
        isinstance(shapes, dict)
        and isinstance(params, list)
        and params
        and all(isinstance(p, str) and p in shapes for p in params)
    ):
        raise CheckpointError(f"{where}: config.json needs 'params' (a list of weight names) and their 'shapes'")
    for p, shape in shapes.items():
        try:
            actual = list(arch.weight(model, p).shape)
        except Exception as exc:  # noqa: BLE001 - any failure to find the weight means another model
            raise CheckpointError(f"{where}: trained for another model ({one_line(exc)})") from None
        if actual != shape:
            raise CheckpointError(f"{where}: trained for {p!r} of shape {shape!r}, this model's is {actual}")
    base = config.get("base_model", {})
    if not isinstance(base, dict) or not isinstance(base.get("fingerprint", ""), str):
        raise CheckpointError(f"{where}: config.json 'base_model' must be an object with a string 'fingerprint'")
    expected = base.get("fingerprint")
    if expected and ctx.model_fingerprint and expected != ctx.model_fingerprint:
        raise CheckpointError(
            f"{where}: trained for the model with fingerprint {expected!r} ({base.get('id')!r}), "
            f"this model's is {ctx.model_fingerprint} (weights and dtype must match); "
            "train a checkpoint for this model"
        )


def tensor_mismatch(expected: dict[str, list[int]], tensors: dict[str, torch.Tensor]) -> str | None:
    """The first difference between the tensors a config implies and those a checkpoint holds, if any."""
    for name in sorted(expected.keys() | tensors.keys()):
        if name not in tensors:
            return f"model.safetensors lacks tensor {name!r} (config.json implies shape {expected[name]})"
        if name not in expected:
            return f"model.safetensors holds tensor {name!r}, which config.json does not describe"
        if list(tensors[name].shape) != expected[name]:
            return f"tensor {name!r} has shape {list(tensors[name].shape)}, config.json implies {expected[name]}"
    return None


class TrainedEditorMethod(EditMethod):
    """Base of MEND and KE; subclasses set ``network_kind`` and implement :meth:`build_network`."""

    supports_batch = True
    supports_sequential = True
    requires_training = True
    edit_area = "FFN"
    kind = PatchKind.WEIGHT_DELTA
    preset_package = "kedit_mend"
    network_kind: ClassVar[str]

    # -- the network ------------------------------------------------------------------------------
    @abstractmethod
    def build_network(self, model: nn.Module, arch: ArchitectureSpec, hparams: Any) -> nn.Module:
        """An untrained editor network for ``model``'s weights at ``hparams.layers``."""

    @abstractmethod
    def network_from_config(self, config: dict[str, Any]) -> nn.Module:
        """The network described by a checkpoint's ``config.json``."""

    def config_mismatch(self, ckpt: Checkpoint, model: nn.Module) -> str | None:
        """Why ``ckpt`` cannot run on ``model`` (beyond the edited weights' shapes), or cannot describe its
        own tensors, if so; checked before the network is built from its config."""
        return None

    def edited_params(
        self, model: nn.Module, arch: ArchitectureSpec, hparams: Any
    ) -> tuple[list[str], dict[str, list[int]]]:
        params = [arch.mlp_out_param(layer) for layer in arch.check_layers(model, hparams.layers, "layers")]
        return params, {p: list(arch.weight(model, p).shape) for p in params}

    @functools.cached_property
    def _checkpoints(self) -> CheckpointCache:
        return CheckpointCache()

    def load_network(
        self, model: nn.Module, arch: ArchitectureSpec, hparams: Any, ctx: EditContext
    ) -> tuple[nn.Module, dict[str, Any]]:
        """The trained network (checked against ``model`` before anything runs) and its provenance."""
        path = resolve_checkpoint(hparams, ctx)
        if path is None:
            log.warning("%s: no trained checkpoint configured; using the untrained editor network", self.name)
            return self.build_network(model, arch, hparams), {"source": "untrained"}
        ckpt = self._checkpoints.read(path)
        kind = ckpt.config.get("kind")
        if kind != self.network_kind:
            raise CheckpointError(f"{path}: a {kind!r} checkpoint, not a {self.network_kind!r} editor")
        check_trained_for(ckpt, model, arch, ctx)
        problem = self.config_mismatch(ckpt, model)
        if problem:
            raise CheckpointError(f"{path}: {problem}")
        return self.checked_network(ckpt), {"source": str(path), "id": ckpt.id}

    def checked_network(self, ckpt: Checkpoint) -> nn.Module:
        """The network ``ckpt.config`` describes, holding ``ckpt.tensors``; config and tensors must agree."""
        try:
            with torch.device("meta"):  # shapes only: nothing is allocated for a config that is wrong
                expected = {k: list(v.shape) for k, v in self.network_from_config(ckpt.config).state_dict().items()}
        except Exception as exc:  # noqa: BLE001 - any failure to build from the config means a malformed config
            raise CheckpointError(
                f"{ckpt.directory}: config.json does not describe a {self.network_kind} network "
                f"({type(exc).__name__}: {one_line(exc)})"
            ) from None
        problem = tensor_mismatch(expected, ckpt.tensors)
        if problem:
            raise CheckpointError(f"{ckpt.directory}: {problem}")
        net = self.network_from_config(ckpt.config)
        net.load_state_dict(ckpt.tensors, strict=True)
        return net

    # -- editing ----------------------------------------------------------------------------------
    def compute_edit(
        self, model, tokenizer, requests: list[EditRequest], hparams: Any, arch: ArchitectureSpec, ctx: EditContext
    ) -> Edit:
        arch.check_layers(model, hparams.layers, "layers")
        net, source = self.load_network(model, arch, hparams, ctx)
        device = model_device(model)
        net = net.to(device).eval()
        enc = encode_pairs(tokenizer, [r.prompt for r in requests], [r.target_new for r in requests], device)
        factors = gradient_factors(model, enc, net.params, exclude_ids=excluded_ids(tokenizer, hparams))
        with torch.no_grad():
            updates = net.updates(factors, edit_embeds=edit_embeddings(model, enc))
        lowrank = {}
        for param, up in updates.items():
            dtype = get_parameter(model, param).dtype
            a = up.a.detach() * hparams.edit_scale
            lowrank[param] = arch.lowrank_to_param_layout(a.to(dtype), up.b.detach().to(dtype))
        return Edit(lowrank=lowrank, extra={"checkpoint": source})

    # -- training ---------------------------------------------------------------------------------
    def trainer(
        self,
        model,
        tokenizer,
        hparams: Any,
        arch: ArchitectureSpec,
        ctx: EditContext,
        *,
        train: list[EditRequest],
        val: list[EditRequest] | None,
        out_dir: Path,
    ) -> EditorTrainer:
        """The editor network's trainer; its checkpoint is what ``--checkpoint`` points to at edit time."""
        net = self.build_network(model, arch, hparams).to(model_device(model))
        return EditorTrainer(
            hparams,
            out_dir,
            train,
            val,
            model,
            tokenizer,
            arch,
            net,
            arch.check_layers(model, hparams.layers, "layers"),
            {"id": ctx.model_id, "fingerprint": ctx.model_fingerprint},
            progress=ctx.progress,
            cache_dir=Path(ctx.cache_dir) / "kedit_mend",
            exclude_ids=excluded_ids(tokenizer, hparams),
        )
