"""SERAC's scope classifier trained with BaseTrainer (tiny budget), `kedit train`, and the encoder cache."""

from __future__ import annotations

import json

import torch

from kedit_core.architecture import resolve_architecture
from kedit_core.cli import main
from kedit_core.method import EditContext
from kedit_core.testing import tiny_model
from kedit_core.trainer import load_checkpoint, load_training_requests
from kedit_serac.encoder import embed_cached, shared_encoder
from kedit_serac.serac import SERAC
from kedit_serac.train_scope import edit_text, in_scope_inputs, out_of_scope_inputs


def test_scope_training_separates_in_and_out_of_scope(pool_file, tmp_path):
    records = load_training_requests(pool_file)
    method = SERAC()
    hp = method.load_hparams(
        {
            "max_steps": 30,
            "train_batch_size": 3,
            "val_every": 10,
            "checkpoint_every": 10,
            "learning_rate": 1e-2,
            "n_demonstrations": 1,
        }
    )
    model, tok = tiny_model("llama")
    ctx = EditContext(cache_dir=tmp_path / "cache", progress=False)
    trainer = method.trainer(
        model, tok, hp, resolve_architecture(model), ctx, train=records, val=records[:2], out_dir=tmp_path / "ckpt"
    )
    before = trainer.validate()
    result = trainer.run()
    after = trainer.validate()
    assert after["loss"] < before["loss"] and result.best_step > 0
    tensors, config = load_checkpoint(tmp_path / "ckpt")
    assert set(tensors) == {"proj", "scale", "bias"}
    assert len(config["config"]["demonstrations"]) == 1
    # the trained checkpoint is what compute_patch reads through ctx.checkpoint
    ctx.checkpoint = tmp_path / "ckpt"
    patch = method.compute_patch(model, tok, records[:2], hp, resolve_architecture(model), ctx)
    assert torch.equal(patch.tensors["state/scope_classifier/proj"], tensors["proj"])
    assert config["config"]["demonstrations"][0] in patch.metadata["extra"]["contexts"][0]


def test_training_pairs_are_in_and_out_of_scope(pool_file):
    r = load_training_requests(pool_file)[0]
    assert edit_text(r) == "Toko Yasuda, the piano"
    assert "Toko Yasuda is incredible at piano" in in_scope_inputs(r)
    assert "John Lennon performs on the guitar" in out_of_scope_inputs(r)


def test_embeddings_are_cached_on_disk(tmp_path):
    enc = shared_encoder()
    texts = ["The Eiffel Tower is in Paris.", "Toyota is a Japanese company."]
    first = embed_cached(enc, texts, tmp_path)
    files = list((tmp_path / "embeddings").glob("*.safetensors"))
    assert len(files) == 1
    assert torch.equal(embed_cached(enc, texts, tmp_path), first)
    assert torch.allclose(first.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert float(first[0] @ first[1]) < 0.9


def test_kedit_train_command(pool_file, tmp_path, capsys):
    model, tok = tiny_model("llama")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    out = tmp_path / "ckpt"
    argv = [
        "train",
        "--method",
        "serac",
        "--model",
        str(tmp_path / "model"),
        "--data",
        str(pool_file),
        "--out",
        str(out),
        "--max-steps",
        "4",
        "--json",
    ]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] == 4 and (out / "model.safetensors").is_file()
    assert (
        main(
            [
                "train",
                "--method",
                "ike",
                "--model",
                str(tmp_path / "model"),
                "--data",
                str(pool_file),
                "--out",
                str(out),
            ]
        )
        == 1
    )
    assert "nothing to train" in capsys.readouterr().err
