"""SERAC and IKE on the real Gemma 3 270M (small slices of the real data; the full benchmarks are in
kedit_serac/benchmarks/)."""

from __future__ import annotations

import pytest

from kedit_core.editor import Editor
from kedit_core.evaluate import Evaluator
from kedit_core.patch import Patch
from kedit_core.request import load_requests
from kedit_core.testing import state_fingerprint

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def zsre(shipped_data):
    return load_requests(shipped_data / "zsre.json", limit=5)


def test_serac_batch_of_edits_on_gemma(zsre, tmp_path):
    editor = Editor("serac", "gemma3-270m")  # no arguments: the preset and the packaged scope classifier
    model, tok = editor.model, editor.tokenizer
    before = state_fingerprint(model)
    result = editor.edit(zsre, batch_size=len(zsre))
    m = result.to_report()["metrics"]
    assert m["reliability"] >= 0.9 and m["generalization"] >= 0.8 and m["locality"] >= 0.9
    assert result.to_report()["metrics_pre"]["reliability"] < 0.6
    assert state_fingerprint(model) == before
    # the patch file alone routes generation too, and unwraps exactly
    patch = Patch.load(result.patches[0].save(tmp_path / "serac.kedit.safetensors"))
    ev = Evaluator(model, tok)
    req = zsre[0]
    prompts = [req.rephrase_prompts[0], req.locality[0].prompt]
    plain = ev.generate(prompts, max_new_tokens=6)
    with patch.applied(model, tokenizer=tok):
        edited = ev.generate(prompts, max_new_tokens=6)
    assert edited[0].strip().startswith(req.target_new.split()[0])
    assert edited[1] == plain[1]
    assert ev.generate(prompts, max_new_tokens=6) == plain


def test_ike_on_gemma_with_no_arguments(shipped_data):
    """The preset and the packaged demonstration pool: what ``kedit bench`` runs."""
    editor = Editor("ike", "gemma3-270m")
    reqs = load_requests(shipped_data / "counterfact.json", limit=1)
    before = state_fingerprint(editor.model)
    result = editor.edit(reqs)
    report = result.to_report()
    assert report["metrics"]["reliability"] >= 0.9
    assert report["metrics"]["efficacy_score"] == 1.0
    assert report["metrics_pre"]["reliability"] < 0.5
    # what the edited model says: the new answer, then the stop at the demonstrations' separator (no
    # "New Fact: ..." written on after it, which the degeneracy check used to flag)
    assert report["metrics"]["gen_reliability"] == 1.0 and report["metrics"]["degenerate"] == 0.0
    assert {"generalization", "locality", "neighborhood_score"} <= set(report["metrics"])
    assert result.patches[0].metadata["extra"]["pool"]["records"] == 2998
    assert state_fingerprint(editor.model) == before
