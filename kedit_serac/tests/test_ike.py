"""IKE's demonstrations: three kinds per pool record, nearest last, every input reads the context."""

from __future__ import annotations

import torch

from kedit_core.architecture import resolve_architecture
from kedit_core.method import EditContext
from kedit_core.testing import tiny_model, tiny_requests
from kedit_core.trainer import load_training_requests
from kedit_serac.demonstrations import DemonstrationPool, demonstrations_of, fact_text, kind_counts, new_fact
from kedit_serac.encoder import shared_encoder
from kedit_serac.ike import IKE, packaged_pool


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


def test_every_input_reads_the_context_of_its_nearest_edit(pool_file, tmp_path):
    model, tok = tiny_model("gemma3")
    reqs = tiny_requests()
    method = IKE()
    hp = method.load_hparams({"k": 2, "pool": str(pool_file)})
    patch = method.compute_patch(model, tok, reqs, hp, resolve_architecture(model), EditContext(cache_dir=tmp_path))
    contexts = patch.metadata["extra"]["contexts"]
    assert len(contexts) == 2 and contexts[1].endswith(new_fact(reqs[1].prompt, reqs[1].target_new) + "Prompt:\n")
    probe = reqs[0].locality[0].prompt
    with torch.no_grad():
        before = model(**tok(probe, return_tensors="pt")).logits
        with patch.applied(model, tokenizer=tok):
            during = model(**tok(probe, return_tensors="pt")).logits
    assert not torch.allclose(before, during)  # no scope classifier: unrelated inputs read the context too


def test_without_a_pool_the_packaged_training_pool_is_used(tmp_path):
    model, tok = tiny_model("gemma3")
    reqs = tiny_requests()[:1]
    method = IKE()
    hp = method.load_hparams({"k": 3, "pool_limit": 12})
    patch = method.compute_patch(model, tok, reqs, hp, resolve_architecture(model), EditContext(cache_dir=tmp_path))
    pool = patch.metadata["extra"]["pool"]
    assert pool["source"] == packaged_pool() and pool["records"] == 12
    assert patch.metadata["extra"]["contexts"][0].count("New Fact: ") == 3 + 1 + 1
