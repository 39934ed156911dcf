"""ROME on both real models loaded in bfloat16 on the CPU: the value optimization and the solve run in
float32/float64, the patch is added to the bfloat16 weight, and leaving the patch restores that weight
bit-exactly (from the snapshot the handle keeps, not by subtracting the rounded delta)."""

from __future__ import annotations

import pytest
import torch

from kedit_core.editor import Editor
from kedit_core.models import load_model
from kedit_core.request import load_requests

pytestmark = pytest.mark.real_model

FAST = {"mom2_n_tokens": 6000, "mom2_damping": 0.05, "context_template_length_params": [[10, 3]]}


@pytest.fixture(scope="module", autouse=True)
def installed_plugins():
    """The process-wide registry with the installed method plugins (the test session turns autoload off):
    editing and applying a patch both look the method up there."""
    from kedit_core.plugins import reset_registry

    yield reset_registry(autoload=True)
    reset_registry()


@pytest.mark.parametrize("fixture", ["gemma", "qwen"])
def test_rome_edits_a_bfloat16_model(fixture, request):
    key = request.getfixturevalue(fixture)[2].id  # skips, with the reason, where the model is not installed
    model, tok, info = load_model(key, dtype="bfloat16")
    req = load_requests("counterfact", limit=1)
    editor = Editor("rome", model, tok, model_info=info)
    editor.hparams = editor.method.load_hparams({**editor.hparams.to_dict(), **FAST})
    (layer,) = editor.hparams.layers
    weight = editor.arch.module(model, layer, editor.arch.mlp_out).weight
    before = weight.detach().clone()
    result = editor.edit(req, generation=False)
    assert weight.dtype is torch.bfloat16 and torch.equal(weight, before)
    assert result.metrics("pre")["efficacy_score"] == 0.0 and result.metrics("post")["efficacy_score"] == 1.0
    patch = result.patches[0]
    with patch.applied(model):
        changed = weight.detach().clone()
        said = editor.evaluator().generate([req[0].prompt], max_new_tokens=3)[0]
    assert torch.equal(weight, before) and not torch.equal(changed, before)
    assert said.strip().startswith(req[0].target_new)
