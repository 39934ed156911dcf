"""Training MEND and KE with BaseTrainer on a tiny model (seconds): the losses fall, the checkpoint
is safetensors + JSON and is what editing uses, an interrupted run resumes to the same checkpoint,
and `kedit train` / `kedit edit --checkpoint` work."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from kedit_core.architecture import resolve_architecture
from kedit_core.cli import main
from kedit_core.errors import KeditError
from kedit_core.method import EditContext
from kedit_core.request import EditRequest
from kedit_core.testing import tiny_model
from kedit_core.trainer import load_checkpoint
from kedit_mend.ke import KE
from kedit_mend.mend import MEND

FACTS = [
    ("The Eiffel Tower is located in the city of", "The Eiffel Tower", "Rome"),
    ("Michael Jordan plays the sport of", "Michael Jordan", "football"),
    ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English"),
    ("Toyota is a company headquartered in", "Toyota", "Germany"),
    ("Lionel Messi plays football for", "Lionel Messi", "Brazil"),
    ("Apple was founded in California by", "Apple", "Bill Gates"),
    ("The official language of Brazil is", "Brazil", "Spanish"),
    ("Mount Fuji is the highest mountain in", "Mount Fuji", "Italy"),
]
LOCALITY = [("Berlin is the capital of", "Germany"), ("The Louvre is a museum in", "Paris")]


def records() -> list[EditRequest]:
    return [
        EditRequest(
            prompt=p,
            subject=s,
            target_new=t,
            rephrase_prompts=(f"In short, {p[0].lower()}{p[1:]}",),
            locality=({"prompt": LOCALITY[i % 2][0], "target": LOCALITY[i % 2][1]},),
        )
        for i, (p, s, t) in enumerate(FACTS)
    ]


TRAIN = {
    "layers": [2, 3],
    "max_steps": 12,
    "train_batch_size": 4,
    "val_every": 4,
    "checkpoint_every": 4,
    "learning_rate": 1e-2,
    "edit_lr": 0.05,
    "patience": 10,
}
SMALL = {
    "mend": {"rank": 8},
    "ke": {"lstm_hidden": 8, "cond_dim": 8, "head_hidden": 8, "edit_lr": 1.0, "learning_rate": 3e-2},
}


def make_trainer(method, model, tok, out_dir, **changes):
    hp = method.load_hparams({**TRAIN, **SMALL[method.name], **changes})
    ctx = EditContext(progress=False)
    reqs = records()
    return method.trainer(
        model, tok, hp, resolve_architecture(model), ctx, train=reqs[:6], val=reqs[6:], out_dir=out_dir
    ), hp


@pytest.mark.parametrize("method", [MEND(), KE()], ids=["mend", "ke"])
def test_training_lowers_the_loss_and_editing_uses_the_checkpoint(method, tmp_path):
    model, tok = tiny_model("llama")
    trainer, hp = make_trainer(method, model, tok, tmp_path / "ckpt")
    before = trainer.validate()
    result = trainer.run()
    after = trainer.validate()
    assert result.best_val_loss < before["loss"] - 0.05 and after["edit_acc"] >= before["edit_acc"], result.history
    tensors, meta = load_checkpoint(tmp_path / "ckpt")
    assert meta["config"]["kind"] == method.name and set(tensors) == set(trainer.trainable())
    assert not list((tmp_path / "ckpt").glob("*.pt")) and not list((tmp_path / "ckpt").glob("*.pkl"))
    ctx = EditContext(checkpoint=tmp_path / "ckpt")
    arch = resolve_architecture(model)
    patch = method.compute_patch(model, tok, records()[:1], hp, arch, ctx)
    assert patch.metadata["extra"]["checkpoint"]["source"] == str(tmp_path / "ckpt")
    untrained = method.compute_patch(model, tok, records()[:1], hp, arch, EditContext())
    name = next(iter(patch.deltas()))
    assert not torch.allclose(patch.deltas()[name], untrained.deltas()[name])


@pytest.mark.parametrize("method", [MEND(), KE()], ids=["mend", "ke"])
def test_resumed_training_gives_the_same_checkpoint(method, tmp_path):
    model, tok = tiny_model("gemma3")
    whole, _ = make_trainer(method, model, tok, tmp_path / "whole", train_vocab_sample=64, train_top_k=8)
    whole.run()
    first, _ = make_trainer(method, model, tok, tmp_path / "resumed", train_vocab_sample=64, train_top_k=8)
    first.run(stop_after=6)  # "interrupted" after step 6; the state on disk is step 4's
    assert json.loads((tmp_path / "resumed" / "state" / "state.json").read_text())["step"] == 4
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    again, _ = make_trainer(method, model, tok, tmp_path / "resumed", train_vocab_sample=64, train_top_k=8)
    result = again.run()
    assert result.steps == TRAIN["max_steps"]
    a = load_file(str(tmp_path / "whole" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_for_another_model_is_refused(tmp_path):
    model, tok = tiny_model("llama")
    trainer, hp = make_trainer(MEND(), model, tok, tmp_path / "ckpt", max_steps=2)
    trainer.run()
    other, other_tok = tiny_model("gpt2")
    with pytest.raises(KeditError, match="trained for"):
        MEND().compute_patch(
            other, other_tok, records()[:1], hp, resolve_architecture(other), EditContext(checkpoint=tmp_path / "ckpt")
        )
    with pytest.raises(KeditError, match="not a 'ke' editor"):
        KE().compute_patch(
            model,
            tok,
            records()[:1],
            KE().load_hparams({"layers": [2, 3]}),
            resolve_architecture(model),
            EditContext(checkpoint=tmp_path / "ckpt"),
        )


def test_kedit_train_then_edit_with_the_checkpoint(tmp_path, capsys):
    model, tok = tiny_model("llama")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    data = tmp_path / "train.json"
    data.write_text(json.dumps([r.model_dump(mode="json") for r in records()]))
    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps({"method": "mend", **TRAIN, "rank": 8}))
    out = tmp_path / "ckpt"
    assert (
        main(
            [
                "train",
                "--method",
                "mend",
                "--model",
                str(tmp_path / "model"),
                "--data",
                str(data),
                "--hparams",
                str(hp),
                "--out",
                str(out),
                "--max-steps",
                "3",
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] == 3 and (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    patch_file = tmp_path / "edit.kedit.safetensors"
    assert (
        main(
            [
                "edit",
                "--method",
                "mend",
                "--model",
                str(tmp_path / "model"),
                "--hparams",
                str(hp),
                "--checkpoint",
                str(out),
                "--prompt",
                FACTS[0][0],
                "--subject",
                FACTS[0][1],
                "--target",
                FACTS[0][2],
                "--out",
                str(patch_file),
                "--json",
            ]
        )
        == 0
    )
    assert patch_file.is_file()


def test_record_caches_persist_on_disk(tmp_path):
    """Training reuses the unedited model's per-record results across runs (keyed by its fingerprint)."""
    model, tok = tiny_model("llama")
    method = MEND()
    hp = method.load_hparams({**TRAIN, **SMALL["mend"], "max_steps": 2})
    ctx = EditContext(progress=False, model_fingerprint="tiny-llama", cache_dir=tmp_path / "cache")
    arch = resolve_architecture(model)
    first = method.trainer(model, tok, hp, arch, ctx, train=records()[:6], val=records()[6:], out_dir=tmp_path / "a")
    first.run()
    files = list((tmp_path / "cache" / "kedit_mend").glob("records-*.safetensors"))
    assert len(files) == 1
    again = method.trainer(model, tok, hp, arch, ctx, train=records()[:6], val=records()[6:], out_dir=tmp_path / "b")
    assert set(again.cache.entries) == set(first.cache.entries) and set(again.factor_cache) == set(first.factor_cache)
    pair = next(iter(first.cache.entries))
    assert torch.equal(again.cache.entries[pair]["h0"], first.cache.entries[pair]["h0"])
    edit = next(iter(first.factor_cache))
    p = method.build_network(model, arch, hp).params[0]
    assert torch.equal(again.factor_cache[edit][p][1], first.factor_cache[edit][p][1])


def test_the_continuation_term_is_the_unedited_models_greedy_text_after_the_target(tmp_path):
    from kedit_mend.train_editor import continuation_prompt, continuations

    model, tok = tiny_model("llama")
    pairs = [(r.prompt, r.target_new) for r in records()[:3]]
    got = continuations(model, tok, pairs, tokens=3)
    for pair in pairs:
        ids = tok(continuation_prompt(*pair), return_tensors="pt")["input_ids"]
        greedy = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)[0, ids.shape[1] :]
        assert got.get(pair, "") == tok.decode(greedy, skip_special_tokens=True).strip()
    method = MEND()
    off, _ = make_trainer(method, model, tok, tmp_path / "off")
    assert off.continuation == {} and "continuation" not in off.validate()
    on, hp = make_trainer(method, model, tok, tmp_path / "on", continuation_loss_weight=2.0, continuation_tokens=3)
    assert set(on.continuation) <= {(r.prompt, r.target_new) for r in records()} and on.continuation
    parts = on.validate()
    expected = parts["edit"] + hp.locality_loss_weight * parts["locality"] + 2.0 * parts["continuation"]
    assert parts["continuation"] > 0 and parts["loss"] == pytest.approx(expected, rel=1e-5)
