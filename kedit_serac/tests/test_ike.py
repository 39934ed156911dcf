"""IKE's demonstrations: three kinds per pool record, nearest last, every input reads the context."""

from __future__ import annotations

import torch

from kedit_core.architecture import resolve_architecture
from kedit_core.method import EditContext
from kedit_core.testing import tiny_model, tiny_requests
from kedit_core.trainer import load_training_requests
from kedit_serac.demonstrations import DemonstrationPool, demonstrations_of, new_fact
from kedit_serac.encoder import shared_encoder
from kedit_serac.ike import IKE


def test_three_kinds_of_demonstration(pool_file):
    r = load_training_requests(pool_file)[0]
    kinds = dict(demonstrations_of(r))
    assert set(kinds) == {"copy", "update", "retain"}
    assert all(t.startswith("New Fact: Toko Yasuda, the piano\n") for t in kinds.values())
    assert kinds["update"].endswith("Toko Yasuda is incredible at piano\n\n")
    assert kinds["retain"].endswith("John Lennon performs on the guitar\n\n")


def test_retrieval_puts_the_nearest_demonstration_last(pool_file, tmp_path):
    records = load_training_requests(pool_file)
    enc = shared_encoder()
    pool = DemonstrationPool.build(records, enc, tmp_path)
    target = records[3]
    context = pool.context(enc, target.prompt, "something else", k=4)
    assert context.endswith(new_fact(target.prompt, "something else"))
    query = enc.embed([new_fact(target.prompt, "something else") + f"{target.prompt} something else"])[0]
    order = pool.nearest(query, 4)
    sims = (pool.embeddings[order] @ query).tolist()
    assert sims == sorted(sims)
    assert target.subject in pool.texts[order[-1]]


def test_every_input_reads_the_context_of_its_nearest_edit(pool_file, tmp_path):
    model, tok = tiny_model("gemma3")
    reqs = tiny_requests()
    method = IKE()
    hp = method.load_hparams({"k": 2, "pool": str(pool_file)})
    patch = method.compute_patch(model, tok, reqs, hp, resolve_architecture(model), EditContext(cache_dir=tmp_path))
    contexts = patch.metadata["extra"]["contexts"]
    assert len(contexts) == 2 and contexts[1].endswith(new_fact(reqs[1].prompt, reqs[1].target_new))
    probe = reqs[0].locality[0].prompt
    with torch.no_grad():
        before = model(**tok(probe, return_tensors="pt")).logits
        with patch.applied(model):
            during = model(**tok(probe, return_tensors="pt")).logits
    assert not torch.allclose(before, during)  # no scope classifier: unrelated inputs read the context too
