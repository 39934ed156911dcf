"""Patches as peft LoRA adapters (kedit_core.export_peft): the base model with the exported adapter loaded
gives the logits of the model with the patch applied, on the tiny llama, gpt2 (Conv1D) and gemma3."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from kedit_core.architecture import resolve_architecture
from kedit_core.errors import KeditError, PatchError
from kedit_core.export_peft import CONFIG, PROVENANCE, WEIGHTS, export_peft, import_peft
from kedit_core.method import PatchKind
from kedit_core.patch import Patch
from kedit_core.testing import state_fingerprint, tiny_model, tiny_requests

peft = pytest.importorskip("peft", reason="the peft export needs the optional extra: pip install 'kedit-core[peft]'")

PROMPTS = ["The Eiffel Tower is located in the city of", "Michael Jordan plays the sport of"]
TINY_ROME = {
    "v_num_grad_steps": 6,
    "v_lr": 0.5,
    "clamp_norm_factor": 50.0,
    "mom2_n_tokens": 400,
    "context_template_length_params": [[4, 2]],
}


def lowrank_patch(model, sites, seed=1, parent=None):
    """A ROME-like patch: random factors of the given ranks on ``(layer, role)`` sites, in storage layout."""
    arch, g = resolve_architecture(model), torch.Generator().manual_seed(seed)
    tensors = {}
    for layer, role, r in sites:
        param = arch.layer_path(layer, getattr(arch, role)) + ".weight"
        d_out, d_in = arch.weight(model, param).shape
        a, b = arch.lowrank_to_param_layout(
            torch.randn(d_out, r, generator=g) / 2, torch.randn(r, d_in, generator=g) / 2
        )
        tensors[f"lowrank/{param}/a"], tensors[f"lowrank/{param}/b"] = a, b
    return Patch.create(
        method="rome",
        kind=PatchKind.WEIGHT_DELTA,
        model=model,
        tensors=tensors,
        base_model={"id": "tiny"},
        parent=parent,
    )


def compare(model, tok, patches, adapter):
    """Max |logits| differences: (peft adapter vs kedit patches, kedit patches vs base, logit scale)."""
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    lora = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(adapter))
    before = state_fingerprint(model)
    with torch.no_grad():
        base = model(**enc).logits.float()
        handles = [p.apply(model) for p in patches]
        edited = model(**enc).logits.float()
        for h in reversed(handles):
            h.revert()
        adapted = lora(**enc).logits.float()
    assert state_fingerprint(model) == before
    return (adapted - edited).abs().max().item(), (edited - base).abs().max().item(), edited.abs().max().item()


@pytest.fixture(scope="module")
def rome_registry():
    from kedit_core.plugins import Registry

    pytest.importorskip("kedit_rome", reason="ROME comes from the kedit-rome plugin")
    return Registry(autoload=True).load()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_exact_lowrank_patch_is_the_adapter(family, dtype, tmp_path):
    model, tok = tiny_model(family, dtype=dtype)
    patch = lowrank_patch(model, [(1, "mlp_out", 1), (2, "attn_out", 2)])
    report = export_peft([patch], tmp_path)
    config = json.loads((tmp_path / CONFIG).read_text())
    arch = resolve_architecture(model)
    mlp, attn = arch.layer_path(1, arch.mlp_out), arch.layer_path(2, arch.attn_out)
    assert report.exact and config["target_modules"] == sorted([mlp, attn])
    assert (config["r"], config["lora_alpha"], config["rank_pattern"], config["alpha_pattern"]) == (
        1,
        1,
        {attn: 2},
        {attn: 2},
    )
    assert config["fan_in_fan_out"] is (family == "gpt2")
    diff, effect, scale = compare(model, tok, [patch], tmp_path)
    print(f"\n{family} {dtype}: max |logits(peft) - logits(kedit)| = {diff:.3g} (edit moves logits {effect:.3g})")
    if dtype == torch.float32:
        assert diff <= 1e-5 * scale  # measured 1.5e-7 .. 2.8e-7 on logits of size ~0.4
    else:
        assert diff <= 5e-2 * scale and diff <= effect / 20  # measured 3.4e-3 .. 6.8e-3: bf16 rounds differently


@pytest.mark.parametrize(("family", "method"), [("gpt2", "rome"), ("gemma3", "rome"), ("llama", "memit")])
def test_rome_and_memit_patches_export_exactly(family, method, rome_registry, tmp_path):
    from kedit_core.editor import Editor

    model, tok = tiny_model(family)
    layers = [1] if method == "rome" else [1, 2]
    hp = {"layers": layers, **TINY_ROME, **({"mom2_update_weight": 100.0} if method == "memit" else {})}
    editor = Editor(rome_registry.method(method), model, tok, hparams=hp, cache=tmp_path / "cache")
    patch = editor.compute_patch(tiny_requests() if method == "memit" else tiny_requests()[:1])
    report = export_peft([patch], tmp_path / "adapter")
    assert report.exact and {m.rank for m in report.modules.values()} == {1 if method == "rome" else 2}
    diff, effect, scale = compare(model, tok, [patch], tmp_path / "adapter")
    print(f"\n{family} {method} float32: max |logits(peft) - logits(kedit)| = {diff:.3g} (edit {effect:.3g})")
    assert diff <= 1e-5 * scale and effect > 1e3 * diff


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_sequential_rome_chain_is_one_adapter(family, rome_registry, tmp_path):
    from kedit_core.editor import Editor

    model, tok = tiny_model(family)
    editor = Editor(rome_registry.method("rome"), model, tok, hparams={"layers": [1], **TINY_ROME}, cache=tmp_path)
    first = editor.compute_patch(tiny_requests()[:1])
    with first.applied(model):
        second = editor.compute_patch(tiny_requests()[1:], parent=first)
    report = export_peft([first, second], tmp_path / "chain")
    [module] = report.modules.values()
    assert (
        report.exact and module.rank == 2 and [p["patch_id"] for p in module.parts] == [first.patch_id, second.patch_id]
    )
    diff, effect, scale = compare(model, tok, [first, second], tmp_path / "chain")
    print(f"\n{family} rome chain of 2 float32: max |logits(peft) - logits(kedit)| = {diff:.3g} (edits {effect:.3g})")
    assert diff <= 1e-5 * scale
    with pytest.raises(KeditError, match=f"made on top of {first.patch_id}, not"):
        export_peft([second, first], tmp_path / "wrong")

    combined = import_peft(tmp_path / "chain")  # one patch, on the chain's base weights
    assert combined.method == "peft" and combined.parent is None
    assert combined.metadata["fingerprints"] == first.metadata["fingerprints"]
    assert [p["patch_id"] for p in combined.metadata["extra"]["peft_import"]["patches"]] == [
        first.patch_id,
        second.patch_id,
    ]
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad(), first.applied(model), second.applied(model):
        chained = model(**enc).logits
    with torch.no_grad(), combined.applied(model):
        assert (model(**enc).logits - chained).abs().max() <= 1e-5 * chained.abs().max()


def test_chains_apply_in_order_or_are_refused(tmp_path):
    model, _ = tiny_model("llama")
    first = lowrank_patch(model, [(1, "mlp_out", 1)])
    with first.applied(model):
        second = lowrank_patch(model, [(1, "mlp_out", 1), (3, "mlp_out", 1)], seed=2)  # no parent recorded
    report = export_peft([first, second], tmp_path / "ok")
    assert {n: m.rank for n, m in report.modules.items()} == {
        "model.layers.1.mlp.down_proj": 2,
        "model.layers.3.mlp.down_proj": 1,
    }
    with pytest.raises(KeditError, match=f"not computed on the weights patch {second.patch_id} writes"):
        export_peft([second, first], tmp_path / "no")


def test_dense_ft_patch_is_a_stated_truncated_svd(ft_plugin, tmp_path):
    from kedit_core.editor import Editor

    model, tok = tiny_model("llama")
    patch = Editor("ft-m", model, tok, hparams={"layers": [1], "lr": 0.05, "num_steps": 10}).compute_patch(
        tiny_requests()[:1]
    )
    [(param, delta)] = patch.deltas().items()
    with pytest.raises(KeditError, match="holds dense deltas .* pass --rank R"):
        export_peft([patch], tmp_path / "none")
    s = torch.linalg.svdvals(delta.double())
    for rank in (2, min(delta.shape)):
        report = export_peft([patch], tmp_path / str(rank), rank=rank)
        expected = float(s[rank:].norm() / s.norm())
        assert not report.exact and report.svd_rank == rank
        assert report.max_relative_error == pytest.approx(expected, abs=1e-6)
        recorded = json.loads((tmp_path / str(rank) / PROVENANCE).read_text())
        assert recorded["modules"][param.removesuffix(".weight")]["relative_error"] == report.max_relative_error
        assert f"max relative error {report.max_relative_error:.3g}" in report.describe()
        diff, effect, scale = compare(model, tok, [patch], tmp_path / str(rank))
        print(
            f"\nft-m rank {rank}: relative error {report.max_relative_error:.3g}, max logit diff {diff:.3g} (edit {effect:.3g})"
        )
    assert report.max_relative_error < 1e-6 and diff <= 1e-5 * scale  # full rank: exact up to rounding


def test_what_lora_cannot_carry_is_refused(tmp_path):
    model, _ = tiny_model("llama")
    state = Patch.create(
        method="grace",
        kind=PatchKind.MODULE_STATE,
        model=model,
        tensors={"state/model.layers.1.mlp/keys": torch.zeros(2, 3)},
        fingerprint_params=["model.layers.1.mlp.down_proj.weight"],
        plugin="kedit-grace",
    )
    with pytest.raises(KeditError, match=r"is a module_state patch \(grace\): only weight-delta patches are LoRA"):
        export_peft([state], tmp_path)
    norm = Patch.create(
        method="t", kind=PatchKind.WEIGHT_DELTA, model=model, tensors={"delta/model.norm.weight": torch.ones(32)}
    )
    with pytest.raises(KeditError, match="no weight matrix: LoRA adapts projections only"):
        export_peft([norm], tmp_path, rank=1)
    assert not (tmp_path / CONFIG).exists()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_import_gives_back_the_exported_patch(family, tmp_path):
    model, _ = tiny_model(family)
    patch = lowrank_patch(model, [(1, "mlp_out", 1), (2, "attn_out", 2)])
    patch = Patch.load(patch.save(tmp_path / "p.kedit.safetensors"))
    export_peft([patch], tmp_path / "adapter")
    back = import_peft(tmp_path / "adapter")
    assert back.patch_id == patch.patch_id and back.metadata == patch.metadata
    assert back.tensors.keys() == patch.tensors.keys()
    assert all(torch.equal(back.tensors[k], t) and back.tensors[k].dtype == t.dtype for k, t in patch.tensors.items())


def test_import_refuses_adapters_kedit_did_not_write(tmp_path):
    from safetensors.torch import load_file, save_file

    model, _ = tiny_model("llama")
    export_peft([lowrank_patch(model, [(1, "mlp_out", 1)])], tmp_path)
    config = json.loads((tmp_path / CONFIG).read_text())
    (tmp_path / CONFIG).write_text(json.dumps({**config, "lora_alpha": 2}))
    with pytest.raises(PatchError, match="lora_alpha 2; kedit wrote rank 1 with lora_alpha == r"):
        import_peft(tmp_path)
    (tmp_path / CONFIG).write_text(json.dumps(config))
    weights = load_file(str(tmp_path / WEIGHTS))
    key = next(iter(weights))
    save_file({**weights, key: weights[key] * 2}, str(tmp_path / WEIGHTS))
    with pytest.raises(PatchError, match=f"does not match {PROVENANCE} .*changed after kedit exported it"):
        import_peft(tmp_path)
    (tmp_path / PROVENANCE).unlink()
    with pytest.raises(PatchError, match=f"a peft adapter kedit did not export \\(no {PROVENANCE}\\)"):
        import_peft(tmp_path)


def test_cli_export_and_import(tmp_path, capsys, monkeypatch):
    from kedit_core.cli import main

    model, _ = tiny_model("gpt2")
    first = lowrank_patch(model, [(1, "mlp_out", 1)])
    paths = [str(first.save(tmp_path / "a.kedit.safetensors"))]
    assert main(["patch", "export", *paths, "--format", "peft", "--out", str(tmp_path / "ad"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["exact"] is True
    assert main(["patch", "import", str(tmp_path / "ad"), "--out", str(tmp_path / "b.kedit.safetensors")]) == 0
    assert f"patch {first.patch_id} (rome) written to" in capsys.readouterr().out
    assert Patch.load(tmp_path / "b.kedit.safetensors").patch_id == first.patch_id
    monkeypatch.setitem(__import__("sys").modules, "peft", None)  # as if the extra were not installed
    assert main(["patch", "export", *paths, "--out", str(tmp_path / "x")]) == 1
    assert "needs peft: pip install 'kedit-core[peft]'" in capsys.readouterr().err


def _tiny_hparams() -> dict:
    """The small hyperparameters of benchmarks/patch_ids.py (those of the conformance tests)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "patch_ids.py"
    spec = importlib.util.spec_from_file_location("patch_ids", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.HPARAMS


@pytest.mark.parametrize("method", ["rome", "memit", "pmet", "alphaedit", "kn", "mend", "ke", "ft-l", "ft-m"])
def test_every_weight_editing_method_exports(method, rome_registry, tmp_path):
    """Every weight-delta method's patch, exported: low-rank ones exactly; dense ones as an SVD at full rank,
    which is exact to float32 rounding. The logits of the base model with the adapter equal the patched
    model's (tiny LLaMA, float32; the difference is printed)."""
    from kedit_core.editor import Editor

    model, tok = tiny_model("llama")
    editor = Editor(rome_registry.method(method), model, tok, hparams=_tiny_hparams()[method], cache=tmp_path / "c")
    patch = editor.compute_patch(tiny_requests()[:1])
    report = export_peft([patch], tmp_path / "adapter", rank=model.config.hidden_size)
    diff, effect, scale = compare(model, tok, [patch], tmp_path / "adapter")
    errors = [m.relative_error or 0.0 for m in report.modules.values()]
    print(
        f"\n{method}: exact={report.exact} max rel. SVD error {max(errors):.2g}; max |logits(peft) - logits(kedit)| ="
        f" {diff:.3g} (edit moves logits {effect:.3g})"
    )
    assert max(errors) <= 1e-5 and diff <= 1e-5 * scale
