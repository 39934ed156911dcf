import torch
import pytest

from kedit_core.errors import FingerprintMismatch, PatchError
from kedit_core.method import PatchKind
from kedit_core.patch import Patch, stack, revert_all
from kedit_core.testing import state_fingerprint, tiny_model

PARAM = "model.layers.1.mlp.down_proj.weight"


def dense_patch(model, scale=0.01, param=PARAM, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = model.get_parameter(param)
    return Patch.create(method="test", kind=PatchKind.WEIGHT_DELTA, model=model,
                        tensors={f"delta/{param}": torch.randn(p.shape, generator=g) * scale},
                        base_model={"id": "tiny"}, requests=[{"prompt": "a", "subject": "a", "target_new": "b"}])


def lowrank_patch(model, param=PARAM):
    p = model.get_parameter(param)
    a, b = torch.randn(p.shape[0], 1), torch.randn(1, p.shape[1])
    return Patch.create(method="test", kind=PatchKind.WEIGHT_DELTA, model=model,
                        tensors={f"lowrank/{param}/a": a, f"lowrank/{param}/b": b})


@pytest.fixture()
def model():
    return tiny_model("llama")[0]


def test_roundtrip_identical_metadata_and_tensors(model, tmp_path):
    patch = dense_patch(model)
    loaded = Patch.load(patch.save(tmp_path / "x.kedit.safetensors"))
    assert loaded.metadata == patch.metadata
    assert torch.equal(loaded.tensors[f"delta/{PARAM}"], patch.tensors[f"delta/{PARAM}"])
    assert loaded.patch_id == patch.content_id()
    assert loaded.summary()["params"] == [PARAM]


def test_lowrank_is_small_and_applies(model, tmp_path):
    patch = lowrank_patch(model)
    path = patch.save(tmp_path / "lr.kedit.safetensors")
    assert path.stat().st_size < 64 * 1024
    before = model.get_parameter(PARAM).detach().clone()
    with Patch.load(path).applied(model):
        a, b = patch.tensors[f"lowrank/{PARAM}/a"], patch.tensors[f"lowrank/{PARAM}/b"]
        assert torch.allclose(model.get_parameter(PARAM), before + a @ b, atol=1e-6)
    assert torch.equal(model.get_parameter(PARAM), before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_revert_bit_exact(dtype):
    model = tiny_model("gemma3", dtype=dtype)[0]
    before = state_fingerprint(model)
    handle = dense_patch(model).apply(model)
    assert state_fingerprint(model) != before
    handle.revert()
    assert state_fingerprint(model) == before


def test_lifo_order_enforced(model):
    first = dense_patch(model, seed=1).apply(model)
    second = Patch.create(method="t", kind=PatchKind.WEIGHT_DELTA, model=model,
                          tensors={f"delta/{PARAM}": torch.ones_like(model.get_parameter(PARAM)) * 1e-3}).apply(model)
    with pytest.raises(PatchError, match="last-in-first-out"):
        first.revert()
    assert stack(model) == [first, second]
    second.revert()
    first.revert()
    assert stack(model) == []


def test_revert_all(model):
    before = state_fingerprint(model)
    p1 = dense_patch(model, seed=1)
    p1.apply(model)
    Patch.create(method="t", kind=PatchKind.WEIGHT_DELTA, model=model,
                 tensors={f"delta/{PARAM}": torch.full_like(model.get_parameter(PARAM), 1e-3)}).apply(model)
    assert revert_all(model) == 2 and state_fingerprint(model) == before


def test_fingerprint_refusal_leaves_model_untouched(model):
    other = tiny_model("llama", seed=1)[0]
    patch = dense_patch(other)
    before = state_fingerprint(model)
    with pytest.raises(FingerprintMismatch, match="computed on other weights"):
        patch.apply(model)
    assert state_fingerprint(model) == before and stack(model) == []


def test_shape_and_missing_param_refused(model):
    gpt2 = tiny_model("gpt2")[0]
    patch = dense_patch(model)
    with pytest.raises(PatchError, match="which this model does not have"):
        patch.apply(gpt2)
    bad = Patch.create(method="t", kind=PatchKind.WEIGHT_DELTA, model=model, tensors={f"delta/{PARAM}": torch.zeros(3, 3)})
    with pytest.raises(PatchError, match="shape"):
        bad.apply(model)


def test_non_finite_refused_before_any_write(model):
    p2 = "model.layers.2.mlp.down_proj.weight"
    ok = torch.zeros_like(model.get_parameter(p2)) + 1e-3
    inf = torch.zeros_like(model.get_parameter(PARAM))
    inf[0, 0] = float("inf")
    patch = Patch.create(method="t", kind=PatchKind.WEIGHT_DELTA, model=model, tensors={f"delta/{p2}": ok, f"delta/{PARAM}": inf})
    before = state_fingerprint(model)
    with pytest.raises(PatchError, match="non-finite"):
        patch.apply(model)
    assert state_fingerprint(model) == before
    with pytest.raises(PatchError, match="non-finite"):
        patch.save("/tmp/never-written.kedit.safetensors")


def test_context_manager_reverts_on_error(model):
    before = state_fingerprint(model)
    with pytest.raises(RuntimeError):
        with dense_patch(model).applied(model):
            raise RuntimeError("boom")
    assert state_fingerprint(model) == before


def test_revert_from_file_reports_residual(tmp_path):
    for dtype, exact_expected in [(torch.float32, None), (torch.bfloat16, None)]:
        model = tiny_model("llama", dtype=dtype)[0]
        before = state_fingerprint(model)
        patch = dense_patch(model, scale=0.3)
        patch.apply(model)
        report = patch.revert_from_file(model)[PARAM]
        assert set(report) == {"exact", "max_abs_residual"}
        if report["exact"]:
            assert state_fingerprint(model) == before
        else:
            assert report["max_abs_residual"] >= 0 and state_fingerprint(model) != before
    # bf16 rounding of a large delta makes subtraction inexact: the report must say so
    model = tiny_model("llama", dtype=torch.bfloat16)[0]
    patch = dense_patch(model, scale=3.0)
    patch.apply(model)
    assert not patch.revert_from_file(model)[PARAM]["exact"]


def test_chained_patches_check_parent_state(model):
    p1 = dense_patch(model, seed=1)
    h1 = p1.apply(model)
    p2 = dense_patch(model, seed=2)  # computed on the edited weights
    h1.revert()
    with pytest.raises(FingerprintMismatch, match="parent patches"):
        p2.apply(model)
    p1.apply(model)
    p2.apply(model)
    revert_all(model)


def test_truncated_and_garbage_files(model, tmp_path):
    good = dense_patch(model).save(tmp_path / "g.kedit.safetensors")
    data = good.read_bytes()
    (tmp_path / "trunc.kedit.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(PatchError, match="corrupt or truncated"):
        Patch.load(tmp_path / "trunc.kedit.safetensors")
    (tmp_path / "junk.kedit.safetensors").write_bytes(b"hello world, not a patch")
    with pytest.raises(PatchError, match="trunc|corrupt"):
        Patch.load(tmp_path / "junk.kedit.safetensors")
    with pytest.raises(PatchError, match="not found"):
        Patch.load(tmp_path / "none.kedit.safetensors")


def test_tampered_tensor_detected(model, tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    path = dense_patch(model).save(tmp_path / "p.kedit.safetensors")
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    tensors = load_file(str(path))
    tensors[f"delta/{PARAM}"][0, 0] += 1
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(PatchError, match="does not match patch id"):
        Patch.load(path)


def test_foreign_safetensors_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(PatchError, match="not a kedit patch"):
        Patch.load(tmp_path / "w.safetensors")


def test_bad_names_and_lowrank_shapes(model):
    with pytest.raises(PatchError, match="bad tensor name"):
        Patch.create(method="t", kind=PatchKind.WEIGHT_DELTA, model=model, tensors={"weird": torch.zeros(1)})
    with pytest.raises(PatchError, match="lacks its b factor"):
        Patch.create(method="t", kind=PatchKind.WEIGHT_DELTA, model=model, tensors={f"lowrank/{PARAM}/a": torch.zeros(2, 1)})


def test_module_state_patch_needs_its_plugin(model):
    patch = Patch.create(method="not-installed", kind=PatchKind.MODULE_STATE, model=model,
                         tensors={"state/model.layers.1.mlp/keys": torch.zeros(2, 3)}, fingerprint_params=[PARAM],
                         plugin="kedit-imaginary")
    before = state_fingerprint(model)
    with pytest.raises(PatchError, match="needs method 'not-installed' from kedit-imaginary"):
        patch.apply(model)
    assert state_fingerprint(model) == before


def test_observer_hooks_called(model):
    from kedit_core.hookspecs import hookimpl
    from kedit_core.plugins import get_registry

    seen = []

    class Observer:
        @hookimpl
        def patch_applied(self, patch, model):
            seen.append(("applied", patch.patch_id))

        @hookimpl
        def patch_reverted(self, patch, model):
            seen.append(("reverted", patch.patch_id))

    reg = get_registry()
    reg.add_plugin(Observer(), name="observer")
    try:
        patch = dense_patch(model)
        with patch.applied(model):
            pass
    finally:
        reg.remove_plugin("observer")
    assert seen == [("applied", patch.patch_id), ("reverted", patch.patch_id)]
