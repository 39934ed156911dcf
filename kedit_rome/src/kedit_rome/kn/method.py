"""KN: Knowledge Neurons (Dai et al. 2022, "Knowledge Neurons in Pretrained Transformers", ACL).

Attribute the old fact to FFN neurons by integrated gradients over several prompts, keep the
neurons shared across prompts, and rewrite their value slots from the old answer to the new one.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from kedit_core.architecture import ArchitectureSpec, get_parameter
from kedit_core.edit import Edit
from kedit_core.errors import KeditError
from kedit_core.method import EditContext, EditMethod, PatchKind
from kedit_core.ops.logits import next_token_logits
from kedit_core.ops.tokens import split_prompt_target
from kedit_core.request import EditRequest

from .attribution import integrated_gradients, neuron_activations
from .hparams import KNHyperparams
from .neurons import shared_neurons
from .value_slots import rank_one_factors, value_slot_update

log = logging.getLogger(__name__)


class KN(EditMethod):
    """Knowledge Neurons: integrated-gradient attribution, then a value-slot update of the neurons."""

    name = "kn"
    hparams_class = KNHyperparams
    supports_batch = False
    supports_sequential = True
    edit_area = "FFN neurons"
    kind = PatchKind.WEIGHT_DELTA
    preset_package = "kedit_rome"

    def compute_edit(
        self,
        model: nn.Module,
        tokenizer: Any,
        requests: list[EditRequest],
        hparams: KNHyperparams,
        arch: ArchitectureSpec,
        ctx: EditContext,
    ) -> Edit:
        if len(requests) != 1:
            raise KeditError("method 'kn' edits one request at a time (no batch editing)")
        request = requests[0]
        if hparams.layers is None:
            layers = list(range(arch.num_layers(model)))
        else:
            layers = arch.check_layers(model, hparams.layers, "layers")
        neurons, info = locate_knowledge_neurons(model, tokenizer, request, hparams, arch, layers)
        _, new_ids = split_prompt_target(tokenizer, request.prompt, request.target_new)
        u = value_slot_update(model, info["old_token"], new_ids[0], hparams.erase_scale, hparams.insert_scale)
        lowrank: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for slot, layer in enumerate(layers):
            idx = [i for s, i in neurons if s == slot]
            if not idx:
                continue
            param = arch.mlp_out_param(layer)
            weight = arch.weight(model, param)
            signs = (
                [1.0 if info["activations"][slot][i] >= 0 else -1.0 for i in idx]
                if hparams.sign_by_activation
                else None
            )
            a, b = arch.lowrank_to_param_layout(*rank_one_factors(u.to(weight.device), idx, weight.shape[1], signs))
            dtype = get_parameter(model, param).dtype
            lowrank[param] = (a.to(dtype).clone(), b.to(dtype).clone())
        info.update(
            new_token=new_ids[0],
            neurons=[[layers[s], i] for s, i in neurons],
            neuron_activations=[info["activations"][s][i] for s, i in neurons],
        )
        del info["activations"]
        log.info("kn: %d knowledge neurons for %r: %s", len(neurons), request.prompt, info["neurons"][:10])
        return Edit(lowrank=lowrank, extra={"kn": info})


def attribution_prompts(request: EditRequest, hparams: KNHyperparams) -> list[str]:
    """The knowledge-expressing prompts of the fact: prefixed edit prompts (+ rephrases if asked)."""
    prompts = [prefix + request.prompt for prefix in hparams.prompt_prefixes]
    if hparams.use_rephrases:
        prompts += list(request.rephrase_prompts)
    return list(dict.fromkeys(prompts))


def locate_knowledge_neurons(
    model: nn.Module,
    tokenizer: Any,
    request: EditRequest,
    hparams: KNHyperparams,
    arch: ArchitectureSpec,
    layers: list[int],
) -> tuple[list[tuple[int, int]], dict[str, Any]]:
    """Knowledge neurons ``(slot in layers, index)`` of the request's old fact, and what was used."""
    attributions = []
    for prompt in attribution_prompts(request, hparams):
        ids, answer = _prompt_and_answer(model, tokenizer, prompt, request.ground_truth)
        attributions.append(
            integrated_gradients(model, arch, ids, answer, layers, hparams.steps, hparams.rows_per_pass)
        )
    edit_ids, old_token = _prompt_and_answer(model, tokenizer, request.prompt, request.ground_truth)
    activations = neuron_activations(model, arch, edit_ids, layers).tolist()
    neurons = shared_neurons(attributions, hparams.adaptive_threshold, hparams.share_threshold, hparams.max_neurons)
    return neurons, {"old_token": old_token, "n_prompts": len(attributions), "activations": activations}


@torch.no_grad()
def _prompt_and_answer(model: nn.Module, tokenizer: Any, prompt: str, answer: str | None) -> tuple[list[int], int]:
    """Prompt ids and the answer's first token (the model's greedy token when no answer is known)."""
    if answer is not None:
        ids, target = split_prompt_target(tokenizer, prompt, answer)
        return ids, target[0]
    ids = split_prompt_target(tokenizer, prompt, "x")[0]
    return ids, int(next_token_logits(model, ids).argmax(-1))
