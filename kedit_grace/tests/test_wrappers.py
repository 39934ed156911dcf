"""GRACE's adaptor and MELO's routed LoRA bank, built by hand on tiny models."""

from __future__ import annotations

import torch

from kedit_core.architecture import get_module, resolve_architecture
from kedit_core.ops.tokens import encode_pairs, encode_prompts
from kedit_core.testing import tiny_model
from kedit_grace.grace.adaptor import GraceAdaptor
from kedit_grace.keys import last_token_input
from kedit_grace.melo.lora import MeloLoRA
from kedit_grace.melo.router import MeloRouter
from kedit_grace.wrapping import install

PROMPT, TARGET = "The Eiffel Tower is located in the city of", "Rome"
FAR = "Michael Jordan plays the sport of"


def capture(module):
    seen = {}

    def hook(mod, args, output):
        seen["in"], seen["out"] = args[0].detach(), output.detach()

    return seen, module.register_forward_hook(hook)


def test_grace_codebook_answers_its_span_from_the_hit_and_defers_elsewhere():
    model, tok = tiny_model("llama")
    arch = resolve_architecture(model)
    path = arch.layer_path(2, arch.mlp_out)
    layer = get_module(model, path)
    ids, _, lens = encode_prompts(tok, [PROMPT])
    key = last_token_input(model, tok, layer, PROMPT)[None]
    value = torch.full((1, layer.weight.shape[0]), 3.0)
    span = 2
    adaptor = GraceAdaptor(layer, key, value, torch.tensor([0.01]), [TARGET], "euclidean", spans=torch.tensor([span]))
    uninstall = install(model, {path: adaptor})
    try:
        seen, handle = capture(adaptor)
        enc = encode_pairs(tok, [PROMPT], [TARGET + " and then some more words"])
        with torch.no_grad():
            model(input_ids=enc.input_ids)
        base_out = layer(seen["in"])
        last = lens[0] - 1
        assert seen["out"].shape[1] > last + span + 2
        assert torch.equal(seen["out"][0, :last], base_out[0, :last])  # before the hit: the layer
        hit = seen["out"][0, last : last + span]
        assert torch.equal(hit, value.expand_as(hit))  # prompt end + the answer's positions
        assert torch.equal(seen["out"][0, last + span :], base_out[0, last + span :])  # after it: the layer
        far_ids, _, _ = encode_prompts(tok, [FAR])
        with torch.no_grad():
            model(input_ids=far_ids)
        assert torch.equal(seen["out"], layer(seen["in"]))  # no key within reach: unchanged
        handle.remove()
    finally:
        uninstall()
    assert get_module(model, path) is layer


def test_melo_lora_block_applies_only_where_routed_on_conv1d():
    model, tok = tiny_model("gpt2")
    arch = resolve_architecture(model)
    path = arch.layer_path(2, arch.mlp_out)
    layer = get_module(model, path)
    out_dim, in_dim = arch.weight(model, f"{path}.weight").shape
    attn = get_module(model, arch.layer_path(2, arch.attn))
    ids, _, lens = encode_prompts(tok, [PROMPT])
    key = last_token_input(model, tok, attn, PROMPT)[None]
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, in_dim, generator=gen)
    b = torch.randn(2, out_dim, 3, generator=gen)
    router = MeloRouter(key, torch.tensor([0.01]), torch.tensor([1]), "cosine")
    lora = MeloLoRA(layer, a, b, 0.5, router)
    uninstall = install(model, {path: lora})
    router.attach_to(attn)
    try:
        seen, handle = capture(lora)
        with torch.no_grad():
            model(input_ids=ids)
        x, last = seen["in"][0], lens[0] - 1
        expected = layer(x)
        expected[last:] += 0.5 * (x[last:] @ a[1].T) @ b[1].T
        torch.testing.assert_close(seen["out"][0], expected)
        assert torch.equal(seen["out"][0, :last], layer(x)[:last])
        far_ids, _, _ = encode_prompts(tok, [FAR])
        with torch.no_grad():
            model(input_ids=far_ids)
        assert torch.equal(seen["out"], layer(seen["in"]))
        handle.remove()
    finally:
        router.detach()
        uninstall()
    assert get_module(model, path) is layer


def test_wrapper_keeps_parameter_paths_and_follows_device_moves():
    model, _ = tiny_model("gemma3")
    arch = resolve_architecture(model)
    path = arch.layer_path(1, arch.mlp_out)
    layer = get_module(model, path)
    names = [n for n, _ in model.named_parameters()]
    adaptor = GraceAdaptor(
        layer,
        torch.zeros(1, layer.weight.shape[1]),
        torch.zeros(1, layer.weight.shape[0]),
        torch.ones(1),
        ["x"],
        "euclidean",
    )
    uninstall = install(model, {path: adaptor})
    try:
        assert [n for n, _ in model.named_parameters()] == names
        assert model.get_parameter(f"{path}.weight") is layer.weight
        model.to(torch.float64)
        assert layer.weight.dtype == torch.float64 and adaptor.values.dtype == torch.float64
    finally:
        uninstall()


def test_grace_hit_answers_its_span_during_cached_generation_then_defers():
    from kedit_grace.codebook import DecodingState

    model, tok = tiny_model("llama")
    arch = resolve_architecture(model)
    path = arch.layer_path(2, arch.mlp_out)
    layer = get_module(model, path)
    ids, mask, lens = encode_prompts(tok, [PROMPT])
    key = last_token_input(model, tok, layer, PROMPT)[None]
    value = torch.full((1, layer.weight.shape[0]), 3.0)
    adaptor = GraceAdaptor(layer, key, value, torch.tensor([0.01]), [TARGET], "euclidean", spans=torch.tensor([2]))
    adaptor.decoding = DecodingState().attach(model)
    uninstall = install(model, {path: adaptor})
    outputs = []
    handle = adaptor.register_forward_hook(lambda m, a, o: outputs.append((a[0].detach(), o.detach())))
    try:
        with torch.no_grad():
            model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id
            )
        far_ids, far_mask, _ = encode_prompts(tok, [FAR])
        with torch.no_grad():
            model.generate(
                input_ids=far_ids,
                attention_mask=far_mask,
                max_new_tokens=2,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
    finally:
        handle.remove()
        uninstall()
        adaptor.decoding.detach()
    (_, first), *steps = outputs[:5]
    assert torch.equal(first[0, -1], value[0]) and first.shape[1] == lens[0]
    assert steps[0][1].shape[1] == 1 and torch.equal(steps[0][1][0, 0], value[0])  # the answer's 2nd token
    assert all(torch.equal(o[0, 0], layer(x)[0, 0]) for x, o in steps[1:])  # then the layer again
    assert not any(torch.equal(o[0, -1], value[0]) for _, o in outputs[5:])  # a new prompt starts fresh
