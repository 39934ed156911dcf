"""AlphaEdit on tiny random models: the projected update, the stream state, the null-space cache.

The tiny models' keys are small (mean eigenvalue of ``C`` ~4e-5 on LLaMA/Gemma, 3e-3 on GPT-2), so the
tests use a threshold relative to the mean eigenvalue and a small ``l2_weight``.
"""

from __future__ import annotations

import pytest
import torch

from kedit_core.architecture import resolve_architecture
from kedit_core.errors import HparamsError
from kedit_core.method import EditContext
from kedit_core.patch import Patch
from kedit_core.request import EditRequest
from kedit_core.testing import MethodConformance, temp_dir, tiny_model, tiny_requests
from kedit_rome.alphaedit import EDIT_KEYS, AlphaEdit
from kedit_rome.memit import MEMIT
from kedit_rome.ops.keys import compute_keys
from kedit_rome.ops.least_squares import null_space_least_squares
from kedit_rome.ops.null_space import NullSpaceRule, NullSpaces, null_space_projector

TINY_VALUE = {
    "v_num_grad_steps": 10,
    "v_lr": 1.0,
    "clamp_norm_factor": 1e6,
    "v_weight_decay": 0.0,
    "kl_factor": 0.0,
    "mom2_n_tokens": 400,
    "context_template_length_params": [],
}
NULL_SPACE = {"nullspace_threshold": 0.5, "nullspace_threshold_relative": True, "l2_weight": 1e-5}
ALPHAEDIT = {**TINY_VALUE, "layers": [2], **NULL_SPACE}
MEMIT_HP = {**TINY_VALUE, "layers": [2], "mom2_update_weight": 1.0}

# random tiny models pass little through attention: the subject's last token is the prompt's last
FIRST = [
    EditRequest(prompt="The capital of Italy is", subject="Italy is", target_new="Paris"),
    EditRequest(prompt="The Eiffel Tower is in", subject="Eiffel Tower is", target_new="Rome"),
]
SECOND = [
    EditRequest(prompt="Toyota is a company from", subject="Toyota is a company", target_new="Germany"),
    EditRequest(prompt="The mother tongue of Danielle is", subject="Danielle is", target_new="English"),
]


class TestAlphaEditConformance(MethodConformance):
    method_name = "alphaedit"
    hparams = {**TINY_VALUE, "layers": [1, 2], **NULL_SPACE, "v_num_grad_steps": 6}
    layer_hparams = ("layers",)


def _delta(patch: Patch, arch, layer: int) -> torch.Tensor:
    """The patch's update of ``layer``'s down-projection, ``[out, in]``, float64."""
    return arch.to_param_layout(patch.deltas()[arch.mlp_out_param(layer)].double())


def _without_keys(patch: Patch) -> Patch:
    """The patch's weight deltas alone (what a method that records no keys would have made)."""
    bare = Patch({k: v for k, v in patch.tensors.items() if not k.startswith("state/")}, dict(patch.metadata))
    bare.metadata["patch_id"] = bare.content_id()
    return bare


def _keys(model, tok, arch, requests, layer=2) -> torch.Tensor:
    return compute_keys(model, tok, arch, layer, [r.prompt for r in requests], [r.subject for r in requests]).double()


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_update_leaves_the_preserved_subspace_alone(family):
    """``Delta = Delta P``: keys in the span of C's large-eigenvalue directions (the preserved subspace,
    ``(I - P)``) get no change; MEMIT's update reaches into it. The edit is still written."""
    model, tok = tiny_model(family)
    arch = resolve_architecture(model)
    ctx = EditContext(cache_dir=temp_dir())
    alpha, memit = AlphaEdit(), MEMIT()
    hp = alpha.load_hparams(ALPHAEDIT)
    delta = _delta(alpha.compute_patch(model, tok, FIRST, hp, arch, ctx), arch, 2)
    baseline = _delta(memit.compute_patch(model, tok, FIRST, memit.load_hparams(MEMIT_HP), arch, ctx), arch, 2)
    rule = NullSpaceRule(hp.nullspace_threshold, hp.nullspace_threshold_relative)
    p = alpha.statistics.null_spaces_of(model, tok, arch, [2], hp, ctx, rule)[2]
    preserved = torch.eye(p.shape[0], dtype=p.dtype) - p
    c = alpha.statistics.second_moment(model, tok, arch, [2], hp, ctx)[2].double()
    k0 = preserved @ torch.linalg.cholesky(c + 1e-12 * torch.eye(c.shape[0], dtype=c.dtype))  # C's keys, preserved part
    assert (delta @ preserved).norm() < 1e-6 * delta.norm()
    assert (delta @ k0).norm() < 1e-4 * (baseline @ k0).norm()
    k1 = _keys(model, tok, arch, FIRST)
    assert (delta @ k1.T).norm() > 0.3 * (baseline @ k1.T).norm()


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_second_batch_leaves_the_first_batch_s_keys_alone(family):
    """In a stream, the update of batch 2 barely moves the outputs of batch 1's keys ``K_p`` (read from batch
    1's patch on the model); MEMIT's does, and so does AlphaEdit's when patch 1 is applied without its keys."""
    model, tok = tiny_model(family)
    arch = resolve_architecture(model)
    ctx = EditContext(cache_dir=temp_dir())
    k_p = _keys(model, tok, arch, FIRST)

    def disturbance(method, hp, strip_keys=False):
        first = method.compute_patch(model, tok, FIRST, hp, arch, ctx)
        with (_without_keys(first) if strip_keys else first).applied(model):
            second = _delta(method.compute_patch(model, tok, SECOND, hp, arch, ctx), arch, 2)
            k_2 = _keys(model, tok, arch, SECOND)
        return float((second @ k_p.T).norm() / (second @ k_2.T).norm())

    alpha = AlphaEdit()
    hp = alpha.load_hparams(ALPHAEDIT)
    with_keys = disturbance(alpha, hp)
    without_keys = disturbance(AlphaEdit(), hp, strip_keys=True)
    memit = disturbance(MEMIT(), MEMIT().load_hparams(MEMIT_HP))
    # measured: 0.003-0.06 with the keys, 0.65-0.90 without, 0.55-0.95 for MEMIT
    assert with_keys < 0.15 * without_keys and with_keys < 0.15 * memit


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_edits_lower_the_target_nll_as_much_as_memit_s(family):
    """The projection leaves the edit room: the batch's target NLLs fall, as far as MEMIT's (measured: the
    same to 0.03 nats; the tiny models' value optimization is what limits both)."""
    from kedit_core.evaluate import Evaluator

    model, tok = tiny_model(family)
    arch = resolve_architecture(model)
    requests = [
        EditRequest(prompt="The capital of Italy is", subject="Italy is", target_new="Paris"),
        EditRequest(prompt="Toyota is a company from", subject="a company from", target_new="Germany"),
        EditRequest(prompt="The Eiffel Tower is in", subject="Tower is in", target_new="Rome"),
    ]
    pairs = [(r.prompt, r.target_new) for r in requests]
    ev = Evaluator(model, tok)
    before = torch.tensor([s.mean_nll for s in ev.score_pairs(pairs)])
    after = {}
    for method, hp in ((AlphaEdit(), NULL_SPACE), (MEMIT(), {"mom2_update_weight": 1.0})):
        hp = method.load_hparams({**TINY_VALUE, "layers": [1, 2], "v_num_grad_steps": 25, **hp})
        patch = method.compute_patch(model, tok, requests, hp, arch, EditContext(cache_dir=temp_dir()))
        with patch.applied(model):
            after[method.name] = torch.tensor([s.mean_nll for s in ev.score_pairs(pairs)])
    assert bool((after["alphaedit"] < before - 0.05).all()), (before, after)
    assert torch.allclose(after["alphaedit"], after["memit"], atol=0.05), after


def test_patch_records_the_keys_it_wrote():
    model, tok = tiny_model("llama")
    arch = resolve_architecture(model)
    hp = AlphaEdit().load_hparams({**ALPHAEDIT, "layers": [1, 2]})
    patch = AlphaEdit().compute_patch(model, tok, FIRST, hp, arch, EditContext(cache_dir=temp_dir()))
    groups = patch.state_groups()
    assert sorted(groups) == [arch.layer_path(layer, arch.mlp_out) for layer in (1, 2)]
    k = groups[arch.layer_path(1, arch.mlp_out)][EDIT_KEYS]
    assert k.dtype == torch.float32 and torch.allclose(k.double(), _keys(model, tok, arch, FIRST, layer=1), atol=1e-6)
    assert patch.parameters() == [arch.mlp_out_param(1), arch.mlp_out_param(2)]


def test_a_resumed_stream_computes_the_same_patches(tmp_path):
    """The stream's ``K_p`` survives a resumed run: the Editor re-applies the saved patches, a fresh method
    instance reads their keys, and the next patch is bit for bit the uninterrupted run's."""
    from kedit_core.editor import Editor

    model, tok = tiny_model("gemma3")
    requests = FIRST + SECOND + tiny_requests()[:1]
    cache = tmp_path / "cache"

    def editor():
        return Editor(AlphaEdit(), model, tok, hparams=ALPHAEDIT, cache=cache)

    whole = editor().edit(requests, sequential=True, batch_size=2, evaluate=False)
    ids = [p.patch_id for p in whole.patches]
    assert [p.parent for p in whole.patches] == [None, *ids[:-1]]

    def stop_after_first(done, _result):
        if done == 2:
            raise KeyboardInterrupt

    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        editor().edit(
            requests, sequential=True, batch_size=2, evaluate=False, run_dir=run_dir, on_chunk=stop_after_first
        )
    resumed = editor().edit(requests, sequential=True, batch_size=2, evaluate=False, run_dir=run_dir)
    assert [p.patch_id for p in resumed.patches] == ids
    # the keys made the difference: with patch 1 on the model but not its keys, patch 2 is another update
    arch, param = resolve_architecture(model), resolve_architecture(model).mlp_out_param(2)
    with _without_keys(whole.patches[0]).applied(model):
        blind = AlphaEdit().compute_patch(
            model, tok, requests[2:4], AlphaEdit().load_hparams(ALPHAEDIT), arch, EditContext(cache_dir=cache)
        )
    assert not torch.allclose(blind.deltas()[param], whole.patches[1].deltas()[param], rtol=1e-3, atol=0)


def test_null_space_projector_is_cached_on_disk_and_in_memory(tmp_path):
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0]
    c = basis @ torch.diag(torch.tensor([1e-5, 1e-3, 0.02, 0.5, 1.0, 2.0], dtype=torch.float64)) @ basis.T
    file = tmp_path / "stats" / "layer.safetensors"
    spaces = NullSpaces()
    absolute = NullSpaceRule(1e-2)
    assert not spaces.ready(file, absolute)
    p = spaces.projector(file, absolute, c.float())
    assert spaces.eigh_path(file).is_file() and spaces.ready(file, absolute)
    assert spaces.projector(file, absolute) is p
    assert torch.allclose(p, p.T) and torch.allclose(p @ p, p, atol=1e-6)
    assert round(float(p.trace())) == 2 and float((p @ basis[:, :2]).norm()) == pytest.approx(2**0.5, rel=1e-5)
    # a new process: the eigendecomposition comes from disk, C is not needed
    again = NullSpaces().projector(file, absolute)
    assert torch.equal(again, p)
    # relative: threshold x mean eigenvalue (0.587): 0.1 -> 0.0587 -> three directions
    assert round(float(NullSpaces().projector(file, NullSpaceRule(0.1, relative=True)).trace())) == 3
    values, vectors = torch.linalg.eigh(c)
    assert round(float(null_space_projector(values, vectors.float(), NullSpaceRule(1e-6)).trace())) == 0


def test_null_space_least_squares_solves_the_projected_normal_equations():
    """``Delta (A P + lambda I) = R K^T P`` with ``A = K_p K_p^T + K K^T``, and ``Delta = Delta P``."""
    torch.manual_seed(0)
    d_in, d_out = 10, 6
    q = torch.linalg.qr(torch.randn(d_in, d_in, dtype=torch.float64))[0]
    p = q[:, :6] @ q[:, :6].T
    keys, resid, k_p = torch.randn(d_in, 3), torch.randn(d_out, 3), torch.randn(d_in, 4, dtype=torch.float64)
    a, b = null_space_least_squares(p, keys, resid, k_p @ k_p.T, weight=0.1)
    delta = a.double() @ b.double()
    k = keys.double()
    lhs = delta @ ((k_p @ k_p.T + k @ k.T) @ p + 0.1 * torch.eye(d_in, dtype=torch.float64))
    assert torch.allclose(lhs, resid.double() @ k.T @ p, atol=1e-5)
    assert torch.allclose(delta @ p, delta, atol=1e-5)


def test_an_empty_null_space_is_refused():
    model, tok = tiny_model("llama")
    hp = AlphaEdit().load_hparams({**ALPHAEDIT, "nullspace_threshold": 1e-9, "nullspace_threshold_relative": False})
    with pytest.raises(
        HparamsError, match=r"^hyperparameter 'nullspace_threshold': 1e-09 leaves no null space at layer 2"
    ):
        AlphaEdit().compute_patch(model, tok, FIRST, hp, resolve_architecture(model), EditContext(cache_dir=temp_dir()))
