"""MEND and KE follow the one layer rule (ArchitectureSpec.check_layers): the packaged default presets'
``layers: [-1]`` is the last layer; an index past the end is refused, never wrapped round (issue 15)."""

import pytest

from kedit_core.architecture import resolve_architecture
from kedit_core.errors import HparamsError
from kedit_core.method import EditContext
from kedit_core.testing import tiny_model, tiny_requests
from kedit_mend.ke import KE
from kedit_mend.mend import MEND


@pytest.mark.parametrize("cls,extra", [(MEND, {"rank": 8}), (KE, {"lstm_hidden": 8, "cond_dim": 8, "head_hidden": 8})])
def test_minus_one_is_the_last_layer_and_four_is_refused(cls, extra, tmp_path):
    model, tok = tiny_model("gpt2")
    method, arch = cls(), resolve_architecture(model)
    ctx = EditContext(model_id="tiny", cache_dir=tmp_path)
    patch = method.compute_patch(
        model, tok, tiny_requests()[:1], method.load_hparams({"layers": [-1], **extra}), arch, ctx
    )
    assert patch.parameters() == ["transformer.h.3.mlp.c_proj.weight"]
    with pytest.raises(HparamsError, match=r"^hyperparameter 'layers': layer 4 is out of range .*\(valid: 0\.\.3"):
        method.compute_patch(model, tok, tiny_requests()[:1], method.load_hparams({"layers": [4], **extra}), arch, ctx)
