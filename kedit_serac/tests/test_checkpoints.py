"""SERAC's scope-classifier checkpoint: the id recorded in patches covers the config (the demonstrations
shape the counterfactual contexts) and the tensors, and a malformed checkpoint is one
:class:`CheckpointError` line raised before the model is touched. The cases are
copies of the shipped checkpoint (590 kB), changed in the test."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load

import kedit_core.trainer as trainer_module
from kedit_core.architecture import resolve_architecture
from kedit_core.errors import CheckpointError
from kedit_core.method import EditContext
from kedit_core.testing import state_fingerprint, tiny_model, tiny_requests
from kedit_core.trainer import CONFIG_FILE, MODEL_FILE, save_tensors
from kedit_serac.serac import SERAC, checkpoint_dir

SHIPPED = checkpoint_dir(EditContext())


@pytest.fixture
def ckpt(tmp_path) -> Path:
    return Path(shutil.copytree(SHIPPED, tmp_path / "ckpt"))


def edit(method, model, tok, ckpt: Path):
    return method.compute_patch(
        model,
        tok,
        tiny_requests()[:1],
        method.load_hparams({}),
        resolve_architecture(model),
        EditContext(checkpoint=ckpt),
    )


def change_config(ckpt: Path, change) -> None:
    meta = json.loads((ckpt / CONFIG_FILE).read_text())
    change(meta)
    (ckpt / CONFIG_FILE).write_text(json.dumps(meta))


def change_tensors(change):
    def apply(ckpt: Path) -> None:
        tensors = load((ckpt / MODEL_FILE).read_bytes())
        change(tensors)
        save_tensors(tensors, ckpt / MODEL_FILE)

    return apply


def test_checkpoint_id_covers_the_demonstrations(ckpt):
    # before: the id hashed model.safetensors only -- both patches recorded the same id, other contexts
    model, tok = tiny_model("llama")
    first = edit(SERAC(), model, tok, ckpt)
    change_config(ckpt, lambda m: m["config"].update(demonstrations=["Q? A.\n\n", "R? B.\n\n"]))
    second = edit(SERAC(), model, tok, ckpt)
    assert second.metadata["extra"]["contexts"][0].startswith("Q? A.\n\nR? B.\n\n")
    assert first.metadata["extra"]["contexts"] != second.metadata["extra"]["contexts"]
    assert first.metadata["extra"]["checkpoint"]["id"] != second.metadata["extra"]["checkpoint"]["id"]


MALFORMED = {
    "invalid JSON": lambda c: (c / CONFIG_FILE).write_text("{"),
    "config.json a list": lambda c: (c / CONFIG_FILE).write_text("[]"),
    "no config section": lambda c: change_config(c, lambda m: m.pop("config")),
    "another encoder": lambda c: change_config(c, lambda m: m["config"].update(encoder="bert-base-uncased")),
    "demonstrations a string": lambda c: change_config(c, lambda m: m["config"].update(demonstrations="abc")),
    "demonstrations numbers": lambda c: change_config(c, lambda m: m["config"].update(demonstrations=[1, 2])),
    "missing proj": change_tensors(lambda t: t.pop("proj")),
    "proj of rank 1": change_tensors(lambda t: t.update(proj=t["proj"].reshape(-1))),
    "proj for another encoder size": change_tensors(lambda t: t.update(proj=torch.eye(10))),
    "scale of 3 values": change_tensors(lambda t: t.update(scale=torch.ones(3))),
    "integer proj": change_tensors(lambda t: t.update(proj=t["proj"].to(torch.int32))),
    "extra tensor": change_tensors(lambda t: t.update(stray=torch.zeros(2))),
    "NaN in proj": change_tensors(lambda t: t.update(proj=torch.full_like(t["proj"], float("nan")))),
    "pickle renamed model.safetensors": lambda c: torch.save(load((c / MODEL_FILE).read_bytes()), c / MODEL_FILE),
    "truncated model.safetensors": lambda c: (c / MODEL_FILE).write_bytes((c / MODEL_FILE).read_bytes()[:64]),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_checkpoint_is_one_line_before_the_model_is_touched(case, ckpt):
    # before: JSONDecodeError, AttributeError, KeyError, SafetensorError tracebacks; a rank-1 or wrong-size
    # proj, a 3-value scale or NaN were accepted into the patch and failed (or misrouted) only when applied
    model, tok = tiny_model("llama")
    MALFORMED[case](ckpt)
    before = state_fingerprint(model)
    with pytest.raises(CheckpointError) as err:
        edit(SERAC(), model, tok, ckpt)
    assert "\n" not in str(err.value) and str(ckpt) in str(err.value), str(err.value)
    assert state_fingerprint(model) == before


def test_the_checkpoint_is_read_once_until_it_changes(ckpt, monkeypatch):
    # before: read and re-hashed on every edit
    model, tok = tiny_model("llama")
    reads = []
    real = trainer_module.read_checkpoint
    monkeypatch.setattr(trainer_module, "read_checkpoint", lambda d: reads.append(d) or real(d))
    method = SERAC()
    ids = {edit(method, model, tok, ckpt).metadata["extra"]["checkpoint"]["id"] for _ in range(3)}
    assert len(reads) == 1 and len(ids) == 1
    change_tensors(lambda t: t.update(bias=t["bias"] - 1.0))(ckpt)
    patch = edit(method, model, tok, ckpt)
    assert len(reads) == 2 and patch.metadata["extra"]["checkpoint"]["id"] not in ids
    assert torch.equal(patch.tensors["state/scope_classifier/bias"], load((ckpt / MODEL_FILE).read_bytes())["bias"])
