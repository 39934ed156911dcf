"""GradStep: one normalized gradient step on an MLP output matrix toward the new target.

A deliberately small but real editor: the gradient of the target's negative log-likelihood with
respect to ``W_out`` of one layer is a sum of rank-one terms; GradStep takes ``steps`` steps of
length ``step_norm`` (Frobenius) along it. Replace it with your algorithm.
"""

from __future__ import annotations

import torch
from pydantic import Field

from kedit_core.architecture import get_parameter
from kedit_core.edit import Edit
from kedit_core.hparams import Hyperparams
from kedit_core.method import EditMethod, PatchKind
from kedit_core.ops.logits import logits_at, model_device
from kedit_core.ops.tokens import encode_pairs


class GradStepHyperparams(Hyperparams):
    layer: int = 0
    step_norm: float = Field(default=1.0, gt=0)
    steps: int = Field(default=3, ge=1)


class GradStep(EditMethod):
    name = "grad-step"
    hparams_class = GradStepHyperparams
    supports_batch = True
    supports_sequential = True
    edit_area = "FFN"
    kind = PatchKind.WEIGHT_DELTA

    def compute_edit(self, model, tokenizer, requests, hparams: GradStepHyperparams, arch, ctx) -> Edit:
        """The weight change for ``requests``; kedit makes it a patch (provenance, fingerprints) and applies it."""
        name = arch.mlp_out_param(arch.check_layer(model, hparams.layer, "layer"))  # -1: the last layer
        param = get_parameter(model, name)
        original = param.detach().clone()
        enc = encode_pairs(
            tokenizer, [r.prompt for r in requests], [r.target_new for r in requests], model_device(model)
        )
        rows, cols = enc.target_positions()
        targets = enc.flat_targets().to(param.device)
        try:
            param.requires_grad_(True)
            with torch.enable_grad():
                for _ in range(hparams.steps):
                    loss = torch.nn.functional.cross_entropy(
                        logits_at(model, enc.input_ids, enc.attention_mask, rows, cols).float(), targets
                    )
                    (grad,) = torch.autograd.grad(loss, param)
                    with torch.no_grad():
                        param -= hparams.step_norm * grad / grad.norm().clamp_min(1e-12)
            delta = (param.detach() - original).float()
        finally:
            with torch.no_grad():
                param.copy_(original)
            param.requires_grad_(False)
        return Edit(dense={name: delta})
