"""SuffixForward and head_loss compute exactly what the full forward and autograd compute."""

from __future__ import annotations

import pytest
import torch

from kedit_core.architecture import resolve_architecture
from kedit_core.ops.logits import final_hidden, head_logits
from kedit_core.ops.tokens import encode_prompts
from kedit_core.testing import tiny_model
from kedit_rome.ops.head_loss import head_loss
from kedit_rome.ops.suffix import SuffixForward

TEXTS = [
    "The Eiffel Tower is located in the city of Paris, and this sentence is long enough to pass the sliding window",
    "Michael Jordan plays",
    "Hello there my friend, the capital of France is",
]


def _add_at(module, rows, cols, delta):
    return module.register_forward_hook(lambda m, a, out: out.index_put((rows, cols), out[rows, cols] + delta))


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_suffix_forward_matches_the_full_forward_and_its_gradient(family):
    model, tok = tiny_model(family, dtype=torch.float64)
    arch = resolve_architecture(model)
    ids, mask, lens = encode_prompts(tok, TEXTS)
    split = torch.tensor([5, 0, 7])  # 0: a row with no cached prefix at all
    rows, last = torch.arange(3), torch.tensor(lens) - 1
    site = arch.module(model, 2, arch.mlp_out)
    delta = torch.randn(3, model.config.hidden_size, dtype=torch.float64, requires_grad=True)
    handle = _add_at(site, rows, split, delta)
    try:
        full = final_hidden(model, ids, mask)
        (g_full,) = torch.autograd.grad(full[rows, last].pow(2).sum(), delta)
    finally:
        handle.remove()
    suffix = SuffixForward(model, arch, ids, mask, split, frozen_layers=2)  # before the hook: the prefix has no delta
    handle = _add_at(site, rows, torch.zeros(3, dtype=torch.long), delta)
    try:
        hidden = suffix()
        cols = suffix.columns(rows, last)
        (g_suffix,) = torch.autograd.grad(hidden[rows, cols].pow(2).sum(), delta)
    finally:
        handle.remove()
    for r in range(3):  # every suffix position, not just the last
        n = lens[r] - int(split[r])
        assert torch.allclose(hidden[r, :n], full[r, split[r] : lens[r]], atol=1e-10)
    assert torch.allclose(g_suffix, g_full, atol=1e-10)
    assert all("forward" not in vars(layer) for layer in arch.layer_list(model))
    sub = suffix.select(torch.tensor([2, 0]))
    with torch.no_grad():
        no_delta = final_hidden(model, ids, mask)
        part = sub()
    assert torch.allclose(part[0, : lens[2] - 7], no_delta[2, 7 : lens[2]], atol=1e-10)
    assert torch.allclose(part[1, : lens[0] - 5], no_delta[0, 5 : lens[0]], atol=1e-10)


class _Head(torch.nn.Module):
    def __init__(self, vocab, dim, cap, bias):
        super().__init__()
        self.lm = torch.nn.Linear(dim, vocab, bias=bias).double()
        self.lm.weight.data *= 3
        self.config = type("Config", (), {"final_logit_softcapping": cap})()
        self.requires_grad_(False)

    def get_output_embeddings(self):
        return self.lm


@pytest.mark.parametrize(("cap", "bias"), [(None, False), (5.0, True)])
def test_head_loss_matches_autograd(cap, bias):
    torch.manual_seed(0)
    model = _Head(1000, 16, cap, bias)
    hidden = torch.randn(6, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([3, 7, -1, 999, -1, 0])
    ref = torch.log_softmax(torch.randn(2, 1000, dtype=torch.float64), -1)
    weights = torch.randn(6, dtype=torch.float64)
    logp = torch.log_softmax(head_logits(model, hidden), -1)
    kl = torch.nn.functional.kl_div(logp[targets < 0], ref, log_target=True, reduction="none").sum(-1)
    expected = torch.zeros(6, dtype=torch.float64).index_put((targets < 0,), kl)
    keep = targets >= 0
    expected = expected.index_put((keep,), -logp[keep, targets[keep]])
    (g_expected,) = torch.autograd.grad((expected * weights).sum(), hidden)
    buffer = torch.zeros(5, 1000)
    buffer[[4, 1]] = ref.float()
    loss = head_loss(model, hidden, targets, buffer, torch.tensor([4, 1]), chunk=128)
    (g_loss,) = torch.autograd.grad((loss * weights).sum(), hidden)
    assert torch.allclose(loss.double(), expected, atol=1e-4)
    assert torch.allclose(g_loss, g_expected, atol=1e-4)
    # without a reference: KL rows give zero and hand back their log-probabilities
    recorded = torch.zeros(3, 1000)
    loss0 = head_loss(model, hidden, targets, recorded, torch.tensor([2, 0]), record=True, chunk=300)
    assert torch.equal(loss0[targets < 0], torch.zeros(2))
    assert torch.allclose(recorded[[2, 0]].double(), logp[targets < 0].detach(), atol=1e-4)
    assert torch.equal(recorded[1], torch.zeros(1000))


def test_head_loss_reports_whether_the_target_is_most_probable():
    torch.manual_seed(1)
    model = _Head(1000, 16, 5.0, True)
    hidden = torch.randn(5, 16, dtype=torch.float64)
    best = head_logits(model, hidden).argmax(-1)
    second = head_logits(model, hidden).topk(2, -1).indices[:, 1]
    targets = torch.stack([best[0], second[1], torch.tensor(-1), best[3], second[4]])
    top = torch.zeros(5, dtype=torch.bool)
    head_loss(model, hidden, targets, torch.zeros(1, 1000), record=True, chunk=128, top=top)
    assert top.tolist() == [True, False, False, True, False]  # the KL row is left as it was
