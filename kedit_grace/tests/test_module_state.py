"""The module-state contract of GRACE and MELO on tiny models: wrapping, reverting to the original
module objects, sequential chains, reproduction from the final patch alone, validation."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY_HPARAMS, UNRELATED, logits, three_requests

from kedit_core.architecture import get_module, resolve_architecture
from kedit_core.editor import Editor
from kedit_core.errors import PatchError
from kedit_core.method import EditContext
from kedit_core.patch import Patch
from kedit_core.plugins import Registry
from kedit_core.testing import state_fingerprint, tiny_model
from kedit_grace.wrapping import ModuleWrapper

METHODS = ("grace", "melo")


@pytest.fixture(scope="module")
def registry():
    return Registry(autoload=True).load()


def wrapped_paths(patch: Patch) -> list[str]:
    return list(patch.metadata["modules"])


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
@pytest.mark.parametrize("name", METHODS)
def test_sequential_chain_reverts_lifo_and_final_patch_reproduces(registry, name, family, tmp_path):
    model, tok = tiny_model(family)
    before = logits(model, tok)
    unrelated = logits(model, tok, UNRELATED)
    fingerprints = state_fingerprint(model)
    editor = Editor(registry.method(name), model, tok, hparams=TINY_HPARAMS[name])
    result = editor.edit(three_requests(), sequential=True, keep_original_weight=False, evaluate=False)
    # each patch carries the whole state: the run keeps only the newest, applied alone
    (final,) = result.patches
    assert final.parent is not None and len(result.handles) == 1
    assert final.metadata["extra"]["supersedes"] == final.parent
    paths = wrapped_paths(final)
    originals = {p: get_module(model, p).base for p in paths}
    assert not any(isinstance(m, ModuleWrapper) for m in originals.values())  # no nested superseded wrapper
    edited = logits(model, tok)
    assert not torch.equal(edited, before)
    assert torch.equal(logits(model, tok, UNRELATED), unrelated)  # far from every key: deferred
    assert set(model.state_dict()) == set(fingerprints)  # wrapping adds no checkpoint keys
    editor.restore(result)
    assert all(get_module(model, p) is originals[p] for p in paths)
    assert torch.equal(logits(model, tok), before)
    assert state_fingerprint(model) == fingerprints

    # applied by hand, a chain reverts LIFO: reverting the last patch puts back the one before it
    reqs = three_requests()
    first = editor.compute_patch(reqs[:1])
    h1 = first.apply(model)
    second = editor.compute_patch(reqs[1:2], parent=first)
    h2 = second.apply(model)
    assert all(get_module(model, p).state_id == second.patch_id for p in paths)
    h2.revert()
    assert all(get_module(model, p).state_id == first.patch_id for p in paths)
    h1.revert()
    assert all(get_module(model, p) is originals[p] for p in paths)
    assert state_fingerprint(model) == fingerprints

    # the final patch alone, from its file, on a fresh copy of the unedited model
    path = final.save(tmp_path / "final.kedit.safetensors")
    fresh, _ = tiny_model(family)
    with Patch.load(path).applied(fresh):
        assert torch.equal(logits(fresh, tok), edited)
    assert torch.equal(logits(fresh, tok), before)


@pytest.mark.parametrize("name", METHODS)
def test_compute_patch_leaves_an_applied_wrapper_in_place(registry, name):
    model, tok = tiny_model("llama")
    method = registry.method(name)
    hp = method.load_hparams(TINY_HPARAMS[name])
    arch = resolve_architecture(model)
    reqs = three_requests()
    first = method.compute_patch(model, tok, reqs[:1], hp, arch, EditContext())
    with first.applied(model):
        wrappers = {p: get_module(model, p) for p in wrapped_paths(first)}
        state = state_fingerprint(model)
        second = method.compute_patch(model, tok, reqs[1:2], hp, arch, EditContext())
        assert {p: get_module(model, p) for p in wrappers} == wrappers
        assert state_fingerprint(model) == state
        assert second.metadata["extra"]["supersedes"] == first.patch_id


@pytest.mark.parametrize("name", METHODS)
def test_attach_validates_before_touching_the_model(registry, name):
    model, tok = tiny_model("gemma3")
    method = registry.method(name)
    patch = method.compute_patch(
        model,
        tok,
        three_requests()[:1],
        method.load_hparams(TINY_HPARAMS[name]),
        resolve_architecture(model),
        EditContext(),
    )
    modules = {p: get_module(model, p) for p in wrapped_paths(patch)}
    dropped = Patch(
        {k: v for k, v in patch.tensors.items() if not k.endswith(("/radii", "/lora_b"))}, dict(patch.metadata)
    )
    dropped.metadata["patch_id"] = dropped.content_id()
    bad_shape = Patch(
        {k: (v[..., :-1] if k.endswith(("/keys", "/lora_a")) else v) for k, v in patch.tensors.items()},
        dict(patch.metadata),
    )
    bad_shape.metadata["patch_id"] = bad_shape.content_id()
    for broken in (dropped, bad_shape):
        with pytest.raises(PatchError):
            broken.apply(model)
        assert {p: get_module(model, p) for p in modules} == modules


def test_independent_patches_nest_instead_of_superseding(registry):
    """Two GRACE patches computed on the unedited model both stay in force when stacked."""
    model, tok = tiny_model("llama")
    method = registry.method("grace")
    hp = method.load_hparams(TINY_HPARAMS["grace"])
    arch = resolve_architecture(model)
    reqs = three_requests()
    a = method.compute_patch(model, tok, reqs[:1], hp, arch, EditContext())
    b = method.compute_patch(model, tok, reqs[2:3], hp, arch, EditContext())
    with a.applied(model):
        only_a = logits(model, tok)
    with a.applied(model), b.applied(model):
        path = wrapped_paths(b)[0]
        outer = get_module(model, path)
        assert outer.base.state_id == a.patch_id
        both = logits(model, tok)
    with b.applied(model):
        only_b = logits(model, tok)
    # requests 0 and 2 sit in rows 0 and 4 of the probe batch: each keeps its own patch's answer
    assert torch.equal(both[0], only_a[0]) and torch.equal(both[4], only_b[4])


def test_grace_expand_refits_the_entry_on_all_its_prompts(registry):
    model, tok = tiny_model("llama")
    method = registry.method("grace")
    hp = method.load_hparams({**TINY_HPARAMS["grace"], "eps_init": 10.0})
    arch = resolve_architecture(model)
    first, third = three_requests()[0], three_requests()[2]
    same_answer = third.model_copy(update={"target_new": first.target_new})
    a = method.compute_patch(model, tok, [first], hp, arch, EditContext())
    with a.applied(model):
        b = method.compute_patch(model, tok, [same_answer], hp, arch, EditContext())
    extra = b.metadata["extra"]
    assert extra["action"] == "expand" and extra["entries"] == 1
    assert extra["prompts"] == [[first.prompt, same_answer.prompt]]
    with b.applied(model):
        assert len(get_module(model, wrapped_paths(b)[0])) == 1


class _Interrupted(Exception):
    """Ends an editing run between chunks, as a crash or Ctrl-C would (not a forward-pass stop)."""


@pytest.mark.parametrize("name", METHODS)
def test_interrupted_sequential_run_resumes_from_its_newest_patch(registry, name, tmp_path):
    """A resumable run keeps only the newest patch (each carries the whole state) and ends where an
    uninterrupted run ends."""

    def run(**kw):
        model, tok = tiny_model("llama")
        editor = Editor(registry.method(name), model, tok, hparams=TINY_HPARAMS[name])
        result = editor.edit(three_requests(), sequential=True, keep_original_weight=False, **kw)
        return result, logits(model, tok)

    straight, straight_logits = run()

    def stop(done, result):
        if done == 2:
            raise _Interrupted

    with pytest.raises(_Interrupted):
        run(run_dir=tmp_path, on_chunk=stop)
    assert [p.name for p in (tmp_path / "patches").iterdir()] == ["000002.kedit.safetensors"]
    resumed, resumed_logits = run(run_dir=tmp_path)
    assert torch.equal(resumed_logits, straight_logits)
    assert resumed.post_final == straight.post_final
    assert [p.name for p in (tmp_path / "patches").iterdir()] == ["000003.kedit.safetensors"]


def test_superseding_patch_that_fails_to_apply_puts_the_previous_back(registry, monkeypatch):
    model, tok = tiny_model("llama")
    editor = Editor(registry.method("grace"), model, tok, hparams=TINY_HPARAMS["grace"])
    reqs = three_requests()
    result = editor.edit(reqs[:1], sequential=True, keep_original_weight=False, evaluate=False)
    (first,) = result.patches
    edited = logits(model, tok)
    second = editor.compute_patch(reqs[1:2], parent=first)
    attach = type(editor.method).attach
    calls = []

    def fail_once(self, target, patch):
        calls.append(patch.patch_id)
        if len(calls) == 1:
            raise PatchError("refused")
        return attach(self, target, patch)

    monkeypatch.setattr(type(editor.method), "attach", fail_once)
    with pytest.raises(PatchError, match="refused"):
        editor._apply_sequential(second, result)
    assert calls == [second.patch_id, first.patch_id]
    assert [h.patch.patch_id for h in result.handles] == [first.patch_id]
    assert torch.equal(logits(model, tok), edited)
    editor.restore(result)


def moved(patch: Patch, old: str, new: str, **extra) -> Patch:
    """``patch`` edited by hand to put the state of module ``old`` at ``new``, its id recomputed."""
    meta = dict(patch.metadata)
    meta["modules"] = [new if p == old else p for p in meta["modules"]]
    meta["extra"] = {**meta["extra"], **extra}
    tensors = {k.replace(f"state/{old}/", f"state/{new}/"): v for k, v in patch.tensors.items()}
    forged = Patch(tensors, meta)
    forged.metadata["patch_id"] = forged.content_id()
    return forged


def hooks(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("name", METHODS)
def test_patch_edited_to_wrap_another_module_is_refused(registry, name):
    from kedit_core.patch import stack

    model, tok = tiny_model("llama")
    method = registry.method(name)
    patch = method.compute_patch(
        model,
        tok,
        three_requests()[:1],
        method.load_hparams(TINY_HPARAMS[name]),
        resolve_architecture(model),
        EditContext(),
    )
    modules, before, n_hooks = dict(model.named_modules()), logits(model, tok), hooks(model)
    old = wrapped_paths(patch)[0]
    forgeries = [
        moved(patch, old, new)
        for new in (
            "model.layers.0.mlp.down_proj",
            "model.norm",
            "lm_head",
            "",
            "model.layers.2.mlp",
            "model.layers.7.mlp.down_proj",
        )
    ]
    if name == "melo":
        router = patch.metadata["extra"]["router"]
        forgeries += [
            moved(patch, router, new, router=new) for new in ("model.norm", "lm_head", "model.layers.3.mlp.down_proj")
        ]
    for forged in forgeries:
        with pytest.raises(PatchError, match="wrap|route"):
            forged.apply(model)
        assert stack(model) == [] and dict(model.named_modules()) == modules and hooks(model) == n_hooks
        assert torch.equal(logits(model, tok), before)
    with patch.applied(model):  # the genuine patch still applies
        assert not torch.equal(logits(model, tok), before)
