"""KN on the real Gemma 3 270M: one CounterFact edit end to end."""

from __future__ import annotations

import pytest
import torch

from kedit_core.editor import Editor
from kedit_core.ops.logits import logits_at
from kedit_core.ops.tokens import encode_pairs
from kedit_core.request import load_requests
from kedit_rome.kn import KN

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def record(shipped_data):
    return load_requests(shipped_data / "counterfact.json")[:1]


def test_kn_edit_on_gemma(gemma, record):
    model, tok, info = gemma
    preset = KN.presets()["gemma3-270m"]
    hp = KN.load_hparams(preset).updated(steps=5, prompt_prefixes=["", "Fact: "])
    editor = Editor(KN(), model, tok, hparams=hp, model_info=info)
    before = {n: p.clone() for n, p in model.named_parameters() if "mlp.down_proj" in n}
    result = editor.edit(record)
    report = result.to_report()
    patch = result.patches[0]
    assert patch.nbytes() < 64 * 1024  # rank one per touched layer
    neurons = patch.metadata["extra"]["kn"]["neurons"]
    assert neurons and all(0 <= layer < 18 and 0 <= i < 2048 for layer, i in neurons)
    assert set(report["metrics"]) >= {"reliability", "efficacy_score", "paraphrase_score", "neighborhood_score"}
    # the edit moves the new answer up on the edit prompt
    req = record[0]
    before_lp = _target_logprob(model, tok, req.prompt, req.target_new)
    with patch.applied(model):
        after_lp = _target_logprob(model, tok, req.prompt, req.target_new)
    assert after_lp > before_lp
    for n, p in model.named_parameters():
        if n in before:
            assert p.equal(before[n])


@torch.no_grad()
def _target_logprob(model, tok, prompt, target):
    enc = encode_pairs(tok, [prompt], [target])
    rows, cols = enc.target_positions()
    logp = torch.log_softmax(logits_at(model, enc.input_ids, enc.attention_mask, rows, cols).float(), -1)
    return float(logp.gather(1, enc.flat_targets()[:, None]).mean())
