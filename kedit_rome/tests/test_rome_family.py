"""Unit tests of ROME, MEMIT, PMET and the shared ops on tiny random models."""

from __future__ import annotations

import gzip
import time

import pytest
import torch

from kedit_core.architecture import resolve_architecture
from kedit_core.method import EditContext
from kedit_core.ops.logits import final_hidden
from kedit_core.ops.prefix import cached_prefix
from kedit_core.testing import MethodConformance, state_fingerprint, tiny_model, tiny_requests
from kedit_rome.ops.keys import compute_keys
from kedit_rome.ops.least_squares import Factorization, batched_least_squares, rank_one_update
from kedit_rome.ops.second_moment import SecondMoments, StatsSpec, compute_second_moments

TINY_VALUE = {
    "v_num_grad_steps": 6,
    "v_lr": 0.5,
    "clamp_norm_factor": 50.0,
    "mom2_n_tokens": 400,
    "context_template_length_params": [[4, 2]],
}


class TestROMEConformance(MethodConformance):
    method_name = "rome"
    hparams = {"layers": [1], **TINY_VALUE}
    layer_hparams = ("layers",)


class TestMEMITConformance(MethodConformance):
    method_name = "memit"
    hparams = {"layers": [1, 2], "mom2_update_weight": 100.0, **TINY_VALUE}
    layer_hparams = ("layers",)


class TestPMETConformance(MethodConformance):
    method_name = "pmet"
    hparams = {"layers": [1, 2], "mom2_update_weight": 100.0, **TINY_VALUE}
    layer_hparams = ("layers",)


def _corpus(tmp_path, lines=None):
    from kedit_core.testing import CORPUS

    path = tmp_path / "corpus.txt.gz"
    path.write_bytes(gzip.compress("\n".join(lines or CORPUS * 3).encode()))
    return path


@pytest.mark.parametrize("family", ["gpt2", "gemma3"])
def test_cached_prefix_gives_the_same_logits_and_gradients(family):
    model, tok = tiny_model(family)
    arch = resolve_architecture(model)
    enc = tok(["The Eiffel Tower is in", "Toyota is a company in"], return_tensors="pt", padding=True)
    site = arch.module(model, 2, arch.mlp_out)
    delta = torch.zeros(model.config.hidden_size, requires_grad=True)
    handle = site.register_forward_hook(lambda m, a, o: o + delta)
    try:
        full = final_hidden(model, enc["input_ids"], enc["attention_mask"])
        (g_full,) = torch.autograd.grad(full.pow(2).sum(), delta)
        with cached_prefix(model, arch, 2, enc["input_ids"], enc["attention_mask"]):
            cached = final_hidden(model, enc["input_ids"], enc["attention_mask"])
            (g_cached,) = torch.autograd.grad(cached.pow(2).sum(), delta)
    finally:
        handle.remove()
    assert torch.allclose(full, cached, atol=1e-5)
    assert torch.allclose(g_full, g_cached, rtol=1e-4, atol=1e-5)
    assert all("forward" not in vars(layer) for layer in arch.layer_list(model))


def test_second_moment_matches_direct_computation(tmp_path):
    model, tok = tiny_model("llama")
    arch = resolve_architecture(model)
    spec = StatsSpec("fp", _corpus(tmp_path), sample_tokens=10_000, max_length=32)
    stats = compute_second_moments(model, tok, arch, [1, 2], spec, progress=False)
    c, count = stats[1]
    assert c.shape == (64, 64) and torch.allclose(c, c.T, atol=1e-6)
    assert torch.linalg.eigvalsh(c.double()).min() > -1e-6
    from kedit_rome.ops.second_moment import _documents, read_corpus

    docs = _documents(tok, read_corpus(spec.corpus), 32, 10_000)
    assert count == sum(map(len, docs))
    keys = []
    hook = arch.module(model, 1, arch.mlp_out).register_forward_hook(lambda m, a, o: keys.append(a[0][0]))
    try:
        with torch.no_grad():
            for d in docs:
                model(torch.tensor([d]))
    finally:
        hook.remove()
    k = torch.cat(keys).double()
    assert torch.allclose(c.double(), k.T @ k / k.shape[0], rtol=1e-4, atol=1e-6)


def test_second_moment_is_cached_on_disk_and_reused(tmp_path):
    model, tok = tiny_model("gemma3")
    arch = resolve_architecture(model)
    spec = StatsSpec("fp1", _corpus(tmp_path), sample_tokens=500)
    first = SecondMoments().get(model, tok, arch, [1], spec, tmp_path / "cache", progress=False)[1]
    files = list((tmp_path / "cache" / "stats" / "fp1").iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"
    fresh = SecondMoments()  # a new process: reads the file, computes nothing
    fresh_model, _ = tiny_model("gemma3", seed=1)  # different weights: a recomputation would differ
    again = fresh.get(fresh_model, tok, arch, [1], spec, tmp_path / "cache", progress=False)[1]
    assert torch.equal(first, again)
    other = StatsSpec(
        "fp1", _corpus(tmp_path / "x" if (tmp_path / "x").mkdir() is None else tmp_path, ["Other text only."] * 20), 500
    )
    assert other.path(tmp_path, "m") != spec.path(tmp_path, "m")


def test_statistics_are_cached_per_model_fingerprint_layer_and_damping(tmp_path):
    """A method's :class:`Statistics` keeps C in memory and on disk under the model fingerprint, and
    factorizes each (C, damping) once; a new instance reads the files back, computing nothing."""
    from kedit_rome.common import Statistics
    from kedit_rome.rome import ROMEHyperparams

    model, tok = tiny_model("gpt2")
    other, _ = tiny_model("gpt2", seed=1)
    arch = resolve_architecture(model)
    hp = ROMEHyperparams(layers=[1], mom2_corpus=str(_corpus(tmp_path)), mom2_n_tokens=300)
    ctx_a = EditContext(model_fingerprint="fpA", cache_dir=tmp_path / "cache")
    ctx_b = EditContext(model_fingerprint="fpB", cache_dir=tmp_path / "cache")
    stats = Statistics()
    first = stats.factorization(model, tok, arch, 1, hp, ctx_a, 0.0)
    assert stats.factorization(model, tok, arch, 1, hp, ctx_a, 0.0) is first
    assert stats.factorization(model, tok, arch, 1, hp, ctx_a, 0.1) is not first
    c_a = stats.second_moment(model, tok, arch, [1], hp, ctx_a)[1]
    c_b = stats.second_moment(other, tok, arch, [1], hp, ctx_b)[1]
    assert not torch.equal(c_a, c_b)
    assert sorted(p.name for p in (tmp_path / "cache" / "stats").iterdir()) == ["fpA", "fpB"]
    assert torch.equal(Statistics().second_moment(other, tok, arch, [1], hp, ctx_a)[1], c_a)


def test_patch_provenance_is_the_registry_s():
    """Methods return an Edit; the core records which plugin made the patch, from the registry."""
    import importlib.metadata

    from kedit_core.plugins import Registry

    method = Registry(autoload=True).load().method("rome")
    model, tok = tiny_model("gpt2")
    hp = method.load_hparams({"layers": [1], **TINY_VALUE})
    patch = method.compute_patch(
        model, tok, tiny_requests()[:1], hp, resolve_architecture(model), EditContext(cache_dir=_tmp())
    )
    assert patch.metadata["plugin"] == "kedit-rome"
    assert patch.metadata["plugin_version"] == importlib.metadata.version("kedit-rome")


def test_rank_one_update_writes_the_value_and_spares_orthogonal_keys():
    torch.manual_seed(0)
    d_in, d_out = 16, 8
    k_other = torch.randn(200, d_in)
    c = k_other.T @ k_other / 200
    key, resid = torch.randn(d_in), torch.randn(d_out)
    a, b = rank_one_update(Factorization(c), key, resid)
    delta = a @ b
    assert torch.allclose(delta @ key, resid, atol=1e-4)
    u = torch.linalg.solve(c, key)
    ortho = torch.randn(d_in)
    ortho = ortho - (ortho @ u) / (key @ u) * key  # (C^-1 k*)^T x = 0
    assert (delta @ ortho).abs().max() < 1e-4


def test_batched_least_squares_solves_the_normal_equations():
    torch.manual_seed(0)
    c = torch.eye(12) * 0.5
    keys, resid = torch.randn(12, 5), torch.randn(7, 5)
    a, b = batched_least_squares(c, keys, resid, weight=2.0)
    delta = (a @ b).double()
    lhs = delta @ (2.0 * c.double() + keys.double() @ keys.double().T)
    assert torch.allclose(lhs, resid.double() @ keys.double().T, atol=1e-6)


def test_keys_average_the_templates():
    model, tok = tiny_model("llama")
    arch = resolve_architecture(model)
    req = tiny_requests()[0]
    both = compute_keys(model, tok, arch, 1, [req.prompt], [req.subject], ["{}", "Hello. {}"])
    one = compute_keys(model, tok, arch, 1, [req.prompt], [req.subject], ["{}"])
    two = compute_keys(model, tok, arch, 1, ["Hello. " + req.prompt], [req.subject], ["{}"])
    assert torch.allclose(both, (one + two) / 2, atol=1e-6)


def test_post_mlp_norm_inverse_adds_the_requested_residual():
    from kedit_rome.spread import residual_to_mlp_output

    model, _ = tiny_model("gemma3")
    arch = resolve_architecture(model)
    norm = arch.module(model, 1, arch.post_mlp_norm)
    with torch.no_grad():
        norm.weight.copy_(torch.randn_like(norm.weight) * 0.3)
    torch.manual_seed(0)
    m = torch.randn(3, 32)
    # a reachable target: the norm of some other MLP output
    target = norm(torch.randn(3, 32)).detach()
    r = target - norm(m).detach()
    m_new = m + residual_to_mlp_output(norm, m, r)
    assert torch.allclose(norm(m_new), target, atol=1e-4)


def test_rome_patch_is_rank_one_and_small():
    from kedit_rome.rome import ROME

    model, tok = tiny_model("gemma3")
    method = ROME()
    hp = method.load_hparams({"layers": [1], **TINY_VALUE})
    patch = method.compute_patch(
        model, tok, tiny_requests()[:1], hp, resolve_architecture(model), EditContext(cache_dir=_tmp())
    )
    names = sorted(patch.tensors)
    assert names == [f"lowrank/{resolve_architecture(model).mlp_out_param(1)}/{x}" for x in ("a", "b")]
    assert patch.tensors[names[0]].shape[1] == 1


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
@pytest.mark.parametrize("name", ["rome", "memit", "pmet"])
def test_edit_raises_the_target_probability(name, family):
    from kedit_core.evaluate import Evaluator
    from kedit_core.plugins import Registry

    method = Registry(autoload=True).load().method(name)
    from kedit_core.request import EditRequest

    model, tok = tiny_model(family)
    layers = [2] if name == "rome" else [1, 2]
    hp = method.load_hparams(
        {
            **TINY_VALUE,
            "layers": layers,
            "v_num_grad_steps": 25,
            "v_lr": 1.0,
            "clamp_norm_factor": 1e6,
            "v_weight_decay": 0.0,
            "kl_factor": 0.0,
            "context_template_length_params": [],
            **({} if name == "rome" else {"mom2_update_weight": 1.0}),
        }
    )
    # random tiny models pass little through attention: put the subject's last token last
    req = EditRequest(prompt="The capital of Italy is", subject="Italy is", target_new="Paris")
    ev = Evaluator(model, tok)
    before = ev.score_pairs([(req.prompt, req.target_new)])[0].mean_nll
    before_state = state_fingerprint(model)
    patch = method.compute_patch(model, tok, [req], hp, resolve_architecture(model), EditContext(cache_dir=_tmp()))
    assert state_fingerprint(model) == before_state
    with patch.applied(model):
        after = ev.score_pairs([(req.prompt, req.target_new)])[0].mean_nll
    assert after < before - 0.1


def test_context_templates_are_sampled_once_and_cached(tmp_path):
    from kedit_rome.ops.context_templates import context_templates

    model, tok = tiny_model("gpt2")
    t0 = time.perf_counter()
    first = context_templates(model, tok, "fp", tmp_path, [(3, 2)])
    assert first[0] == "{}" and len(first) == 3 and all(t.endswith(". {}") for t in first[1:])
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        assert context_templates(model, tok, "fp", tmp_path, [(3, 2)]) == first
    finally:
        handle.remove()
    assert not calls and time.perf_counter() - t0 >= 0


def _tmp():
    from kedit_core.testing import temp_dir

    return temp_dir()


@pytest.mark.parametrize("family", ["gpt2", "gemma3"])
def test_value_optimization_is_the_same_in_one_pass_or_many(family):
    """Rows run in several passes (gradients added up over the passes) give the one-pass result."""
    from kedit_rome.pmet import PMETHyperparams
    from kedit_rome.value import optimize_values

    model, tok = tiny_model(family, dtype=torch.float64)
    arch = resolve_architecture(model)
    sites = [arch.layer_path(2, arch.attn_out), arch.layer_path(2, arch.mlp_out)]
    templates = ["{}", "Hello there. {}", "I think. {}"]
    results = []
    for tokens in (10_000, 6):
        opts = PMETHyperparams(v_num_grad_steps=4, tokens_per_pass=tokens, early_stop_nll=0.0)
        results.append(optimize_values(model, tok, arch, tiny_requests(), templates, sites, 2, opts))
    one, many = results
    assert one.steps == many.steps == 4
    for a, b in zip(one.deltas + one.initial, many.deltas + many.initial, strict=True):
        assert a.abs().max() > 0
        assert torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-6)


def test_passes_hold_every_row_once_within_the_token_budget():
    """Rows are packed by suffix length into passes of at most ``tokens_per_pass`` padded tokens."""
    from kedit_rome.value import _first_chunks, build_batch, loss_rows

    model, tok = tiny_model("gpt2")
    arch = resolve_architecture(model)
    templates = ["{}", "Hello there. {}", "I think so, and more. {}"]
    reqs = tiny_requests()
    batch = build_batch(tok, reqs, templates, "cpu")
    loss = loss_rows(batch, len(reqs), len(templates), 0.1)
    suffix = batch.enc.attention_mask.long().sum(1) - batch.lookup
    for budget in (1, 8, 20, 10_000):
        chunks = _first_chunks(model, arch, batch, loss, 1, budget)
        rows = torch.cat([c.rows for c in chunks])
        assert sorted(rows.tolist()) == list(range(len(batch.owner)))
        for c in chunks:
            padded = len(c.rows) * int(suffix[c.rows].max())
            assert padded <= budget or len(c.rows) == 1
        if budget == 10_000:
            assert len(chunks) == 1
        # every loss entry is read by exactly one pass
        assert sorted(torch.cat([c.entries for c in chunks]).tolist()) == list(range(len(loss.row)))


def test_pmet_attention_clamp_moves_the_change_to_the_ffn():
    """A tighter clamp on the attention vector keeps it within its bound, so the FFN vector (the one PMET
    writes into the weights) carries the change: the attention vector's share of it falls.

    The FFN vector's own norm is no signal on a tiny random model: Adam moves each coordinate by about the
    learning rate whatever the other vector does, and the two runs' FFN norms were measured equal to seven
    digits (0.2344491 vs 0.2344492) -- a strict ``>`` between them was noise."""
    from kedit_rome.pmet import PMETHyperparams
    from kedit_rome.value import optimize_values_chunked

    model, tok = tiny_model("gemma3", dtype=torch.float64)
    arch = resolve_architecture(model)
    sites = [arch.layer_path(2, arch.attn_out), arch.layer_path(2, arch.mlp_out)]
    templates = ["{}", "Hello there. {}"]
    opts = PMETHyperparams(v_num_grad_steps=8, early_stop_nll=0.0, clamp_norm_factor=50.0)
    runs = []
    for clamps in (None, [0.05, 50.0]):
        runs.append(optimize_values_chunked(model, tok, arch, tiny_requests(), templates, sites, 2, opts, 100, clamps))
    same, tight = runs
    attn_norm = tight.initial[0].norm(dim=1)
    assert bool((tight.deltas[0].norm(dim=1) <= 0.05 * attn_norm * (1 + 1e-6)).all())

    def attention_share(run):
        attn, ffn = (float(d.norm(dim=1).mean()) for d in run.deltas)
        return attn / (attn + ffn)

    # measured 0.23 unclamped, 0.014 clamped; without the clamp doing its work the two shares are equal
    assert attention_share(tight) < 0.5 * attention_share(same)
    assert float(tight.deltas[1].norm(dim=1).mean()) == pytest.approx(
        float(same.deltas[1].norm(dim=1).mean()), rel=0.05
    )
    with pytest.raises(ValueError, match="clamp factors"):
        optimize_values_chunked(model, tok, arch, tiny_requests(), templates, sites, 2, opts, 100, [1.0])


def test_memit_batch_asking_one_prompt_for_two_targets_is_refused_before_any_work(tmp_path):
    from kedit_core.editor import Editor
    from kedit_core.errors import RequestError
    from kedit_rome.memit import MEMIT

    model, tok = tiny_model("gpt2")
    editor = Editor(MEMIT(), model, tok, hparams=TestMEMITConformance.hparams, cache=tmp_path)
    a = tiny_requests()[0]
    same_again = a.model_copy(update={"target_new": " Rome "})  # the same target: no conflict
    conflict = a.model_copy(update={"target_new": "Berlin", "subject": "Eiffel"})
    with pytest.raises(
        RequestError,
        match=r"^records 0 and 2 ask the same prompt .* for different targets "
        r"\('Rome' and 'Berlin'\) in one batch",
    ):
        editor.edit([a, same_again, conflict], batch_size=3)
    with pytest.raises(RequestError, match="^records 0 and 2 ask the same prompt"):
        editor.compute_patch([a, same_again, conflict])
    assert not any(tmp_path.iterdir())  # refused before statistics or templates were computed


def _logits_with(model, tok, arch, site, batch, deltas):
    """The logits of a value-optimization batch's rewriting rows, ``deltas`` added to the site's output at
    each row's subject token (a full forward, no cached prefix)."""
    from kedit_core.architecture import get_module

    rows = torch.arange(batch.n_rewrite)

    def add(_m, _a, out):
        out = out.clone()
        out[rows, batch.lookup[rows]] += deltas[batch.owner[rows]].to(out.dtype)
        return out

    handle = get_module(model, site).register_forward_hook(add)
    try:
        with torch.no_grad():
            ids, mask = batch.enc.input_ids[: batch.n_rewrite], batch.enc.attention_mask[: batch.n_rewrite]
            return model(input_ids=ids, attention_mask=mask).logits
    finally:
        handle.remove()


def _argmax_hits(model, tok, arch, site, requests, templates, deltas):
    """Per request: whether every target token is the argmax in every template, ``deltas`` added."""
    from kedit_rome.value import build_batch

    batch = build_batch(tok, requests, templates, "cpu")
    logits = _logits_with(model, tok, arch, site, batch, deltas)
    r, c = batch.enc.target_positions()
    keep = r < batch.n_rewrite
    hit = logits[r[keep], c[keep]].argmax(-1) == batch.enc.flat_targets()[keep]
    misses = torch.zeros(len(requests)).index_add_(0, batch.owner[r[keep]], (~hit).float())
    return (misses == 0).tolist()


def test_most_probable_early_stop_stops_each_request_once_greedy_says_its_target():
    """ENCORE's most-probable early stopping: a request stops at the first step whose delta makes every
    target token the argmax in every template, so its delta is no larger than the run that goes on
    driving the NLL down, and the stopped delta really does make the targets the argmax."""
    from kedit_core.request import EditRequest
    from kedit_rome.rome import ROMEHyperparams
    from kedit_rome.value import optimize_values

    model, tok = tiny_model("llama", dtype=torch.float64)
    arch = resolve_architecture(model)
    site = arch.layer_path(2, arch.mlp_out)
    templates = ["{}", "Hello there. {}"]
    # random tiny models pass little through attention: the subject's last token is the prompt's last
    reqs = [
        EditRequest(prompt="The capital of Italy is", subject="Italy is", target_new="Paris"),
        EditRequest(prompt="Michael Jordan plays", subject="Jordan plays", target_new="football"),
    ]
    base = {"v_num_grad_steps": 40, "v_lr": 0.2, "clamp_norm_factor": 1e6, "early_stop_nll": 0.0}
    base |= {"v_weight_decay": 0.0, "kl_factor": 0.0}
    full = optimize_values(model, tok, arch, reqs, templates, [site], 2, ROMEHyperparams(**base))
    opts = ROMEHyperparams(**base, early_stop_most_probable=True)
    mpes = optimize_values(model, tok, arch, reqs, templates, [site], 2, opts)
    assert _argmax_hits(model, tok, arch, site, reqs, templates, torch.zeros_like(mpes.deltas[0])) == [False, False]
    assert _argmax_hits(model, tok, arch, site, reqs, templates, mpes.deltas[0]) == [True, True]
    # measured: stopped at step 2 with |delta| 1.1 against 5.4 after 40 steps
    assert mpes.steps < full.steps == 40
    assert bool((mpes.deltas[0].norm(dim=1) < 0.5 * full.deltas[0].norm(dim=1)).all())


def test_continuation_kl_keeps_what_follows_the_target_as_it_was():
    """With the continuation KL, the next-token distribution after the target (in every rewriting prompt,
    and with ``continuation_tokens`` along the unedited model's own greedy continuation) stays much
    closer to the unedited model's than without it, and the target is still learned. A random tiny model
    passes little from the subject to later positions (KL ~2e-4 without the term), so the term's weight
    is large here; measured: 1.8e-4 without, 1.4e-5 with."""
    from kedit_core.request import EditRequest
    from kedit_rome.rome import ROMEHyperparams
    from kedit_rome.value import build_batch, continue_rows, optimize_values

    model, tok = tiny_model("llama", dtype=torch.float64)
    arch = resolve_architecture(model)
    site = arch.layer_path(0, arch.mlp_out)
    templates = ["{}", "Hello there. {}"]
    reqs = [EditRequest(prompt="The capital of Italy is", subject="Italy is", target_new="Paris")]
    base = {"v_num_grad_steps": 30, "v_lr": 0.2, "clamp_norm_factor": 1e6, "early_stop_nll": 0.0}
    base |= {"v_weight_decay": 0.0, "kl_factor": 0.0}
    span = 3
    batch = build_batch(tok, reqs, templates, "cpu")
    continue_rows(model, batch, span - 1)
    rows = torch.arange(batch.n_rewrite).repeat_interleave(span)
    cols = batch.target_last.repeat_interleave(span) + torch.arange(span).repeat(batch.n_rewrite)

    def kl_after_target(delta):
        logits = [_logits_with(model, tok, arch, site, batch, x)[rows, cols] for x in (torch.zeros_like(delta), delta)]
        p, q = (torch.log_softmax(x, -1) for x in logits)
        return float((p.exp() * (p - q)).sum(-1).mean())

    def run(c, tokens=1):
        opts = ROMEHyperparams(**base, continuation_kl_factor=c, continuation_tokens=tokens)
        return optimize_values(model, tok, arch, reqs, templates, [site], 0, opts).deltas[0]

    free, held, along = (kl_after_target(run(*args)) for args in ((0.0,), (1e4,), (1e4, span)))
    assert held < 0.5 * free
    assert along < 0.5 * free
    # the rows were continued with the unedited model's own greedy tokens
    for r in range(batch.n_rewrite):
        end = int(batch.target_last[r]) + 1
        greedy = model.generate(batch.enc.input_ids[r : r + 1, :end], max_new_tokens=span - 1, do_sample=False)
        assert batch.enc.input_ids[r, : end + span - 1].tolist() == greedy[0].tolist()
    assert _argmax_hits(model, tok, arch, site, reqs, templates, run(1e4, span)) == [True]


def test_early_stop_waits_for_the_continuation_kl_when_asked():
    """A request stops on its rewriting NLL alone by default; with ``early_stop_continuation_kl`` it
    keeps moving while the mean continuation KL is above the threshold (0 here: never below once the
    delta moves, so the run goes to the step limit); the stopping rule itself, case by case."""
    from kedit_core.request import EditRequest
    from kedit_rome.rome import ROMEHyperparams
    from kedit_rome.value import _done, optimize_values

    model, tok = tiny_model("llama", dtype=torch.float64)
    arch = resolve_architecture(model)
    site = arch.layer_path(2, arch.mlp_out)
    reqs = [EditRequest(prompt="The capital of Italy is", subject="Italy is", target_new="Paris")]
    # the tiny model's NLL of the target falls from 5.97 to ~5.30 over 30 steps: 5.35 is met around step 4
    base = {"v_num_grad_steps": 12, "v_lr": 0.2, "clamp_norm_factor": 1e6, "early_stop_nll": 5.35}
    base |= {"v_weight_decay": 0.0, "kl_factor": 0.0, "continuation_kl_factor": 1.0, "continuation_tokens": 2}

    def steps(**extra):
        opts = ROMEHyperparams(**base, **extra)
        return optimize_values(model, tok, arch, reqs, ["{}", "Hello there. {}"], [site], 2, opts).steps

    assert 1 < steps() < 12 == steps(early_stop_continuation_kl=0.0)

    opts = ROMEHyperparams(early_stop_nll=0.05, continuation_kl_factor=2.0, early_stop_continuation_kl=0.1)
    nll, missed, kl = torch.tensor([0.01, 0.01, 0.5, 0.01]), torch.zeros(4), torch.tensor([0.1, 0.4, 0.0, 0.2])
    # kl is weighted by the factor: mean KL 0.05, 0.2, 0.0, 0.1
    assert _done(opts, nll, missed, kl).tolist() == [True, False, False, True]
    assert _done(opts.model_copy(update={"early_stop_continuation_kl": None}), nll, missed, kl).tolist() == [
        True,
        True,
        False,
        True,
    ]
