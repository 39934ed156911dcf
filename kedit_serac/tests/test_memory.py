"""Memory routing on tiny models: in-scope rows read the edit's context, others are untouched;
every path (model(...), base_model + lm_head, generate) is routed; removal is exact."""

from __future__ import annotations

import pytest
import torch

from kedit_core.architecture import resolve_architecture
from kedit_core.errors import PatchError
from kedit_core.method import EditContext
from kedit_core.ops.logits import logits_at
from kedit_core.ops.tokens import encode_pairs
from kedit_core.patch import STACK_ATTR, Patch, stack
from kedit_core.plugins import get_method
from kedit_core.testing import state_fingerprint, tiny_model, tiny_requests
from kedit_serac.memory import ROUTER_ATTR, Memory, attach_memory
from kedit_serac.serac import SERAC

IN_SCOPE = "The Eiffel Tower is located in the city of"
OUT_OF_SCOPE = "Toyota is a company headquartered in"


@pytest.fixture(scope="module", params=["llama", "gemma3", "gpt2"])
def tiny(request):
    return tiny_model(request.param)


def fixed_memory(context: str, scope: str) -> Memory:
    """A memory whose scope rule is a substring test (isolates routing from the classifier)."""
    return Memory([context], lambda texts: [(0, 1.0) if scope in t else None for t in texts])


def logits(model, tok, text):
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt")).logits[0]


def test_in_scope_rows_read_the_context_and_others_are_untouched(tiny):
    model, tok = tiny
    context = "Rome is where the Eiffel Tower is.\n"
    base_in, base_out = logits(model, tok, IN_SCOPE), logits(model, tok, OUT_OF_SCOPE)
    ctx, row = tok(context)["input_ids"], tok(IN_SCOPE)["input_ids"]
    has_bos = row[0] == tok.bos_token_id
    seq = ctx + row[1:] if has_bos else ctx + row  # the row's ids follow the context's ids
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([seq])).logits[0]
    detach = attach_memory(model, tok, fixed_memory(context, "Eiffel"))
    try:
        routed_in, routed_out = logits(model, tok, IN_SCOPE), logits(model, tok, OUT_OF_SCOPE)
    finally:
        detach()
    assert torch.equal(routed_out, base_out)
    assert not torch.allclose(routed_in, base_in)
    start = len(ctx) - 1 if has_bos else len(ctx)
    torch.testing.assert_close(routed_in, expected[start:], atol=1e-5, rtol=1e-5)


def test_teacher_forced_scoring_path_is_routed_in_a_padded_batch(tiny):
    model, tok = tiny
    enc = encode_pairs(tok, [OUT_OF_SCOPE, IN_SCOPE], ["Japan", "Rome"])
    rows, cols = enc.target_positions()
    base = logits_at(model, enc.input_ids, enc.attention_mask, rows, cols)
    detach = attach_memory(model, tok, fixed_memory("Rome is where the Eiffel Tower is.\n", "Eiffel"))
    try:
        routed = logits_at(model, enc.input_ids, enc.attention_mask, rows, cols)
        with torch.no_grad():
            full = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits[rows, cols]
    finally:
        detach()
    first = rows == 0
    assert torch.equal(routed[first], base[first])
    assert not torch.allclose(routed[~first], base[~first])
    torch.testing.assert_close(full, routed, atol=1e-5, rtol=1e-5)


def test_generate_is_routed_and_restored(tiny):
    model, tok = tiny
    enc = tok(IN_SCOPE, return_tensors="pt")
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    before = model.generate(**enc, **kw)
    context = "Rome Rome Rome Rome.\n"
    ctx, row = tok(context)["input_ids"], enc["input_ids"][0].tolist()
    seq = torch.tensor([ctx + row[1:] if row[0] == tok.bos_token_id else ctx + row])
    expected = model.generate(input_ids=seq, attention_mask=torch.ones_like(seq), **kw)[0, seq.shape[1] :]
    detach = attach_memory(model, tok, fixed_memory(context, "Eiffel"))
    try:
        during = model.generate(**enc, **kw)[0, enc["input_ids"].shape[1] :]
    finally:
        detach()
    assert during.tolist() == expected.tolist()
    assert torch.equal(model.generate(**enc, **kw), before)


def test_generate_decides_the_scope_on_the_prompt(tiny):
    """A prompt out of scope is continued by the base model alone, even where its continuation comes to
    name the edit (the scope is decided once per generate call, on the prompts)."""
    model, tok = tiny
    enc = tok(OUT_OF_SCOPE, return_tensors="pt")
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    before = model.generate(**enc, **kw)
    continuation = tok.decode(before[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    trigger = next(w for w in continuation.split() if w not in OUT_OF_SCOPE)  # named only once generated
    seen: list[list[str]] = []

    def route(texts):
        seen.append(list(texts))
        return [(0, 1.0) if trigger in t else None for t in texts]

    detach = attach_memory(model, tok, Memory(["Rome Rome Rome Rome.\n"], route))
    try:
        during = model.generate(**enc, **kw)
        decisions = len(seen)
        routed = logits(model, tok, tok.decode(before[0], skip_special_tokens=True))
    finally:
        detach()
    assert torch.equal(during, before)
    assert decisions == 1  # one scope decision for the whole call
    assert not torch.allclose(
        routed, logits(model, tok, tok.decode(before[0], skip_special_tokens=True))
    )  # a forward is routed


def test_a_memory_stop_ends_routed_rows_only(tiny):
    """A stop text ends a routed row's continuation right where it appears (a prefix of the run without
    it); a row out of scope in the same batch runs to its budget, exactly as the base model's."""
    model, tok = tiny
    side = tok.padding_side
    tok.padding_side = "left"
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    enc = tok([IN_SCOPE, OUT_OF_SCOPE], return_tensors="pt", padding=True)
    n = enc["input_ids"].shape[1]
    context = "Rome Rome Rome Rome.\n"
    try:
        base = model.generate(**enc, **kw)[:, n:]
        detach = attach_memory(model, tok, fixed_memory(context, "Eiffel"))
        try:
            free = model.generate(**enc, **kw)[:, n:]
        finally:
            detach()
        # the first new token (after the first) whose text was not yet written: the row must end with it
        j = next(j for j in range(1, 8) if tok.decode(free[0, j]) not in tok.decode(free[0, :j]))
        stop = tok.decode(free[0, j])
        memory = Memory([context], fixed_memory(context, "Eiffel").route, (stop,))
        detach = attach_memory(model, tok, memory)
        try:
            stopped = model.generate(**enc, **kw)[:, n:]
        finally:
            detach()
    finally:
        tok.padding_side = side
    assert stopped[0, : j + 1].tolist() == free[0, : j + 1].tolist()
    assert set(stopped[0, j + 1 :].tolist()) <= {tok.pad_token_id}  # nothing written after the stop
    assert stopped[1].tolist() == base[1].tolist() == free[1].tolist()  # out of scope: the base model, full budget


def test_detach_is_exact_and_lifo(tiny):
    model, tok = tiny
    keys_before = set(model.__dict__)
    hooks_before = dict(model.base_model._forward_hooks)
    fp = state_fingerprint(model)
    d1 = attach_memory(model, tok, fixed_memory("A.\n", "Eiffel"))
    d2 = attach_memory(model, tok, fixed_memory("B.\n", "Toyota"))
    assert "generate" in model.__dict__ and ROUTER_ATTR in model.__dict__
    with pytest.raises(Exception, match="last-in-first-out"):
        d1()
    d2()
    d1()
    assert set(model.__dict__) == keys_before
    assert dict(model.base_model._forward_hooks) == hooks_before
    assert state_fingerprint(model) == fp


def test_serac_scope_classifier_routes_edit_and_rephrase_not_locality(tiny, tmp_path):
    model, tok = tiny
    req = tiny_requests()[0]
    method = SERAC()
    hp = method.load_hparams({"n_demonstrations": 0})
    patch = method.compute_patch(model, tok, [req], hp, resolve_architecture(model), EditContext(cache_dir=tmp_path))
    base_rephrase = logits(model, tok, req.rephrase_prompts[0])
    base_loc = logits(model, tok, req.locality[0].prompt)
    loaded = Patch.load(patch.save(tmp_path / "serac.kedit.safetensors"))
    with loaded.applied(model, tokenizer=tok):
        assert not torch.allclose(logits(model, tok, req.rephrase_prompts[0]), base_rephrase)
        assert torch.equal(logits(model, tok, req.locality[0].prompt), base_loc)
    assert loaded.metadata["extra"]["checkpoint"]["id"]
    assert loaded.kind.value == "memory"


@pytest.mark.parametrize("method_name", ["serac", "ike"])
def test_a_memory_patch_applied_without_the_tokenizer_is_one_line_and_changes_nothing(method_name, pool_file, tmp_path):
    # before: a module-global tokenizer binding made at edit time, or a guess from the model's name_or_path
    model, tok = tiny_model("llama")
    method = get_method(method_name)
    hp = method.load_hparams({"n_demonstrations": 0} if method_name == "serac" else {"k": 2, "pool": str(pool_file)})
    patch = method.compute_patch(
        model, tok, tiny_requests()[:1], hp, resolve_architecture(model), EditContext(cache_dir=tmp_path)
    )
    keys, hooks, fp = set(model.__dict__), dict(model.base_model._forward_hooks), state_fingerprint(model)
    with pytest.raises(PatchError) as err:
        Patch.load(patch.save(tmp_path / "p.kedit.safetensors")).apply(model)
    message = str(err.value)
    assert "\n" not in message and "tokenizer" in message and "patch.apply(model, tokenizer=tok)" in message
    assert ROUTER_ATTR not in model.__dict__ and "generate" not in model.__dict__
    assert set(model.__dict__) - keys <= {STACK_ATTR} and not stack(model)
    assert dict(model.base_model._forward_hooks) == hooks and state_fingerprint(model) == fp
    with patch.applied(model, tokenizer=tok):  # with it, the same patch applies
        assert ROUTER_ATTR in model.__dict__
