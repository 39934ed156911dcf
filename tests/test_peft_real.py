"""A ROME edit of the real Gemma 3 270M, exported as a peft LoRA adapter, gives the edited model's logits."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from kedit_core.editor import Editor
from kedit_core.export_peft import CONFIG, export_peft, import_peft
from kedit_core.request import load_requests
from kedit_core.testing import state_fingerprint

pytestmark = pytest.mark.real_model
peft = pytest.importorskip("peft", reason="the peft export needs the optional extra: pip install 'kedit-core[peft]'")

FAST_STATS = {"mom2_n_tokens": 6000, "context_template_length_params": [[10, 3]], "mom2_damping": 0.05}


def test_rome_patch_on_gemma_is_the_exported_adapter(gemma, shipped_data, tmp_path):
    from kedit_core.plugins import Registry

    pytest.importorskip("kedit_rome", reason="ROME comes from the kedit-rome plugin")
    model, tok, info = gemma
    editor = Editor(Registry(autoload=True).load().method("rome"), model, tok, model_info=info, cache=tmp_path)
    editor.hparams = editor.method.load_hparams({**editor.hparams.to_dict(), **FAST_STATS})
    record = load_requests(shipped_data / "counterfact.json")[0]
    patch = editor.compute_patch([record])
    report = export_peft([patch], tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / CONFIG).read_text())
    assert report.exact and config["r"] == config["lora_alpha"] == 1
    assert config["target_modules"] == [p.removesuffix(".weight") for p in patch.parameters()]
    assert import_peft(tmp_path / "adapter").patch_id == patch.patch_id

    enc = tok(
        [record.prompt, "Toyota is a company headquartered in", "The capital of Italy is"],
        return_tensors="pt",
        padding=True,
    )
    before = state_fingerprint(model)
    diffs = {}
    for dtype in (torch.float32, torch.bfloat16):
        m = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
        with torch.no_grad():
            base = m(**enc).logits.float()
            with patch.applied(m, check_fingerprint=dtype == torch.float32):  # fingerprints are of the float32 weights
                edited = m(**enc).logits.float()
            lora = peft.PeftModel.from_pretrained(copy.deepcopy(m) if m is model else m, str(tmp_path / "adapter"))
            adapted = lora(**enc).logits.float()
        diffs[dtype] = (
            (adapted - edited).abs().max().item(),
            (edited - base).abs().max().item(),
            edited.abs().max().item(),
        )
        del lora
        print(
            f"\nGemma 3 270M ROME {dtype}: max |logits(peft) - logits(kedit)| = {diffs[dtype][0]:.3g} (edit moves logits {diffs[dtype][1]:.3g}, logits up to {diffs[dtype][2]:.3g})"
        )
    assert state_fingerprint(model) == before
    # measured on CPU: float32 7.7e-5 (logits up to 34.5, the edit moves them by 18.7); bfloat16 1.22 (the
    # edit: 18.5) -- in bfloat16 kedit rounds W + delta to the weight's precision, peft adds B A x in float32
    diff, effect, scale = diffs[torch.float32]
    assert diff <= 1e-5 * scale and effect > 100 * diff
    diff, effect, scale = diffs[torch.bfloat16]
    assert diff <= 5e-2 * scale and diff <= effect / 10
