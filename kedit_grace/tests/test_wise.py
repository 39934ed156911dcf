"""WISE on tiny models: the side memory answers edits, the router leaves everything else on the
unchanged main memory (bit for bit), sequential runs keep every edit, patches round-trip through
safetensors and revert exactly, and cached generation uses the side memory only over an answer."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import TINY_HPARAMS, UNRELATED, generation_calls, logits, three_requests
from safetensors import safe_open

from kedit_core.architecture import get_module, resolve_architecture
from kedit_core.editor import Editor
from kedit_core.errors import PatchError
from kedit_core.method import EditContext
from kedit_core.ops.tokens import encode_pairs, encode_prompts, split_prompt_target
from kedit_core.patch import Patch
from kedit_core.plugins import get_registry
from kedit_core.request import EditRequest
from kedit_core.testing import state_fingerprint, tiny_model, tiny_requests
from kedit_grace.codebook import spread_hits
from kedit_grace.wise.method import IRRELEVANT_PROMPTS
from kedit_grace.wise.routing import activation_scores, active_positions, gradient_mask, routing_loss, threshold
from kedit_grace.wise.side_memory import SideMemory

FAMILIES = ("llama", "gemma3")


def wise_patch(model, tok, requests, **changes) -> Patch:
    method = get_registry().method("wise")
    hparams = method.load_hparams({**TINY_HPARAMS["wise"], **changes})
    return method.compute_patch(model, tok, requests, hparams, resolve_architecture(model), EditContext())


def target_logprob(model, tok, prompt: str, target: str) -> float:
    """``log p(" " + target | prompt)``, teacher-forced."""
    enc = encode_pairs(tok, [prompt], [target])
    with torch.no_grad():
        out = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits[0].float()
    lp = out.log_softmax(-1)
    start = enc.prompt_lens[0] - 1
    return float(sum(lp[start + j, t] for j, t in enumerate(enc.target_ids[0])))


def prompt_logits(model, tok, prompt: str) -> torch.Tensor:
    ids, mask, _ = encode_prompts(tok, [prompt])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def side_memory_positions(model, tok, memory: SideMemory, prompt: str, target: str | None = None) -> list[int]:
    """The positions of one forward (over ``prompt``, or ``prompt + " " + target``) whose output came
    from the side memory (differs from the main memory's)."""
    if target is None:
        ids, mask, _ = encode_prompts(tok, [prompt])
    else:
        enc = encode_pairs(tok, [prompt], [target])
        ids, mask = enc.input_ids, enc.attention_mask
    seen = {}
    handle = memory.register_forward_hook(lambda m, a, o: seen.update(x=a[0].detach(), out=o.detach()))
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        handle.remove()
    main = memory.base(seen["x"])
    return [t for t in range(ids.shape[1]) if not torch.equal(seen["out"][0, t], main[0, t])]


def ten_requests() -> list[EditRequest]:
    """Ten edits whose prompts end in ten different tokens, none of them a token of ``UNRELATED``: in a
    tiny random model a position's activation is mostly its token's, so a router can only tell inputs
    apart by their tokens (a real model's activations carry the context)."""
    facts = [
        ("Lionel Messi plays football for", "Lionel Messi", "Japan"),
        ("Toyota is a company from", "Toyota", "Germany"),
        ("The Eiffel Tower stands near", "The Eiffel Tower", "Rome"),
        ("Michael Jordan plays basketball with", "Michael Jordan", "Paris"),
        ("Danielle Darrieux speaks", "Danielle Darrieux", "Spanish"),
        ("The Louvre museum belongs to", "The Louvre", "Berlin"),
        ("Mount Fuji rises above", "Mount Fuji", "Italy"),
        ("Portuguese is spoken mostly on", "Portuguese", "France"),
        ("Bill Gates founded a company called", "Bill Gates", "Honda"),
        ("The Colosseum is made of stone and", "The Colosseum", "football"),
    ]
    return [EditRequest(prompt=p, subject=s, target_new=t) for p, s, t in facts]


@pytest.mark.parametrize("family", FAMILIES)
def test_edit_raises_the_target_probability_and_routes_at_the_answer(family):
    model, tok = tiny_model(family)
    request = tiny_requests()[0]
    before = target_logprob(model, tok, request.prompt, request.target_new)
    patch = wise_patch(model, tok, [request])
    extra = patch.metadata["extra"]
    assert extra["threshold"] == pytest.approx(0.88 * min(extra["edit_scores"]))
    assert extra["irrelevant_max"] < extra["threshold"]
    with patch.applied(model):
        memory = get_module(model, patch.metadata["modules"][0])
        assert isinstance(memory, SideMemory)
        assert target_logprob(model, tok, request.prompt, request.target_new) > before
        plen = len(split_prompt_target(tok, request.prompt, request.target_new)[0])
        answer = extra["spans"][0]
        # the prompt's last token and the answer's tokens read the side memory; the prompt before it does not
        positions = side_memory_positions(model, tok, memory, request.prompt, request.target_new)
        assert positions[:answer] == list(range(plen - 1, plen - 1 + answer)) and positions[0] == plen - 1


@pytest.mark.parametrize("family", FAMILIES)
def test_unrelated_inputs_run_the_main_memory_bit_identically(family):
    model, tok = tiny_model(family)
    unrelated = logits(model, tok, UNRELATED)
    patch = wise_patch(model, tok, tiny_requests()[:1])
    with patch.applied(model):
        memory = get_module(model, patch.metadata["modules"][0])
        assert torch.equal(logits(model, tok, UNRELATED), unrelated)
        for prompt, target in UNRELATED:
            assert side_memory_positions(model, tok, memory, prompt, target) == []
    assert torch.equal(logits(model, tok, UNRELATED), unrelated)


def test_ten_sequential_edits_all_stay_retrievable(tmp_path):
    """Ten edits one after another: each is still routed and answered at the end. The tiny model's
    activations are 64-dimensional, so its side memory can score high on ten keys and low on only a
    few other inputs: two irrelevant prompts, which must then run the main memory bit for bit (unseen
    text may score like an edit here; the single-edit tests check unseen unrelated inputs)."""
    model, tok = tiny_model("llama")
    requests = ten_requests()
    irrelevant = IRRELEVANT_PROMPTS[:2]
    before = {r.prompt: target_logprob(model, tok, r.prompt, r.target_new) for r in requests}
    unrelated = [prompt_logits(model, tok, p) for p in irrelevant]
    hparams = {**TINY_HPARAMS["wise"], "irrelevant_prompts": irrelevant, "mask_ratio": 1.0}
    editor = Editor(get_registry().method("wise"), model, tok, hparams=hparams)
    result = editor.edit(requests, sequential=True, keep_original_weight=False, evaluate=False)
    try:
        (final,) = result.patches  # each patch carries the whole side memory
        extra = final.metadata["extra"]
        assert extra["edits"] == 10 and len(extra["spans"]) == 10 and extra["supersedes"] == final.parent
        memory = get_module(model, final.metadata["modules"][0])
        assert not isinstance(memory.base, SideMemory)  # superseded, not nested
        for r in requests:
            plen = len(split_prompt_target(tok, r.prompt, r.target_new)[0])
            assert plen - 1 in side_memory_positions(model, tok, memory, r.prompt), r.prompt
            assert target_logprob(model, tok, r.prompt, r.target_new) > before[r.prompt], r.prompt
        for prompt, expected in zip(irrelevant, unrelated, strict=True):
            assert side_memory_positions(model, tok, memory, prompt) == []
            assert torch.equal(prompt_logits(model, tok, prompt), expected)
        edited = logits(model, tok)
        path = final.save(tmp_path / "final.kedit.safetensors")
    finally:
        editor.restore(result)
    fresh, _ = tiny_model("llama")
    with Patch.load(path).applied(fresh):  # the newest patch alone reproduces the run
        assert torch.equal(logits(fresh, tok), edited)


@pytest.mark.parametrize("family", FAMILIES)
def test_patch_saves_as_safetensors_loads_and_reverts_bit_exactly(family, tmp_path):
    model, tok = tiny_model(family)
    fingerprints, before = state_fingerprint(model), logits(model, tok)
    patch = wise_patch(model, tok, tiny_requests()[:1])
    path = patch.save(tmp_path / "wise.kedit.safetensors")
    with safe_open(str(path), framework="pt") as f:  # a plain safetensors file: tensors and string metadata
        names = set(f.keys())
        meta = f.metadata()
    module = patch.metadata["modules"][0]
    assert names == {f"state/{module}/weight", f"state/{module}/keys"}
    assert json.loads(meta["extra"])["threshold"] == patch.metadata["extra"]["threshold"]
    original = get_module(model, module)
    with patch.applied(model):
        edited = logits(model, tok)
    assert not torch.equal(edited, before)
    loaded = Patch.load(path)
    handle = loaded.apply(model)
    try:
        assert torch.equal(logits(model, tok), edited)
    finally:
        handle.revert()
    assert get_module(model, module) is original
    assert state_fingerprint(model) == fingerprints and torch.equal(logits(model, tok), before)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_generation_uses_the_side_memory_only_over_the_answer(family):
    model, tok = tiny_model(family)
    request = tiny_requests()[0]
    patch = wise_patch(model, tok, [request])
    answer = len(split_prompt_target(tok, request.prompt, request.target_new)[1])
    with patch.applied(model):
        memory = get_module(model, patch.metadata["modules"][0])
        calls = generation_calls(model, tok, memory, request.prompt, answer + 4)
        assert len(calls) == answer + 4 and all(o.shape[1] == 1 for _, o in calls[1:])
        side = [not torch.equal(o[0, -1], memory.base(x)[0, -1]) for x, o in calls]
        # the router says no to every generated token after the answer: they run the main memory
        later = torch.stack([x[0, -1] for x, _ in calls[answer:]])
        assert bool((memory.scores(later) <= memory.threshold).all())
        assert side == [True] * answer + [False] * 4


def test_side_memory_changes_only_masked_entries_within_the_norm_bound():
    model, tok = tiny_model("llama")
    hp = {"mask_ratio": 0.3, "norm_constraint": 0.05, "lr": 0.5}
    patch = wise_patch(model, tok, tiny_requests()[:1], **hp)
    module = patch.metadata["modules"][0]
    main = get_module(model, module).weight
    delta = patch.state()[f"{module}/weight"] - main
    mask = gradient_mask(tuple(main.shape), 0.3, 0)
    assert bool((delta[mask == 0] == 0).all()) and bool((delta != 0).any())
    assert float(delta.abs().max()) <= 0.05 + 1e-6
    assert 0.2 < float(mask.mean()) < 0.4


def test_batch_edit_routes_every_request():
    model, tok = tiny_model("llama")
    requests = tiny_requests()
    patch = wise_patch(model, tok, requests)
    assert len(patch.metadata["requests"]) == 2 and patch.metadata["extra"]["edits"] == 2
    with patch.applied(model):
        memory = get_module(model, patch.metadata["modules"][0])
        for r in requests:
            plen = len(split_prompt_target(tok, r.prompt, r.target_new)[0])
            assert plen - 1 in side_memory_positions(model, tok, memory, r.prompt)


def test_attach_refuses_a_broken_patch_before_touching_the_model():
    model, tok = tiny_model("gemma3")
    patch = wise_patch(model, tok, three_requests()[:1])
    module = patch.metadata["modules"][0]
    original = get_module(model, module)

    def forged(tensors=None, **extra):
        meta = dict(patch.metadata)
        meta["extra"] = {**meta["extra"], **extra}
        p = Patch(dict(tensors or patch.tensors), meta)
        p.metadata["patch_id"] = p.content_id()
        return p

    keys = f"state/{module}/keys"
    for broken, match in (
        (forged({**patch.tensors, keys: patch.tensors[keys][:, :-1]}), "do not fit"),
        (forged(spans=[]), "answer spans"),
        (forged(threshold=None), "threshold"),
        (forged({k: v for k, v in patch.tensors.items() if k != keys}), "keys"),
    ):
        with pytest.raises(PatchError, match=match):
            broken.apply(model)
        assert get_module(model, module) is original


def test_routing_loss_threshold_and_spread_hits():
    edit, irr = torch.tensor([25.0, 30.0]), torch.tensor([1.0, 4.0])
    assert float(routing_loss(edit, irr, 5.0, 20.0, 10.0)) == 0.0
    # an irrelevant input above alpha, an edit below beta and too small a gap each cost their excess
    loss = routing_loss(torch.tensor([18.0]), torch.tensor([9.0, 3.0]), 5.0, 20.0, 10.0)
    assert float(loss) == pytest.approx(2.0 + (4.0 + 0.0) / 2 + 1.0)
    assert threshold(edit, 0.88) == pytest.approx(22.0)
    assert threshold(torch.zeros(0), 0.88) == float("inf")
    hit = torch.tensor([[False, True, False, False, False, True, False]])
    entry = torch.tensor([[0, 1, 0, 0, 0, 0, 0]])
    routing = spread_hits(hit, entry, (1, 7), torch.device("cpu"), spans=torch.tensor([1, 3]))
    assert routing.active.tolist() == [[-1, 1, 1, 1, -1, 0, -1]]


def test_routing_loss_on_the_active_positions_equals_it_on_all():
    """Scoring only the positions above alpha (and the highest) gives the whole set's loss and gradient."""
    torch.manual_seed(0)
    keys, others = torch.randn(3, 16), torch.randn(200, 16)
    for scale in (0.05, 0.09):  # (almost) every irrelevant position below alpha; about half above it
        delta = (scale * torch.randn(8, 16)).requires_grad_()
        full = routing_loss(activation_scores(keys, delta), activation_scores(others, delta), 1.0, 2.0, 1.0)
        (g_full,) = torch.autograd.grad(full, delta)
        with torch.no_grad():
            active = active_positions(activation_scores(others, delta), 1.0)
        assert 1 <= len(active) < len(others)
        part = routing_loss(
            activation_scores(keys, delta), activation_scores(others[active], delta), 1.0, 2.0, 1.0, len(others)
        )
        (g_part,) = torch.autograd.grad(part, delta)
        assert float(part.detach()) == pytest.approx(float(full.detach()), rel=1e-6)
        assert torch.allclose(g_part, g_full, atol=1e-6)


def test_irrelevant_inputs_add_model_samples_and_data_locality_prompts(tmp_path):
    """The routing loss's irrelevant inputs: the listed prompts, texts sampled from the model (cached on
    disk, the same on a second edit) and the locality prompts of the data set's last records, leaving
    out any that names a subject being edited."""
    model, tok = tiny_model("llama")
    records = [
        {
            "prompt": f"{s} works in",
            "subject": s,
            "target_new": "Paris",
            "locality_prompt": loc,
            "locality_ground_truth": "x",
        }
        for s, loc in [("Alan Turing", "Ada Lovelace was born in"), ("Ada Lovelace", "Alan Turing was born in")]
        + [("Marie Curie", "The Nile flows into the"), ("Niels Bohr", "Mozart composed music in")]
    ]
    data = tmp_path / "train.json"
    data.write_text(json.dumps(records), encoding="utf-8")
    method = get_registry().method("wise")
    hparams = method.load_hparams(
        {
            **TINY_HPARAMS["wise"],
            "irrelevant_prompts": ["Hello there"],
            "irrelevant_samples": 3,
            "irrelevant_sample_tokens": 4,
            "irrelevant_data": str(data),
            "irrelevant_records": 3,
        }
    )
    ctx = EditContext(cache_dir=tmp_path / "cache", model_fingerprint="fp")
    edit = EditRequest(prompt="Alan Turing was a", subject="Alan Turing", target_new="chef")
    first = method._irrelevant(model, tok, [edit], hparams, ctx)
    assert first[0] == "Hello there" and len(first) == 1 + 3 + 2
    assert first[4:] == ["The Nile flows into the", "Mozart composed music in"]  # the last 3 records, minus Turing
    assert all(isinstance(t, str) and t for t in first[1:4])
    assert len(list((tmp_path / "cache" / "samples" / "fp").glob("*.json"))) == 1
    assert method._irrelevant(model, tok, [edit], hparams, ctx) == first


def test_replay_draws_earlier_edits_reproducibly_and_trains_on_them():
    from kedit_grace.wise.method import WiseHyperparams, replayed

    members = [[f"prompt {i}", f"target {i}"] for i in range(5)]
    hp = WiseHyperparams(replay=3)
    picked = replayed(members, hp)
    assert len(set(picked)) == 3 and picked == replayed(members, hp)
    assert all([p, t] in members for p, t in picked)
    assert replayed(members, WiseHyperparams(replay=10)) == [tuple(m) for m in members]
    assert replayed(members, WiseHyperparams()) == [] and replayed([], hp) == []
    # a sequential run with replay keeps the first edit routed and answered after the second
    model, tok = tiny_model("llama")
    first, second = ten_requests()[:2]
    editor = Editor("wise", model, tok, hparams={**TINY_HPARAMS["wise"], "replay": 4, "mask_ratio": 1.0})
    before = target_logprob(model, tok, first.prompt, first.target_new)
    editor.edit([first, second], sequential=True, keep_original_weight=False, evaluate=False)
    assert target_logprob(model, tok, first.prompt, first.target_new) > before + 1.0


def test_shards_train_disjoint_subspaces_in_turn_and_keep_earlier_edits():
    from kedit_grace.wise.method import WiseHyperparams

    masks = [gradient_mask((64, 32), 0.3, 7, shard=i) for i in range(3)]
    assert torch.equal(masks[0], gradient_mask((64, 32), 0.3, 7))  # shard 0 is the unsharded mask
    assert float((masks[0] + masks[1] + masks[2]).max()) == 1.0  # disjoint
    assert [WiseHyperparams(shards=3, shard_size=2, mask_ratio=0.3).shard(n) for n in range(8)] == [
        0,
        0,
        1,
        1,
        2,
        2,
        0,
        0,
    ]
    with pytest.raises(ValueError, match="shards"):
        get_registry().method("wise").load_hparams({"shards": 3, "mask_ratio": 0.4})
    model, tok = tiny_model("llama")
    first, second = ten_requests()[:2]
    hp = {**TINY_HPARAMS["wise"], "shards": 2, "shard_size": 1, "mask_ratio": 0.5}
    editor = Editor("wise", model, tok, hparams=hp)
    deltas = []
    for request in (first, second):
        editor.edit([request], sequential=True, keep_original_weight=False, evaluate=False)
        memory = next(m for m in model.modules() if isinstance(m, SideMemory))
        deltas.append((memory.side_weight - memory.main_weight()).clone())
    shard0, shard1 = (gradient_mask(tuple(deltas[0].shape), 0.5, hp.get("seed", 0), shard=i) for i in (0, 1))
    assert bool((deltas[0][shard0 == 0] == 0).all()) and bool((deltas[0] != 0).any())
    second_only = deltas[1] - deltas[0]
    assert bool((second_only[shard1 == 0] == 0).all()) and bool((second_only != 0).any())
    plen = len(split_prompt_target(tok, first.prompt, first.target_new)[0])
    assert plen - 1 in side_memory_positions(model, tok, memory, first.prompt)
