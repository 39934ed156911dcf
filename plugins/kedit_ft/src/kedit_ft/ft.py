"""FT-L and FT-M: constrained fine-tuning of MLP output weights on the edit.

FT-L (ROME paper's baseline, Meng et al. 2022, Sec. 4): the loss is the log-probability of the
target tokens at the last prompt position, and the weight change is held in an L-infinity ball
(``norm_constraint``). FT-M (EasyEdit): teacher-forced cross-entropy masked to the target tokens.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from kedit_core.architecture import ArchitectureSpec, trainable_weights
from kedit_core.edit import Edit
from kedit_core.hparams import Hyperparams
from kedit_core.method import EditContext, EditMethod, PatchKind
from kedit_core.ops.logits import logits_at, model_device
from kedit_core.ops.tokens import encode_pairs, encode_prompts
from kedit_core.request import EditRequest


class FTHyperparams(Hyperparams):
    layers: list[int] = Field(default=[0], min_length=1)
    lr: float = Field(default=5e-4, gt=0)
    num_steps: int = Field(default=25, ge=1)
    #: L-infinity bound on each weight's change; null for none
    norm_constraint: float | None = Field(default=None, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    #: stop once the loss is below this
    early_stop_loss: float = Field(default=1e-2, ge=0)
    batch_size: int = Field(default=1, ge=1)
    objective: Literal["prompt_last", "target_new"] | None = None
    #: adam moves every entry by about ``lr`` per step; sgd moves along the (low-rank) gradient
    optimizer: Literal["adam", "sgd"] = "adam"


class _FineTune(EditMethod):
    hparams_class = FTHyperparams
    supports_batch = True
    supports_sequential = True
    edit_area = "FFN"
    kind = PatchKind.WEIGHT_DELTA
    preset_package = "kedit_ft"
    objective: ClassVar[str]

    def compute_edit(
        self,
        model,
        tokenizer,
        requests: list[EditRequest],
        hparams: FTHyperparams,
        arch: ArchitectureSpec,
        ctx: EditContext,
    ) -> Edit:
        names = [arch.mlp_out_param(layer) for layer in arch.check_layers(model, hparams.layers, "layers")]
        with trainable_weights(model, names) as params:  # restored bit-exactly on exit
            originals = [p.detach().clone() for p in params]
            self._train(model, tokenizer, requests, hparams, params, originals)
            return Edit(dense={n: (p.detach() - o).float() for n, p, o in zip(names, params, originals, strict=True)})

    def _train(self, model, tokenizer, requests, hparams, params, originals) -> None:
        device = model_device(model)
        if hparams.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=hparams.lr, weight_decay=hparams.weight_decay)
        else:
            opt = torch.optim.SGD(params, lr=hparams.lr, weight_decay=hparams.weight_decay)
        loss_fn = self._loss_fn(model, tokenizer, requests, device, hparams.objective or self.objective)
        with torch.enable_grad():
            for _ in range(hparams.num_steps):
                opt.zero_grad(set_to_none=True)
                loss = loss_fn()
                if loss.item() < hparams.early_stop_loss:
                    break
                loss.backward()
                opt.step()
                if hparams.norm_constraint is not None:
                    eps = hparams.norm_constraint
                    with torch.no_grad():
                        for p, o in zip(params, originals, strict=False):
                            p.copy_(torch.clamp(p, min=o - eps, max=o + eps))

    @staticmethod
    def _loss_fn(model, tokenizer, requests, device, objective: str) -> Any:
        prompts = [r.prompt for r in requests]
        targets = [r.target_new for r in requests]
        enc = encode_pairs(tokenizer, prompts, targets, device)
        if objective == "target_new":
            rows, cols = enc.target_positions()
            flat = enc.flat_targets().to(device)

            def masked_ce() -> torch.Tensor:
                logits = logits_at(model, enc.input_ids, enc.attention_mask, rows, cols)
                return torch.nn.functional.cross_entropy(logits.float(), flat)

            return masked_ce
        ids, mask, lens = encode_prompts(tokenizer, prompts, device)
        rows = torch.cat([torch.full((len(t),), i) for i, t in enumerate(enc.target_ids)])
        last = torch.tensor([lens[i] - 1 for i in rows.tolist()])
        flat = enc.flat_targets().to(device)
        counts = torch.tensor([len(enc.target_ids[i]) for i in rows.tolist()], dtype=torch.float32, device=device)

        def prompt_last() -> torch.Tensor:
            logp = torch.log_softmax(logits_at(model, ids, mask, rows, last).float(), -1)
            picked = logp.gather(1, flat[:, None])[:, 0]
            return -(picked / counts).sum() / len(requests)

        return prompt_last


class FTL(_FineTune):
    """FT-L: fine-tuning with an L-infinity constraint, loss at the last prompt token."""

    name = "ft-l"
    objective = "prompt_last"


class FTM(_FineTune):
    """FT-M: fine-tuning with the loss masked to the target tokens (teacher forcing)."""

    name = "ft-m"
    objective = "target_new"
