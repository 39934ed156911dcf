from typing import ClassVar

import pytest
import torch

from kedit_core.errors import FingerprintMismatch, PatchError
from kedit_core.method import EditMethod, PatchKind
from kedit_core.patch import Patch, revert_all, stack, tensor_fingerprint
from kedit_core.testing import state_fingerprint, tiny_model

PARAM = "model.layers.1.mlp.down_proj.weight"


def dense_patch(model, scale=0.01, param=PARAM, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = model.get_parameter(param)
    return Patch.create(
        method="test",
        kind=PatchKind.WEIGHT_DELTA,
        model=model,
        tensors={f"delta/{param}": torch.randn(p.shape, generator=g) * scale},
        base_model={"id": "tiny"},
        requests=[{"prompt": "a", "subject": "a", "target_new": "b"}],
    )


def lowrank_patch(model, param=PARAM):
    p = model.get_parameter(param)
    a, b = torch.randn(p.shape[0], 1), torch.randn(1, p.shape[1])
    return Patch.create(
        method="test",
        kind=PatchKind.WEIGHT_DELTA,
        model=model,
        tensors={f"lowrank/{param}/a": a, f"lowrank/{param}/b": b},
    )


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
    second = Patch.create(
        method="t",
        kind=PatchKind.WEIGHT_DELTA,
        model=model,
        tensors={f"delta/{PARAM}": torch.ones_like(model.get_parameter(PARAM)) * 1e-3},
    ).apply(model)
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
    Patch.create(
        method="t",
        kind=PatchKind.WEIGHT_DELTA,
        model=model,
        tensors={f"delta/{PARAM}": torch.full_like(model.get_parameter(PARAM), 1e-3)},
    ).apply(model)
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
    with pytest.raises(PatchError, match="shape"):
        Patch.create(
            method="t", kind=PatchKind.WEIGHT_DELTA, model=model, tensors={f"delta/{PARAM}": torch.zeros(3, 3)}
        )
    bad = Patch({f"delta/{PARAM}": torch.zeros(3, 3)}, {**patch.metadata, "post_fingerprints": {PARAM: "0" * 64}})
    bad.metadata["patch_id"] = bad.content_id()
    with pytest.raises(PatchError, match="shape"):
        bad.apply(model)


def test_non_finite_refused_before_any_write(model):
    p2 = "model.layers.2.mlp.down_proj.weight"
    ok = torch.zeros_like(model.get_parameter(p2)) + 1e-3
    inf = torch.zeros_like(model.get_parameter(PARAM))
    inf[0, 0] = float("inf")
    patch = Patch.create(
        method="t", kind=PatchKind.WEIGHT_DELTA, model=model, tensors={f"delta/{p2}": ok, f"delta/{PARAM}": inf}
    )
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
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

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
        Patch.create(
            method="t", kind=PatchKind.WEIGHT_DELTA, model=model, tensors={f"lowrank/{PARAM}/a": torch.zeros(2, 1)}
        )


def test_module_state_patch_needs_its_plugin(model):
    patch = Patch.create(
        method="not-installed",
        kind=PatchKind.MODULE_STATE,
        model=model,
        tensors={"state/model.layers.1.mlp/keys": torch.zeros(2, 3)},
        fingerprint_params=[PARAM],
        plugin="kedit-imaginary",
    )
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


# -- revert from the file: verify first, then report honestly (issue 15, defect 2) -----------------------


def forged(patch: Patch, **meta) -> Patch:
    """``patch`` with metadata edited by hand and its id recomputed (what a forger would do)."""
    out = Patch(dict(patch.tensors), {**patch.metadata, **meta})
    out.metadata["patch_id"] = out.content_id()
    return out


def test_revert_from_file_refuses_a_model_that_never_had_the_patch(model):
    patch = dense_patch(model, scale=0.3)
    before = state_fingerprint(model)
    with pytest.raises(PatchError, match=f"does not hold patch {patch.patch_id}.*pre-edit weights"):
        patch.revert_from_file(model)
    assert state_fingerprint(model) == before


def test_revert_from_file_refuses_weights_changed_since_apply(model):
    patch = dense_patch(model, scale=0.3)
    patch.apply(model)
    with torch.no_grad():
        model.get_parameter(PARAM)[0, 0] += 1.0
    changed = state_fingerprint(model)
    with pytest.raises(PatchError, match="differ from both"):
        patch.revert_from_file(model)
    assert state_fingerprint(model) == changed


def test_revert_from_file_refuses_patches_without_post_fingerprints(model):
    patch = dense_patch(model, scale=0.3)
    patch.apply(model)
    applied = state_fingerprint(model)
    old = Patch(dict(patch.tensors), {k: v for k, v in patch.metadata.items() if k != "post_fingerprints"})
    old.metadata["patch_id"] = old.content_id()
    with pytest.raises(PatchError, match="records no post-edit fingerprints"):
        old.revert_from_file(model)
    assert state_fingerprint(model) == applied


def test_revert_from_file_refuses_forged_post_fingerprints(model):
    patch = dense_patch(model, scale=0.3)
    patch.apply(model)
    applied = state_fingerprint(model)
    for post in ({PARAM: "0" * 64}, {PARAM: patch.metadata["fingerprints"][PARAM]}, {}, ["x"]):
        with pytest.raises(PatchError):
            forged(patch, post_fingerprints=post).revert_from_file(model)
        assert state_fingerprint(model) == applied


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_revert_from_file_reports_exactness_and_a_true_error_bound(dtype):
    model = tiny_model("llama", dtype=dtype)[0]
    pre = model.get_parameter(PARAM).detach().clone()
    before = state_fingerprint(model)
    patch = dense_patch(model, scale=3.0)  # bf16 rounds a large delta: subtraction is not exact there
    patch.apply(model)
    report = patch.revert_from_file(model)[PARAM]
    assert set(report) == {"exact", "max_abs_error_bound", "summary"}
    error = (model.get_parameter(PARAM).double() - pre.double()).abs().max().item()
    if report["exact"]:
        assert state_fingerprint(model) == before and report["max_abs_error_bound"] == 0.0
        assert report["summary"].startswith("bit-exact")
    else:
        assert 0 < error <= report["max_abs_error_bound"]
        assert repr(report["max_abs_error_bound"]) in report["summary"]
    if dtype == torch.bfloat16:
        assert not report["exact"]


def test_revert_from_file_follows_a_chain_newest_first(model):
    before = state_fingerprint(model)
    w = model.get_parameter(PARAM).detach().clone()
    # deltas W then 2W: 2W, 4W and the differences back are exact in float, so both reverts are bit-exact
    p1 = Patch.create(method="t", kind=PatchKind.WEIGHT_DELTA, model=model, tensors={f"delta/{PARAM}": w})
    p1.apply(model)
    p2 = Patch.create(method="t", kind=PatchKind.WEIGHT_DELTA, model=model, tensors={f"delta/{PARAM}": 2 * w})
    p2.apply(model)
    with pytest.raises(PatchError, match=f"does not hold patch {p1.patch_id}"):
        p1.revert_from_file(model)
    assert p2.revert_from_file(model)[PARAM]["exact"] and p1.revert_from_file(model)[PARAM]["exact"]
    assert state_fingerprint(model) == before


def test_revert_from_file_after_an_inexact_revert_refuses_the_parent():
    """Fingerprints verify bit for bit: once a revert is inexact, the parent's revert from its file is
    refused (revert chains with the handles of apply, which restore saved copies)."""
    model = tiny_model("llama", dtype=torch.bfloat16)[0]
    p1 = dense_patch(model, scale=3.0, seed=1)
    p1.apply(model)
    p2 = dense_patch(model, scale=3.0, seed=2)
    p2.apply(model)
    assert not p2.revert_from_file(model)[PARAM]["exact"]
    after = state_fingerprint(model)
    with pytest.raises(PatchError, match="differ from both"):
        p1.revert_from_file(model)
    assert state_fingerprint(model) == after


def test_post_fingerprint_is_what_apply_writes():

    model = tiny_model("llama", dtype=torch.bfloat16)[0]
    for patch in (dense_patch(model, scale=3.0), lowrank_patch(model)):
        with patch.applied(model):
            assert patch.post_fingerprints() == {PARAM: tensor_fingerprint(model.get_parameter(PARAM))}


# -- tied weights (issue 15, defect 5) ---------------------------------------------------------------------

WTE, HEAD = "transformer.wte.weight", "lm_head.weight"


def tied_patch(model) -> Patch:
    """A patch naming both tied weights, built by hand (Patch.create refuses it)."""
    delta = torch.full_like(model.get_parameter(WTE), 0.25)
    single = Patch.create(method="t", kind=PatchKind.WEIGHT_DELTA, model=model, tensors={f"delta/{WTE}": delta})
    meta = dict(single.metadata)
    for key in ("fingerprints", "post_fingerprints"):
        if key in meta:
            meta[key] = {**meta[key], HEAD: meta[key][WTE]}
    patch = Patch({f"delta/{WTE}": delta, f"delta/{HEAD}": delta.clone()}, meta)
    patch.metadata["patch_id"] = patch.content_id()
    return patch


def test_patch_naming_tied_weights_is_refused_before_anything_changes():
    model = tiny_model("gpt2")[0]
    assert model.get_parameter(WTE) is model.get_parameter(HEAD)
    before = state_fingerprint(model)
    delta = torch.full_like(model.get_parameter(WTE), 0.25)
    with pytest.raises(PatchError, match="share storage"):
        Patch.create(
            method="t",
            kind=PatchKind.WEIGHT_DELTA,
            model=model,
            tensors={f"delta/{WTE}": delta, f"delta/{HEAD}": delta.clone()},
        )
    assert state_fingerprint(model) == before


def test_hand_built_patch_naming_tied_weights_is_refused_at_apply_and_revert():
    model = tiny_model("gpt2")[0]
    before = state_fingerprint(model)
    patch = tied_patch(model)
    with pytest.raises(PatchError, match=f"changes {WTE!r} and {HEAD!r}, which share storage"):
        patch.apply(model)
    assert state_fingerprint(model) == before and stack(model) == []
    with pytest.raises(PatchError, match="share storage"):
        patch.revert_from_file(model)
    assert state_fingerprint(model) == before


@pytest.mark.parametrize("param", [WTE, HEAD])
def test_patch_on_one_of_two_tied_weights_reverts_bit_exactly(param):
    model = tiny_model("gpt2")[0]
    before = state_fingerprint(model)
    patch = dense_patch(model, scale=0.3, param=param)
    handle = patch.apply(model)
    assert torch.equal(model.get_parameter(WTE), model.get_parameter(HEAD))
    assert state_fingerprint(model) != before
    handle.revert()
    assert state_fingerprint(model) == before


# -- where module-state patches attach (issue 15, defect 4) ------------------------------------------------


class HookMethod(EditMethod):
    """A module-state method that adds its state vector to the output of each MLP down projection it names."""

    name = "hook-test"
    kind = PatchKind.MODULE_STATE
    wraps = "mlp_out"
    attached: ClassVar[list[str]] = []

    def compute_edit(self, *a, **k):  # pragma: no cover - the tests build patches by hand
        raise AssertionError

    def attach(self, target, patch):
        handles = []
        for path in patch.metadata["modules"]:
            shift = patch.state()[f"{path}/shift"]
            handles.append(target.model.get_submodule(path).register_forward_hook(lambda m, i, o, s=shift: o + s))
            self.attached.append(path)
        return lambda: [h.remove() for h in handles]


class MemoryMethod(HookMethod):
    name = "memory-test"
    kind = PatchKind.MEMORY
    wraps = None

    def attach(self, target, patch):
        return lambda: None


@pytest.fixture()
def hook_plugin():
    from kedit_core.hookspecs import hookimpl
    from kedit_core.testing import plugin_registered

    class Plugin:
        @hookimpl
        def register_methods(self, register):
            register(HookMethod)
            register(MemoryMethod)

    HookMethod.attached.clear()
    with plugin_registered(Plugin(), "hook-test"):
        yield


MLP_OUT = "model.layers.1.mlp.down_proj"


def module_patch(model, module=MLP_OUT, params=None, method="hook-test"):
    params = params if params is not None else [f"{module}.weight"]
    return Patch.create(
        method=method,
        kind=PatchKind.MODULE_STATE,
        model=model,
        modules=[module],
        tensors={f"state/{module}/shift": torch.full((32,), 0.5)},
        fingerprint_params=params,
    )


def test_module_state_patch_attaches_to_its_module(model, hook_plugin):
    with module_patch(model).applied(model):
        assert HookMethod.attached == [MLP_OUT]


@pytest.mark.parametrize(
    "target",
    [
        "model.layers.2.mlp.down_proj",
        "model.norm",
        "lm_head",
        "",
        "model.layers.1.mlp",
        "model.layers.9.mlp.down_proj",
        "model.layers.1.mlp.down_proj.weight",
    ],
)
def test_module_state_patch_edited_to_another_module_is_refused(model, hook_plugin, target):
    genuine = module_patch(model)
    patch = forged(Patch({f"state/{target}/shift": torch.full((32,), 0.5)}, dict(genuine.metadata)), modules=[target])
    before = state_fingerprint(model)
    with pytest.raises(PatchError, match="wrap"):
        patch.apply(model)
    assert HookMethod.attached == [] and stack(model) == [] and state_fingerprint(model) == before
    assert not model.get_submodule(MLP_OUT)._forward_hooks


def test_module_state_patch_must_wrap_exactly_the_modules_it_fingerprints(model, hook_plugin):
    other = "model.layers.2.mlp.down_proj.weight"
    for params in ([other], [f"{MLP_OUT}.weight", other], ["model.layers.1.input_layernorm.weight"]):
        with pytest.raises(PatchError, match="fingerprint"):
            module_patch(model, params=params).apply(model)
    genuine = module_patch(model)
    fps = genuine.metadata["fingerprints"]
    moved = forged(genuine, fingerprints={other: tensor_fingerprint(model.get_parameter(other))})
    for patch in (
        moved,
        forged(genuine, fingerprints={**fps, other: tensor_fingerprint(model.get_parameter(other))}),
        forged(genuine, modules=[MLP_OUT, MLP_OUT]),
    ):
        with pytest.raises(PatchError):
            patch.apply(model)
    assert HookMethod.attached == [] and stack(model) == []


def test_method_that_declares_no_wrapped_role_cannot_attach_module_state(model, hook_plugin, monkeypatch):
    monkeypatch.setattr(HookMethod, "wraps", None)
    with pytest.raises(PatchError, match="declares no wrapped module"):
        module_patch(model).apply(model)
    assert HookMethod.attached == [] and stack(model) == []


def test_memory_patch_that_wraps_nothing_still_applies(model, hook_plugin):
    patch = Patch.create(
        method="memory-test",
        kind=PatchKind.MEMORY,
        model=model,
        tensors={"state/memory/keys": torch.zeros(2, 3)},
        fingerprint_params=[PARAM],
    )
    with patch.applied(model):
        assert len(stack(model)) == 1
    assert stack(model) == []


def test_attach_that_raises_leaves_nothing_on_the_stack(model, hook_plugin, monkeypatch):
    def boom(self, target, patch):
        raise PatchError("refused by the plugin")

    monkeypatch.setattr(HookMethod, "attach", boom)
    with pytest.raises(PatchError, match="refused by the plugin"):
        module_patch(model).apply(model)
    assert stack(model) == []


def test_state_groups_read_back_what_the_edit_gave():
    from kedit_core.edit import Edit

    model, _ = tiny_model("llama")
    edit = Edit(
        state={
            "model.layers.1.mlp.down_proj": {"keys": torch.ones(2, 3), "radii": torch.ones(2)},
            "memory": {"keys": torch.zeros(1, 4)},
        }
    )
    patch = Patch.create(method="t", kind=PatchKind.MEMORY, model=model, tensors=edit.tensors())
    groups = patch.state_groups()
    assert set(groups) == {"model.layers.1.mlp.down_proj", "memory"}
    assert torch.equal(groups["memory"]["keys"], torch.zeros(1, 4))
    keys, radii = patch.require_state("model.layers.1.mlp.down_proj", "keys", "radii")
    assert keys.shape == (2, 3) and radii.shape == (2,)
    with pytest.raises(PatchError, match="lacks tensor state/memory/values"):
        patch.require_state("memory", "keys", "values")
