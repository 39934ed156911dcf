"""MELO's router layer follows the one layer rule (ArchitectureSpec.check_layer): -1 is the last layer,
out of range is refused, never wrapped round (issue 15). Its LoRA layers and GRACE's layer are
checked by the conformance suite (layer_hparams)."""

import pytest
from helpers import TINY_HPARAMS

from kedit_core.architecture import resolve_architecture
from kedit_core.errors import HparamsError
from kedit_core.method import EditContext
from kedit_core.testing import tiny_model, tiny_requests
from kedit_grace.melo.method import MELO


def melo_patch(hparams, tmp_path):
    model, tok = tiny_model("llama")
    melo = MELO()
    hp = melo.load_hparams({**TINY_HPARAMS["melo"], **hparams})
    return melo.compute_patch(
        model,
        tok,
        tiny_requests()[:1],
        hp,
        resolve_architecture(model),
        EditContext(model_id="tiny", cache_dir=tmp_path),
    )


def test_router_layer_out_of_range_is_refused_not_wrapped(tmp_path):
    with pytest.raises(
        HparamsError,
        match=r"^hyperparameter 'router_layer': layer 6 is out of range for this "
        r"model's 4 layers \(valid: 0\.\.3",
    ):
        melo_patch({"router_layer": 6, "lora_layers": [6]}, tmp_path)


def test_negative_layers_count_from_the_end(tmp_path):
    patch = melo_patch({"router_layer": -2, "lora_layers": [-1, -2]}, tmp_path)
    assert patch.metadata["modules"] == ["model.layers.2.mlp.down_proj", "model.layers.3.mlp.down_proj"]
    assert patch.metadata["extra"]["router"] == "model.layers.2.self_attn"
