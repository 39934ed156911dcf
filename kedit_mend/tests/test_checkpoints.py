"""Trained-editor checkpoints a user can trust: the id recorded in patches covers everything that shapes
the edit, a checkpoint for another model is refused, and every malformed checkpoint is one
:class:`CheckpointError` line raised before the model runs. Tiny checkpoints are written directly (the
untrained network's parameters), no training needed."""

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
from kedit_core.request import EditRequest
from kedit_core.testing import state_fingerprint, tiny_model
from kedit_core.trainer import CONFIG_FILE, MODEL_FILE, save_tensors
from kedit_mend.hypernetwork import KENetwork
from kedit_mend.ke import KE
from kedit_mend.mend import MEND

HP = {
    "mend": {"layers": [2, 3], "rank": 8},
    "ke": {"layers": [2, 3], "lstm_hidden": 8, "cond_dim": 8, "head_hidden": 8},
}
REQUEST = EditRequest(
    prompt="The Eiffel Tower is located in the city of", subject="The Eiffel Tower", target_new="Rome"
)
METHODS = {"mend": MEND, "ke": KE}


def tensors_of(ckpt: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, read into memory (not memory-mapped: the tests rewrite the file in place)."""
    return load((ckpt / MODEL_FILE).read_bytes())


def write_checkpoint(out: Path, model, method, fingerprint: str = "", net=None) -> Path:
    """A valid checkpoint of ``method``'s untrained network for ``model`` (what a trainer writes)."""
    if net is None:
        net = method.build_network(model, resolve_architecture(model), method.load_hparams(HP[method.name]))
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(net.state_dict(), out / MODEL_FILE)
    config = {**net.config(), "base_model": {"id": "tiny", "fingerprint": fingerprint}}
    (out / CONFIG_FILE).write_text(json.dumps({"trainer": "EditorTrainer", "config": config}, indent=2))
    return out


def edit(method, model, tok, ckpt: Path, fingerprint: str = ""):
    hp = method.load_hparams(HP[method.name])
    ctx = EditContext(checkpoint=ckpt, model_fingerprint=fingerprint)
    return method.compute_patch(model, tok, [REQUEST], hp, resolve_architecture(model), ctx)


def edit_config(ckpt: Path, change) -> None:
    meta = json.loads((ckpt / CONFIG_FILE).read_text())
    change(meta)
    (ckpt / CONFIG_FILE).write_text(json.dumps(meta))


def move_layer(meta, old: int = 2, new: int = 1) -> None:
    """Point the checkpoint at another layer of the same shape (the tensors stay valid)."""
    config = meta["config"]
    rename = {p: p.replace(f".{old}.", f".{new}.") for p in config["params"]}
    config["params"] = [rename[p] for p in config["params"]]
    config["shapes"] = {rename.get(p, p): s for p, s in config["shapes"].items()}


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.mark.parametrize("name", ["mend", "ke"])
def test_checkpoint_id_covers_the_config_and_the_tensors(name, llama, tmp_path):
    # before: the id hashed model.safetensors only -- both patches below recorded the same id
    model, tok = llama
    method = METHODS[name]()
    a = write_checkpoint(tmp_path / "a", model, method)
    b = shutil.copytree(a, tmp_path / "b")
    edit_config(b, move_layer)
    pa, pb = edit(method, model, tok, a), edit(method, model, tok, b)
    assert "model.layers.2.mlp.down_proj.weight" in pa.metadata["fingerprints"]
    assert "model.layers.1.mlp.down_proj.weight" in pb.metadata["fingerprints"]  # the config moved the edit
    id_a, id_b = pa.metadata["extra"]["checkpoint"]["id"], pb.metadata["extra"]["checkpoint"]["id"]
    assert id_a != id_b
    # the config is canonicalised: key order and whitespace do not change the id
    c = shutil.copytree(a, tmp_path / "c")
    meta = json.loads((a / CONFIG_FILE).read_text())
    (c / CONFIG_FILE).write_text(json.dumps(dict(reversed(list(meta.items()))), indent=7))
    assert edit(method, model, tok, c).metadata["extra"]["checkpoint"]["id"] == id_a
    # and any tensor change does
    tensors = tensors_of(a)
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 1e-3
    save_tensors(tensors, c / MODEL_FILE)
    assert edit(method, model, tok, c).metadata["extra"]["checkpoint"]["id"] not in (id_a, id_b)


def test_a_checkpoint_trained_for_another_model_fingerprint_is_refused(llama, tmp_path):
    # before: a logged warning, and the edit went ahead
    model, tok = llama
    ckpt = write_checkpoint(tmp_path / "ckpt", model, MEND(), fingerprint="0123456789abcdef")
    before = state_fingerprint(model)
    with pytest.raises(CheckpointError, match="fingerprint '0123456789abcdef' .*this model's is fedcba9876543210"):
        edit(MEND(), model, tok, ckpt, fingerprint="fedcba9876543210")
    assert state_fingerprint(model) == before
    patch = edit(MEND(), model, tok, ckpt, fingerprint="0123456789abcdef")  # the model it was trained for
    assert patch.metadata["extra"]["checkpoint"]["source"] == str(ckpt)


def _pickle_as_safetensors(ckpt: Path) -> None:
    torch.save(tensors_of(ckpt), ckpt / MODEL_FILE)


def _retensor(change):
    def apply(ckpt: Path) -> None:
        tensors = tensors_of(ckpt)
        change(tensors)
        save_tensors(tensors, ckpt / MODEL_FILE)

    return apply


def _config(change):
    return lambda ckpt: edit_config(ckpt, change)


def _first(tensors) -> str:
    return sorted(k for k, t in tensors.items() if t.ndim >= 2)[0]


MALFORMED = {
    "invalid JSON": lambda ckpt: (ckpt / CONFIG_FILE).write_text('{"config": {"kind": "mend",'),
    "config.json not UTF-8": lambda ckpt: (ckpt / CONFIG_FILE).write_bytes(b'{"config": "\xff\xfe"}'),
    "config.json a list": lambda ckpt: (ckpt / CONFIG_FILE).write_text("[1, 2]"),
    "no config section": _config(lambda m: m.pop("config")),
    "missing shapes": _config(lambda m: m["config"].pop("shapes")),
    "missing rank": _config(lambda m: m["config"].pop("rank")),
    "shapes a list": _config(lambda m: m["config"].update(shapes=[64, 128])),
    "params a string": _config(lambda m: m["config"].update(params="model.layers.2.mlp.down_proj.weight")),
    "base_model a string": _config(lambda m: m["config"].update(base_model="gemma")),
    "a shape with a newline (found by the fuzz test)": _config(
        lambda m: m["config"]["shapes"].update({m["config"]["params"][0]: "[32,\n64]"})
    ),
    "rank disagrees with the tensors": _config(lambda m: m["config"].update(rank=4)),
    "rank a string": _config(lambda m: m["config"].update(rank="eight")),
    "edit_lr negative": _config(lambda m: m["config"].update(edit_lr=-1.0)),
    "wrong tensor rank": _retensor(lambda t: t.update({_first(t): t[_first(t)].reshape(-1)})),
    "missing tensor": _retensor(lambda t: t.pop(_first(t))),
    "extra tensor": _retensor(lambda t: t.update(stray=torch.zeros(3))),
    "NaN in a tensor": _retensor(lambda t: t.update({_first(t): torch.full_like(t[_first(t)], float("nan"))})),
    "pickle renamed model.safetensors": _pickle_as_safetensors,
    "truncated model.safetensors": lambda ckpt: (ckpt / MODEL_FILE).write_bytes((ckpt / MODEL_FILE).read_bytes()[:100]),
    "empty model.safetensors": lambda ckpt: (ckpt / MODEL_FILE).write_bytes(b""),
    "no model.safetensors": lambda ckpt: (ckpt / MODEL_FILE).unlink(),
}


class ForwardCounter:
    """Counts forward calls into any module of a model (the edit must not start on a bad checkpoint)."""

    def __init__(self, model) -> None:
        self.calls = 0
        self.handles = [m.register_forward_pre_hook(self.hook) for m in model.modules()]

    def hook(self, *_) -> None:
        self.calls += 1

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def assert_refused_before_the_model_runs(method, model, tok, ckpt: Path, match: str | None = None) -> CheckpointError:
    before = state_fingerprint(model)
    counter = ForwardCounter(model)
    try:
        with pytest.raises(CheckpointError, match=match) as err:
            edit(method, model, tok, ckpt)
    finally:
        counter.remove()
    message = str(err.value)
    assert "\n" not in message and str(ckpt) in message, message
    assert counter.calls == 0 and state_fingerprint(model) == before
    return err.value


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_checkpoint_is_one_line_before_the_model_runs(case, llama, tmp_path):
    # before: JSONDecodeError, UnicodeDecodeError, KeyError, AttributeError, RuntimeError (load_state_dict),
    # SafetensorError, ... -- raw tracebacks; a few cases were already a KeditError (see the report)
    model, tok = llama
    ckpt = write_checkpoint(tmp_path / "ckpt", model, MEND())
    MALFORMED[case](ckpt)
    assert_refused_before_the_model_runs(MEND(), model, tok, ckpt)


def test_ke_checkpoint_for_other_token_embeddings_is_refused(llama, tmp_path):
    # before: an LSTM size error after the model's forward and backward pass
    model, tok = llama
    arch = resolve_architecture(model)
    params, shapes = KE().edited_params(model, arch, KE().load_hparams(HP["ke"]))
    dim = model.get_input_embeddings().weight.shape[1]
    net = KENetwork(params, shapes, dim + 3, lstm_hidden=8, cond_dim=8, head_hidden=8)
    ckpt = write_checkpoint(tmp_path / "ckpt", model, KE(), net=net)
    assert_refused_before_the_model_runs(KE(), model, tok, ckpt, match=f"size {dim + 3}.*size {dim}")


def test_the_checkpoint_is_read_once_per_method_until_it_changes(llama, tmp_path, monkeypatch):
    # before: read and re-hashed on every edit
    model, tok = llama
    ckpt = write_checkpoint(tmp_path / "ckpt", model, MEND())
    reads = []
    real = trainer_module.read_checkpoint
    monkeypatch.setattr(trainer_module, "read_checkpoint", lambda d: reads.append(d) or real(d))
    method = MEND()
    first = [edit(method, model, tok, ckpt) for _ in range(3)]
    assert len(reads) == 1
    assert len({p.metadata["extra"]["checkpoint"]["id"] for p in first}) == 1
    edit_config(ckpt, move_layer)  # a rewritten config is read again and names another editor
    moved = edit(method, model, tok, ckpt)
    assert len(reads) == 2 and "model.layers.1.mlp.down_proj.weight" in moved.metadata["fingerprints"]
    assert moved.metadata["extra"]["checkpoint"]["id"] != first[0].metadata["extra"]["checkpoint"]["id"]


def test_kedit_edit_reports_a_malformed_checkpoint_in_one_line(llama, tmp_path, capsys):
    # before: the JSONDecodeError traceback of config.json
    from kedit_core.cli import main

    model, tok = llama
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    ckpt = write_checkpoint(tmp_path / "ckpt", model, MEND())
    (ckpt / CONFIG_FILE).write_text("{oops")
    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps({"method": "mend", **HP["mend"]}))
    rc = main(
        [
            "edit",
            "--method",
            "mend",
            "--model",
            str(tmp_path / "model"),
            "--hparams",
            str(hp),
            "--checkpoint",
            str(ckpt),
            "--prompt",
            REQUEST.prompt,
            "--subject",
            REQUEST.subject,
            "--target",
            REQUEST.target_new,
            "--out",
            str(tmp_path / "e.kedit.safetensors"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and not (tmp_path / "e.kedit.safetensors").exists()
    assert (
        err[-1] == f"kedit: error: {ckpt / CONFIG_FILE}: not valid JSON (Expecting property name enclosed in "
        "double quotes: line 1 column 2 (char 1))"
    ), err
