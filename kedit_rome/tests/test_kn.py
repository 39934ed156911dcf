"""KN on tiny random models: integrated gradients, neuron refinement, the value-slot patch."""

from __future__ import annotations

import pytest
import torch

from kedit_core.architecture import get_parameter, resolve_architecture
from kedit_core.method import EditContext
from kedit_core.ops.logits import final_hidden, head_logits
from kedit_core.ops.tokens import split_prompt_target
from kedit_core.testing import FAMILIES, MethodConformance, tiny_model, tiny_requests
from kedit_rome.kn import (
    KN,
    KNHyperparams,
    attribution_prompts,
    coarse_neurons,
    integrated_gradients,
    neuron_activations,
    shared_neurons,
)

PROMPT = "The Eiffel Tower is located in the city of"


class TestKNConformance(MethodConformance):
    method_name = "kn"
    hparams = {"steps": 4, "prompt_prefixes": ["", "Fact: "]}
    layer_hparams = ("layers",)


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    return tiny_model(request.param)


def _prob(model, ids, answer, layer=None, arch=None, scale=None):
    """P(answer) with the layer's down-projection input at the last position scaled by ``scale``."""
    handle = None
    if layer is not None:

        def hook(module, inputs):
            h = inputs[0].clone()
            h[:, -1] = h[:, -1] * scale
            return (h,)

        handle = arch.module(model, layer, arch.mlp_out).register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            x = torch.tensor(ids)[None]
            return torch.softmax(head_logits(model, final_hidden(model, x, torch.ones_like(x))[:, -1]).float(), -1)[
                0, answer
            ]
    finally:
        if handle is not None:
            handle.remove()


def test_integrated_gradients_are_complete(tiny):
    """IG's completeness: a layer's attributions sum to P(w_bar) - P(0) (Eq. 2, with many steps)."""
    model, tok = tiny
    arch = resolve_architecture(model)
    ids = tok(PROMPT)["input_ids"]
    answer = split_prompt_target(tok, PROMPT, "Paris")[1][0]
    attr = integrated_gradients(model, arch, ids, answer, [1, 2], steps=200, rows_per_pass=250)
    for slot, layer in enumerate([1, 2]):
        gap = _prob(model, ids, answer) - _prob(model, ids, answer, layer, arch, 0.0)
        assert float(attr[slot].sum()) == pytest.approx(float(gap), rel=0.02, abs=1e-6)


def test_batched_attribution_matches_one_layer_at_a_time(tiny):
    model, tok = tiny
    arch = resolve_architecture(model)
    ids = tok(PROMPT)["input_ids"]
    together = integrated_gradients(model, arch, ids, 7, [0, 1, 2, 3], steps=5, rows_per_pass=100)
    alone = torch.cat(
        [integrated_gradients(model, arch, ids, 7, [layer], steps=5, rows_per_pass=5) for layer in range(4)]
    )
    assert torch.allclose(together, alone, rtol=1e-4, atol=1e-9)
    base = neuron_activations(model, arch, ids, [0, 1, 2, 3])
    assert together.shape == base.shape == (4, arch.weight(model, arch.mlp_out_param(0)).shape[1])


def test_coarse_and_shared_neurons():
    a = torch.tensor([[0.0, 1.0, 0.3], [0.05, 0.1, 0.5]])
    b = torch.tensor([[0.0, 0.9, 0.0], [0.0, 0.0, 1.0]])
    c = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert coarse_neurons(a, 0.2).tolist() == [[False, True, True], [False, False, True]]
    assert not coarse_neurons(-a, 0.2).any()
    # (0, 1) is coarse in 3/3 prompts, (1, 2) in 2/3, (0, 2) in 1/3
    assert shared_neurons([a, b, c], 0.2, 0.6) == [(0, 1), (1, 2)]
    assert shared_neurons([a, b, c], 0.2, 1.0) == [(0, 1)]
    assert shared_neurons([a, b, c], 0.2, 0.3, max_neurons=1) == [(0, 1)]
    # nothing shared: the top summed attribution is kept
    assert shared_neurons([torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])], 0.5, 1.0) == [(0, 1)]


def test_attribution_prompts():
    req = tiny_requests()[0]
    hp = KNHyperparams(prompt_prefixes=["", "Fact: "])
    assert attribution_prompts(req, hp) == [req.prompt, "Fact: " + req.prompt]
    assert attribution_prompts(req, hp.updated(use_rephrases=True))[-1] == req.rephrase_prompts[0]


def test_patch_is_the_value_slot_update(tiny):
    """Each selected neuron's value slot moves by lambda_2 e(new) - lambda_1 e(old); nothing else moves."""
    model, tok = tiny
    arch = resolve_architecture(model)
    req = tiny_requests()[0]
    hp = KNHyperparams(steps=4, prompt_prefixes=["", "Fact: "], erase_scale=1.5, insert_scale=3.0)
    patch = KN().compute_patch(model, tok, [req], hp, arch, EditContext())
    info = patch.metadata["extra"]["kn"]
    emb = model.get_output_embeddings().weight
    u = 3.0 * emb[info["new_token"]] - 1.5 * emb[info["old_token"]]
    assert info["neurons"] and all(k.startswith("lowrank/") for k in patch.tensors)
    before = {n: arch.weight(model, n).clone() for n in patch.deltas()}
    with patch.applied(model):
        for name, w0 in before.items():
            layer = next(i for i in range(arch.num_layers(model)) if arch.mlp_out_param(i) == name)
            chosen = {
                i: act
                for (lay, i), act in zip(info["neurons"], info["neuron_activations"], strict=True)
                if lay == layer
            }
            diff = arch.weight(model, name) - w0
            changed = sorted(diff.abs().sum(0).nonzero().flatten().tolist())
            assert changed == sorted(chosen)
            for i, act in chosen.items():  # oriented by the sign of the neuron's activation
                assert torch.allclose(diff[:, i], u if act >= 0 else -u, atol=1e-5)
    for name, w0 in before.items():
        assert torch.equal(arch.weight(model, name), w0)


def test_edit_raises_the_new_answer_on_a_tiny_model(tiny):
    model, tok = tiny
    arch = resolve_architecture(model)
    req = tiny_requests()[0]
    ids, new = split_prompt_target(tok, req.prompt, req.target_new)
    hp = KNHyperparams(steps=4, prompt_prefixes=["", "Fact: "], insert_scale=20.0)
    patch = KN().compute_patch(model, tok, [req], hp, arch, EditContext())
    p0 = _prob(model, ids, new[0])
    with patch.applied(model):
        p1 = _prob(model, ids, new[0])
    assert p1 > p0


def test_layers_restrict_the_search(tiny):
    model, tok = tiny
    arch = resolve_architecture(model)
    hp = KNHyperparams(layers=[2], steps=3, prompt_prefixes=[""])
    patch = KN().compute_patch(model, tok, tiny_requests()[:1], hp, arch, EditContext())
    assert set(patch.deltas()) == {arch.mlp_out_param(2)}
    literal = KN().compute_patch(
        model, tok, tiny_requests()[:1], hp.updated(sign_by_activation=False), arch, EditContext()
    )
    assert (
        literal.deltas()[arch.mlp_out_param(2)].abs() - patch.deltas()[arch.mlp_out_param(2)].abs()
    ).abs().max() < 1e-6
    assert get_parameter(model, arch.mlp_out_param(2)).shape == patch.deltas()[arch.mlp_out_param(2)].shape


def test_prefix_cache_gives_the_same_attributions(tiny, monkeypatch):
    """Running only the last token over a cached prefix is exact (a causal model)."""
    from kedit_rome.kn import attribution

    model, tok = tiny
    arch = resolve_architecture(model)
    ids = tok(PROMPT)["input_ids"]
    cached = integrated_gradients(model, arch, ids, 9, [0, 3], steps=4)
    monkeypatch.setattr(attribution, "prefix_cache", lambda *args: None)
    full = integrated_gradients(model, arch, ids, 9, [0, 3], steps=4)
    assert torch.allclose(cached, full, rtol=1e-4, atol=1e-10)
