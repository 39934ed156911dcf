"""ROME, MEMIT and AlphaEdit on the real Gemma 3 270M, a handful of CounterFact records (CI, ~4 minutes).

The second moment is estimated from a small sample of the shipped corpus (fast, with damping);
the full-size statistics are exercised by ``benchmarks/``.
"""

from __future__ import annotations

import pytest
import torch

from kedit_core.editor import Editor
from kedit_core.patch import Patch
from kedit_core.request import load_requests
from kedit_core.testing import state_fingerprint

pytestmark = pytest.mark.real_model

FAST_STATS = {"mom2_n_tokens": 6000, "context_template_length_params": [[10, 3]]}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("kedit-rome-cache")


@pytest.fixture(scope="module")
def records(shipped_data):
    return load_requests(shipped_data / "counterfact.json")[:3]


def _editor(name, gemma, cache, **overrides):
    from kedit_core.plugins import Registry

    model, tok, info = gemma
    method = Registry(autoload=True).load().method(name)
    base = Editor(method, model, tok, model_info=info, cache=cache)
    extra = {**FAST_STATS, **({"mom2_damping": 0.05} if name == "rome" else {}), **overrides}
    base.hparams = base.method.load_hparams({**base.hparams.to_dict(), **extra})
    return base


def test_rome_edits_real_facts_with_a_small_reversible_patch(gemma, cache, records, tmp_path):
    editor = _editor("rome", gemma, cache)
    model = gemma[0]
    before = state_fingerprint(model)
    result = editor.edit(records)
    assert state_fingerprint(model) == before
    metrics = result.to_report()["metrics"]
    assert metrics["efficacy_score"] >= 2 / 3
    assert result.to_report()["metrics_pre"]["efficacy_score"] <= 1 / 3
    patch = result.patches[0]
    path = patch.save(tmp_path / "rome.kedit.safetensors")
    assert path.stat().st_size < 64 * 1024
    assert all(name.startswith("lowrank/") for name in Patch.load(path).tensors)
    loaded = Patch.load(path)
    prompt = records[0].prompt
    enc = editor.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        base_logits = model(**enc).logits[0, -1]
    with loaded.applied(model):  # kedit-core alone applies it
        with torch.no_grad():
            edited = model(**enc).logits[0, -1]
        assert not torch.equal(edited, base_logits)
    assert state_fingerprint(model) == before


def test_memit_batch_edits_real_facts(gemma, cache, records):
    editor = _editor("memit", gemma, cache)
    result = editor.edit(records, batch_size=len(records))
    assert len(result.patches) == 1 and len(result.patches[0].metadata["requests"]) == len(records)
    report = result.to_report()
    assert report["metrics"]["efficacy_score"] >= 2 / 3
    assert report["metrics"]["neighborhood_score"] >= 0.5
    deltas = result.patches[0].deltas()
    weights = {p: editor.arch.weight(gemma[0], p) for p in deltas}
    # the post-MLP-norm trap: updates stay small against the weights they change
    for p, d in deltas.items():
        assert d.norm() < weights[p].norm()


def test_alphaedit_batch_edits_real_facts_inside_the_null_space(gemma, cache, records):
    from kedit_core.method import EditContext
    from kedit_rome.ops.null_space import NullSpaceRule

    editor = _editor("alphaedit", gemma, cache)
    result = editor.edit(records, batch_size=len(records))
    assert result.to_report()["metrics"]["efficacy_score"] >= 2 / 3
    hp, arch, patch = editor.hparams, editor.arch, result.patches[0]
    (layer,) = hp.layers
    assert patch.state_groups()[arch.layer_path(layer, arch.mlp_out)]["edit_keys"].shape[0] == len(records)
    rule = NullSpaceRule(hp.nullspace_threshold, hp.nullspace_threshold_relative)
    ctx = EditContext(model_fingerprint=gemma[2].fingerprint, cache_dir=cache)  # the editor's statistics
    p = editor.method.statistics.null_spaces_of(gemma[0], gemma[1], arch, [layer], hp, ctx, rule)[layer]
    delta = arch.to_param_layout(patch.deltas()[arch.mlp_out_param(layer)].double())
    assert (delta - delta @ p).norm() < 1e-5 * delta.norm()  # nothing in the preserved subspace
