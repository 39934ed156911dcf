"""A GRACE (or MELO) edit answers the edited prompt and lets generation go on (issue 16): the codebook's value
replaces the layer's output at the positions that predict the answer -- the prompt's last token and
the answer's own tokens, generated from the KV cache -- and nowhere after them."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY_HPARAMS, generation_calls

from kedit_core.architecture import get_module, resolve_architecture
from kedit_core.editor import Editor
from kedit_core.errors import PatchError
from kedit_core.method import EditContext
from kedit_core.ops.tokens import encode_prompts, split_prompt_target
from kedit_core.patch import Patch
from kedit_core.plugins import get_registry
from kedit_core.testing import tiny_model, tiny_requests
from kedit_grace.grace.adaptor import GraceAdaptor
from kedit_grace.melo.lora import MeloLoRA


def test_grace_edit_forces_only_the_answer_during_generation():
    model, tok = tiny_model("llama")
    editor = Editor(get_registry().method("grace"), model, tok, hparams=TINY_HPARAMS["grace"])
    request = tiny_requests()[0]
    result = editor.edit([request], keep_original_weight=False, evaluate=False)
    try:
        adaptor = get_module(model, result.patches[0].metadata["modules"][0])
        assert isinstance(adaptor, GraceAdaptor)
        answer = len(split_prompt_target(tok, request.prompt, request.target_new)[1])
        calls = generation_calls(model, tok, adaptor, request.prompt, answer + 4)
        # one forward per generated token; each ends at the position that predicts the next one
        assert len(calls) == answer + 4 and all(o.shape[1] == 1 for _, o in calls[1:])
        value = adaptor.values[0]
        forced = [torch.equal(o[0, -1], value.to(o.dtype)) for _, o in calls]
        assert forced == [True] * answer + [False] * 4
        assert all(torch.equal(o[0, -1], adaptor.base(x)[0, -1]) for x, o in calls[answer:])
        # the patch records the span, so a patch applied in another process behaves the same
        assert adaptor.spans.tolist() == [answer] == result.patches[0].metadata["extra"]["spans"]
    finally:
        editor.restore(result)


def test_patch_without_spans_gets_them_from_the_tokenizer_or_is_refused():
    model, tok = tiny_model("llama")
    method = get_registry().method("grace")
    request = tiny_requests()[0]
    hparams = method.load_hparams(TINY_HPARAMS["grace"])
    patch = method.compute_patch(model, tok, [request], hparams, resolve_architecture(model), EditContext())
    meta = dict(patch.metadata)
    meta["extra"] = {k: v for k, v in meta["extra"].items() if k != "spans"}  # as written before issue 16
    old = Patch(dict(patch.tensors), meta)
    old.metadata["patch_id"] = old.content_id()
    path = patch.metadata["modules"][0]
    with pytest.raises(PatchError, match="answer spans.*tokenizer"):
        old.apply(model)
    handle = old.apply(model, tokenizer=tok)
    try:
        assert get_module(model, path).spans.tolist() == patch.metadata["extra"]["spans"]
    finally:
        handle.revert()
    assert not isinstance(get_module(model, path), GraceAdaptor)


def lora_calls_during_generation(model, tok, lora, prompt: str, new_tokens: int) -> list[bool]:
    """For each forward of ``model.generate``: whether the routed LoRA bank changed the layer's output
    at the forward's last position (the one that predicts the next token)."""
    ids, mask, _ = encode_prompts(tok, [prompt])
    calls = []
    handle = lora.register_forward_hook(lambda m, a, o: calls.append((a[0].detach(), o.detach())))
    try:
        with torch.no_grad():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
    finally:
        handle.remove()
    assert len(calls) == new_tokens and all(o.shape[1] == 1 for _, o in calls[1:])
    return [not torch.equal(o[0, -1], lora.base(x)[0, -1]) for x, o in calls]


def test_melo_block_serves_only_the_answer_during_generation():
    model, tok = tiny_model("llama")
    editor = Editor(get_registry().method("melo"), model, tok, hparams=TINY_HPARAMS["melo"])
    request = tiny_requests()[0]
    result = editor.edit([request], keep_original_weight=False, evaluate=False)
    try:
        patch = result.patches[0]
        lora = get_module(model, patch.metadata["modules"][0])
        assert isinstance(lora, MeloLoRA)
        answer = len(split_prompt_target(tok, request.prompt, request.target_new)[1])
        # held for the rest of the sequence (before issue 16) this read [True] * (answer + 4)
        assert (
            lora_calls_during_generation(model, tok, lora, request.prompt, answer + 4) == [True] * answer + [False] * 4
        )
        assert lora.router.spans.tolist() == [answer] == patch.metadata["extra"]["spans"]
    finally:
        editor.restore(result)


def test_melo_sequential_patch_keeps_every_span_and_old_patches_derive_them():
    model, tok = tiny_model("llama")
    method = get_registry().method("melo")
    hparams = method.load_hparams(TINY_HPARAMS["melo"])
    arch = resolve_architecture(model)
    first, second = tiny_requests()[:2]
    p1 = method.compute_patch(model, tok, [first], hparams, arch, EditContext())
    with p1.applied(model, tokenizer=tok):
        p2 = method.compute_patch(model, tok, [second], hparams, arch, EditContext())
    spans = [len(split_prompt_target(tok, r.prompt, r.target_new)[1]) for r in (first, second)]
    assert p2.metadata["extra"]["spans"] == spans
    meta = dict(p2.metadata)
    meta["extra"] = {k: v for k, v in meta["extra"].items() if k != "spans"}  # as written before issue 16
    old = Patch(dict(p2.tensors), meta)
    old.metadata["patch_id"] = old.content_id()
    path = p2.metadata["modules"][0]
    with pytest.raises(PatchError, match="answer spans.*tokenizer"):
        old.apply(model)
    handle = old.apply(model, tokenizer=tok)
    try:
        lora = get_module(model, path)
        assert lora.router.spans.tolist() == spans
        answer = spans[1]
        assert (
            lora_calls_during_generation(model, tok, lora, second.prompt, answer + 3) == [True] * answer + [False] * 3
        )
    finally:
        handle.revert()
    assert not isinstance(get_module(model, path), MeloLoRA)
