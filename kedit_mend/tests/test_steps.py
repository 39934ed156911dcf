"""The algorithm steps on tiny models: gradient factors, the layer-skipping forward, the edited
forward, the gradient network and the KE hyper-network."""

from __future__ import annotations

import pytest
import torch

from kedit_core.architecture import resolve_architecture
from kedit_core.method import EditContext
from kedit_core.ops.logits import final_hidden
from kedit_core.ops.tokens import encode_pairs
from kedit_core.testing import tiny_model, tiny_requests
from kedit_mend.forward import LowRankUpdate, capture_layer_input, edited_forward, start_from_layer
from kedit_mend.gradient_factors import gradient_factors, target_nll
from kedit_mend.gradient_network import MENDNetwork, RunningNorm
from kedit_mend.hypernetwork import KENetwork
from kedit_mend.ke import KE
from kedit_mend.mend import MEND

PAIRS = [("The Eiffel Tower is located in the city of", "Rome"), ("Toyota is a company headquartered in", "Japan Inc")]


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_gradient_factors_sum_to_the_autograd_gradient(family):
    model, tok = tiny_model(family)
    arch = resolve_architecture(model)
    enc = encode_pairs(tok, [p for p, _ in PAIRS], [t for _, t in PAIRS])
    param = arch.mlp_out_param(1)
    factors = gradient_factors(model, enc, [param])[param]
    weight = model.get_parameter(param)
    weight.requires_grad_(True)
    try:
        loss = target_nll(model, final_hidden(model, enc.input_ids, enc.attention_mask), enc).sum()
        (grad,) = torch.autograd.grad(loss, weight)
    finally:
        weight.requires_grad_(False)
    grad = grad.T if arch.weight_layout == "conv1d" else grad
    assert torch.allclose(factors.dense(), grad, atol=1e-6)
    assert set(factors.owner.tolist()) == {0, 1}


@pytest.mark.parametrize("family", ["gpt2", "gemma3"])
def test_starting_from_cached_hidden_states_equals_the_full_forward(family):
    model, tok = tiny_model(family)
    arch = resolve_architecture(model)
    enc = encode_pairs(tok, [p for p, _ in PAIRS], [t for _, t in PAIRS])
    with capture_layer_input(model, arch, 2) as seen:
        full = final_hidden(model, enc.input_ids, enc.attention_mask)
    with start_from_layer(model, arch, 2, seen[0]):
        tail = final_hidden(model, enc.input_ids, enc.attention_mask)
    mask = enc.attention_mask.bool()
    assert torch.allclose(full[mask], tail[mask])
    assert all("forward" not in layer.__dict__ for layer in arch.layer_list(model))


def test_edited_forward_equals_adding_the_delta_to_the_weight():
    model, tok = tiny_model("llama")
    arch = resolve_architecture(model)
    param = arch.mlp_out_param(3)
    weight = arch.weight(model, param)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(weight.shape[0], 3, generator=gen), torch.randn(3, weight.shape[1], generator=gen) * 0.1
    enc = encode_pairs(tok, [p for p, _ in PAIRS], [t for _, t in PAIRS])
    # row 0 gets the update (group 0), row 1 belongs to group 1, which has none
    with edited_forward(model, {param: LowRankUpdate(a, b, torch.zeros(3, dtype=torch.long))}, torch.tensor([0, 1])):
        hooked = final_hidden(model, enc.input_ids, enc.attention_mask)
    plain = final_hidden(model, enc.input_ids, enc.attention_mask)
    with torch.no_grad():
        weight.add_(a @ b)
        try:
            direct = final_hidden(model, enc.input_ids, enc.attention_mask)
        finally:
            weight.sub_(a @ b)
    assert torch.allclose(hooked[0], direct[0], atol=1e-5)
    assert torch.equal(hooked[1], plain[1])


def test_running_norm_matches_batch_statistics():
    x = torch.randn(50, 6) * 3 + 1
    norm = RunningNorm(6)
    for chunk in x.split(7):
        norm.update(chunk)
    assert torch.allclose(norm.mean, x.mean(0), atol=1e-5)
    assert torch.allclose(norm(x).std(0), torch.ones(6), atol=1e-3)


def test_untrained_gradient_network_is_a_normalized_gradient_step():
    """g = identity at init, so Δ = -η Σ δ uᵀ = -η ∇W (no statistics yet: no normalization)."""
    model, tok = tiny_model("llama")
    arch = resolve_architecture(model)
    param = arch.mlp_out_param(2)
    net = MENDNetwork([param], {param: list(arch.weight(model, param).shape)}, rank=4, edit_lr=0.5)
    enc = encode_pairs(tok, [PAIRS[0][0]], [PAIRS[0][1]])
    factors = gradient_factors(model, enc, [param])
    up = net.updates(factors)[param]
    assert torch.allclose(up.a @ up.b, -0.5 * factors[param].dense(), atol=1e-6)


def test_ke_update_is_a_gated_rescaled_gradient():
    model, tok = tiny_model("llama")
    arch = resolve_architecture(model)
    param = arch.mlp_out_param(2)
    shape = list(arch.weight(model, param).shape)
    net = KENetwork([param], {param: shape}, embed_dim=32, lstm_hidden=8, cond_dim=8, head_hidden=8, edit_lr=1.0)
    enc = encode_pairs(tok, [PAIRS[0][0]], [PAIRS[0][1]])
    factors = gradient_factors(model, enc, [param])
    embeds = [model.get_input_embeddings()(enc.input_ids[0]).detach()]
    delta = net.updates(factors, edit_embeds=embeds)[param]
    ar, ac, br, bc, gate = net.heads[0](net.conditioner(embeds))
    alpha_hat, beta_hat = ar[0][:, None] * ac[0][None, :], br[0][:, None] * bc[0][None, :]
    expected = -gate[0] * (alpha_hat * factors[param].dense() + beta_hat)
    assert torch.allclose(delta.a @ delta.b, expected, atol=1e-5)
    assert 0 < float(gate[0].detach()) < 1


def test_a_batch_of_edits_sums_their_gradient_terms(tmp_path):
    model, tok = tiny_model("gemma3")
    arch = resolve_architecture(model)
    method = MEND()
    hp = method.load_hparams({"layers": [2, 3], "rank": 4})
    ctx = EditContext(cache_dir=tmp_path)
    reqs = tiny_requests()
    joint = method.compute_patch(model, tok, reqs, hp, arch, ctx).deltas()
    single = [method.compute_patch(model, tok, [r], hp, arch, ctx).deltas() for r in reqs]
    for name, delta in joint.items():
        assert torch.allclose(delta, single[0][name] + single[1][name], atol=1e-5)


@pytest.mark.parametrize("method_cls", [MEND, KE])
def test_edit_scale_multiplies_the_update(tmp_path, method_cls):
    model, tok = tiny_model("llama")
    arch = resolve_architecture(model)
    method = method_cls()
    ctx = EditContext(cache_dir=tmp_path)
    req = tiny_requests()[:1]
    full = method.compute_patch(model, tok, req, method.load_hparams({"layers": [1]}), arch, ctx).deltas()
    hp = method.load_hparams({"layers": [1], "edit_scale": 0.125})
    scaled = method.compute_patch(model, tok, req, hp, arch, ctx).deltas()
    assert full.keys() == scaled.keys()
    for name, delta in full.items():
        assert delta.abs().max() > 0
        assert torch.allclose(scaled[name], 0.125 * delta, atol=1e-6, rtol=1e-4)
