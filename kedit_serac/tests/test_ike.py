"""IKE's demonstrations: three kinds per pool record, nearest last; only inputs naming the edited subject
read the context (the scope gate), or every input with ``scope: all``."""

from __future__ import annotations

import torch

from kedit_core.architecture import resolve_architecture
from kedit_core.method import EditContext
from kedit_core.testing import tiny_model, tiny_requests
from kedit_core.trainer import load_training_requests
from kedit_serac.demonstrations import DemonstrationPool, demonstrations_of, fact_text, kind_counts, new_fact
from kedit_serac.encoder import shared_encoder
from kedit_serac.ike import IKE, packaged_pool
from kedit_serac.scope_gate import mentions, subject_router


def test_three_kinds_of_demonstration(pool_file):
    r = load_training_requests(pool_file)[0]
    kinds = dict(demonstrations_of(r))
    assert set(kinds) == {"copy", "update", "retain"}
    assert all(t.startswith("New Fact: Toko Yasuda, the piano\nPrompt:\n") for t in kinds.values())
    assert kinds["copy"].endswith("Prompt:\nToko Yasuda, the piano\n\n")
    assert kinds["update"].endswith("Prompt:\nToko Yasuda is incredible at piano\n\n")
    assert kinds["retain"].endswith("Prompt:\nJohn Lennon performs on the guitar\n\n")


def test_kind_counts_follow_the_ratio():
    assert kind_counts(32, (1, 3, 4)) == {"copy": 4, "update": 12, "retain": 16}
    assert kind_counts(5, (1, 3, 4)) == {"copy": 1, "update": 2, "retain": 2}
    assert sum(kind_counts(7, (1, 1, 1)).values()) == 7
    assert kind_counts(8, (0, 1, 0)) == {"copy": 0, "update": 8, "retain": 0}
    assert kind_counts(0, (1, 3, 4)) == {"copy": 0, "update": 0, "retain": 0}


def test_retrieval_puts_the_nearest_demonstration_last_and_skips_the_edited_subject(pool_file, tmp_path):
    records = load_training_requests(pool_file)
    enc = shared_encoder()
    pool = DemonstrationPool.build(records, enc, tmp_path)
    target = records[3]
    query = enc.embed([fact_text(target.prompt, "something else")])[0]
    counts = {"copy": 1, "update": 2, "retain": 1}
    demos = pool.select(query, counts)
    assert len(demos) == 4
    sims = [
        float(pool.embeddings[[d in pool.demos[i].values() for i in range(len(pool))].index(True)] @ query)
        for d in demos
    ]
    assert sims == sorted(sims)
    assert target.subject in demos[-1]  # the nearest record is the same fact
    # a request about that subject never sees its own record
    edit = target.model_copy(update={"target_new": "something else"})
    context = pool.context(enc, edit, counts)
    assert context.endswith(new_fact(target.prompt, "something else") + "Prompt:\n")
    assert context.count(new_fact(target.prompt, target.target_new)) == 0
    assert context.count(target.subject) == 3  # only the closing copy demonstration and the new fact
    assert pool.context(enc, edit, counts, copy_new_fact=False).count(target.subject) == 1


def logits(model, tok, text):
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt")).logits[0]


def in_context_logits(model, tok, context, text):
    """The logits at ``text``'s positions when the model reads ``context`` first (BOS once)."""
    ctx, row = tok(context)["input_ids"], tok(text)["input_ids"]
    skip = int(bool(row) and row[0] == tok.bos_token_id and ctx[0] == tok.bos_token_id)
    with torch.no_grad():
        full = model(input_ids=torch.tensor([ctx + row[skip:]])).logits[0]
    return full[len(ctx) - skip :]


def ike_patch(model, tok, reqs, tmp_path, pool_file, **hparams):
    method = IKE()
    hp = method.load_hparams({"k": 2, "pool": str(pool_file), **hparams})
    return method.compute_patch(model, tok, reqs, hp, resolve_architecture(model), EditContext(cache_dir=tmp_path))


def test_only_inputs_naming_the_edited_subject_read_the_context(pool_file, tmp_path):
    model, tok = tiny_model("gemma3")
    reqs = tiny_requests()
    patch = ike_patch(model, tok, reqs, tmp_path, pool_file)  # the default scope: the edited subject
    contexts = patch.metadata["extra"]["contexts"]
    assert patch.metadata["extra"]["scope"] == "subject"
    assert patch.metadata["extra"]["subjects"] == [r.subject for r in reqs]
    assert len(contexts) == 2 and contexts[1].endswith(new_fact(reqs[1].prompt, reqs[1].target_new) + "Prompt:\n")
    unrelated = [reqs[0].locality[0].prompt, reqs[0].neighborhood_prompts[0], "The Eiffel Towers of Lego are in"]
    rephrase = reqs[0].rephrase_prompts[0]  # "Where is the Eiffel Tower? ...": the subject in other case
    before = [logits(model, tok, x) for x in unrelated]
    with patch.applied(model, tokenizer=tok):
        during = [logits(model, tok, x) for x in unrelated]
        routed = [logits(model, tok, rephrase), logits(model, tok, reqs[1].prompt)]
    for b, d in zip(before, during, strict=True):
        assert torch.equal(b, d)  # out of scope: the base model, no context at all
    # each in-scope input reads the context of the edit whose subject it names
    torch.testing.assert_close(routed[0], in_context_logits(model, tok, contexts[0], rephrase), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        routed[1], in_context_logits(model, tok, contexts[1], reqs[1].prompt), atol=1e-5, rtol=1e-5
    )


def test_scope_all_is_the_paper_every_input_reads_its_nearest_context(pool_file, tmp_path):
    model, tok = tiny_model("gemma3")
    reqs = tiny_requests()
    patch = ike_patch(model, tok, reqs, tmp_path, pool_file, scope="all")
    assert patch.metadata["extra"]["scope"] == "all"
    probe = reqs[0].locality[0].prompt
    before = logits(model, tok, probe)
    with patch.applied(model, tokenizer=tok):
        during = logits(model, tok, probe)
    assert not torch.allclose(before, during)


def test_the_subject_test_is_case_insensitive_on_word_boundaries():
    assert mentions("Where is the  EIFFEL tower? It is in", "The Eiffel Tower")
    assert mentions("Porsche 911's engine", "Porsche 911")
    assert not mentions("Porsche 550, developed by", "Porsche 911")
    assert not mentions("Fordham University is in", "Ford")
    assert not mentions("Porsche 9110 is", "Porsche 911")
    assert mentions("(C++) was designed by", "C++")


def test_the_most_specific_subject_wins_then_the_nearest_fact():
    keys = torch.eye(3)
    calls = []

    def embed(texts):
        calls.append(list(texts))
        return torch.tensor([[0.1, 0.0, 0.9] if "third" in t else [0.0, 0.9, 0.1] for t in texts])

    route = subject_router(["Porsche 911", "Porsche 911 Turbo", "porsche 911 turbo"], keys, embed)
    texts = ["Porsche 911, created by", "The Porsche 911 Turbo is", "Porsche 911 Turbo, third", "Porsche 550 is"]
    assert route(texts) == [(0, 1.0), (1, 1.0), (2, 1.0), None]
    assert calls == [["The Porsche 911 Turbo is", "Porsche 911 Turbo, third"]]  # only ties are embedded


def test_a_patch_without_a_scope_reads_every_input(pool_file, tmp_path):
    """Patches written before the scope gate keep their behaviour."""
    model, tok = tiny_model("gemma3")
    reqs = tiny_requests()[:1]
    patch = ike_patch(model, tok, reqs, tmp_path, pool_file)
    del patch.metadata["extra"]["scope"]
    patch.metadata["patch_id"] = patch.content_id()  # as written then
    probe = reqs[0].locality[0].prompt
    before = logits(model, tok, probe)
    with patch.applied(model, tokenizer=tok):
        assert not torch.allclose(before, logits(model, tok, probe))


def test_without_a_pool_the_packaged_training_pool_is_used(tmp_path):
    model, tok = tiny_model("gemma3")
    reqs = tiny_requests()[:1]
    method = IKE()
    hp = method.load_hparams({"k": 3, "pool_limit": 12})
    patch = method.compute_patch(model, tok, reqs, hp, resolve_architecture(model), EditContext(cache_dir=tmp_path))
    pool = patch.metadata["extra"]["pool"]
    assert pool["source"] == packaged_pool() and pool["records"] == 12
    assert patch.metadata["extra"]["contexts"][0].count("New Fact: ") == 3 + 1 + 1
