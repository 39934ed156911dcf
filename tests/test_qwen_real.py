"""Every method family on the second real model, Qwen2.5-Coder 0.5B Instruct (LLaMA-style: RMSNorm before
each block, SwiGLU MLP, grouped-query attention, no BOS token, untied 152k-token output layer), each with
the model's preset: a few CounterFact / ZsRE records, the edit moves the model and is undone bit-exactly.

The full-size numbers are in ``benchmarks/results/conformance/qwen2.5-0.5b.json`` and the README; the
locate-then-edit methods use a small statistics sample here (damped), as on Gemma.
"""

from __future__ import annotations

import pytest

from kedit_core.editor import Editor
from kedit_core.evaluate import Evaluator
from kedit_core.patch import Patch
from kedit_core.request import load_requests
from kedit_core.testing import state_fingerprint

pytestmark = pytest.mark.real_model

#: nats of mean target log-probability KN must add on the edit prompt (record 0, steps 5)
KN_MIN_GAIN = 0.5
FAST_STATS = {"mom2_n_tokens": 6000, "context_template_length_params": [[10, 3]]}


@pytest.fixture(scope="module", autouse=True)
def installed_plugins():
    """The process-wide registry with the installed method plugins (the test session turns autoload off):
    editing and applying a patch both look the method up there."""
    from kedit_core.plugins import reset_registry

    yield reset_registry(autoload=True)
    reset_registry()


@pytest.fixture(scope="module")
def counterfact():
    return load_requests("counterfact", limit=3)


@pytest.fixture(scope="module")
def zsre():
    return load_requests("zsre", limit=5)


def _edit(name, qwen, requests, overrides=None, **kwargs):
    """Edit with ``name``'s qwen2.5-0.5b preset (plus ``overrides``); the model must come back unchanged."""
    model, tok, info = qwen
    editor = Editor(name, model, tok, model_info=info)
    method = editor.method
    assert editor.hparams == method.load_hparams(None, "qwen2.5-0.5b")
    if overrides:
        editor.hparams = method.load_hparams({**editor.hparams.to_dict(), **overrides})
    before = state_fingerprint(model)
    result = editor.edit(requests, **kwargs)
    assert state_fingerprint(model) == before
    return editor, result, result.to_report()


def test_rome_edits_qwen_and_the_patch_file_applies(qwen, counterfact, tmp_path):
    editor, result, report = _edit("rome", qwen, counterfact[:2], {**FAST_STATS, "mom2_damping": 0.05})
    assert report["metrics_pre"]["efficacy_score"] == 0.0 and report["metrics"]["efficacy_score"] == 1.0
    assert report["metrics"]["gen_reliability"] >= 0.5  # the edited model says the new answer
    patch = Patch.load(result.patches[0].save(tmp_path / "rome.kedit.safetensors"))
    assert set(patch.metadata["fingerprints"]) == {"model.layers.5.mlp.down_proj.weight"}
    ev, req = editor.evaluator(), counterfact[0]
    with patch.applied(editor.model):
        said = ev.generate([req.prompt], max_new_tokens=4)[0]
    assert said.strip().startswith(req.target_new)


def test_memit_batch_spreads_over_four_layers(qwen, counterfact):
    _, result, report = _edit("memit", qwen, counterfact, FAST_STATS, batch_size=3, generation=False)
    assert report["metrics"]["efficacy_score"] >= 2 / 3
    assert len(result.patches) == 1
    assert sorted(result.patches[0].deltas()) == [f"model.layers.{i}.mlp.down_proj.weight" for i in (3, 4, 5, 6)]


def test_mend_and_ke_with_their_qwen_checkpoints(qwen, zsre):
    for name in ("mend", "ke"):
        _, result, report = _edit(name, qwen, zsre[:4], generation=False)
        assert report["metrics_pre"]["reliability"] < 0.5
        assert report["metrics"]["reliability"] >= 0.75, name
        assert result.patches[0].metadata["extra"]["checkpoint"]["source"].endswith(f"{name}-qwen2.5-0.5b")


def test_serac_and_ike(qwen, zsre, counterfact):
    _, _, report = _edit("serac", qwen, zsre, batch_size=len(zsre), generation=False)
    assert report["metrics"]["reliability"] >= 0.9 and report["metrics"]["locality"] >= 0.9
    _, _, report = _edit("ike", qwen, counterfact[:1])
    assert report["metrics"]["efficacy_score"] == 1.0 and report["metrics"]["gen_reliability"] == 1.0


def test_grace_sequential_edits(qwen, zsre):
    _, _, report = _edit("grace", qwen, zsre, sequential=True, generation=False)
    assert report["metrics"]["reliability"] >= 0.95 and report["metrics"]["locality"] >= 0.95


def test_fine_tuning_and_kn(qwen, counterfact):
    _, _, report = _edit("ft-m", qwen, counterfact[:2], generation=False)
    assert report["metrics"]["reliability"] == 1.0
    _, result, report = _edit("kn", qwen, counterfact[:1], {"steps": 5}, generation=False)
    neurons = result.patches[0].metadata["extra"]["kn"]["neurons"]
    assert neurons and all(0 <= layer < 24 and 0 <= i < 4864 for layer, i in neurons)
    # the edit raises the new answer's log-probability on the edit prompt
    req, ev = counterfact[0], Evaluator(qwen[0], qwen[1])
    before = ev.score_pairs([(req.prompt, req.target_new)])[0].logprobs
    with result.patches[0].applied(qwen[0]):
        after = ev.score_pairs([(req.prompt, req.target_new)])[0].logprobs
    assert sum(after) / len(after) > sum(before) / len(before) + KN_MIN_GAIN, (before, after)
