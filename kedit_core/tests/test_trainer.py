"""BaseTrainer on a tiny model: losses go down, early stopping, resume gives the same checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from kedit_core.errors import KeditError
from kedit_core.ops.logits import final_hidden, head_logits
from kedit_core.ops.tokens import encode_pairs
from kedit_core.testing import tiny_model, tiny_requests
from kedit_core.trainer import BaseTrainer, TrainingHyperparams, load_checkpoint, locality_kl, split_validation


class AdapterTrainer(BaseTrainer):
    """Trains a residual linear adapter on the final hidden state: edit CE + locality KL."""

    def __init__(self, hp, out_dir, train, val=None):
        super().__init__(hp, out_dir, train, val, progress=False)
        self.model, self.tok = tiny_model("llama")
        h = self.model.config.hidden_size
        self.adapter = torch.nn.Parameter(torch.zeros(h, h))

    def trainable(self):
        return {"adapter": self.adapter}

    def config(self):
        return {"hidden": self.model.config.hidden_size}

    def _logits(self, prompts, targets, adapted):
        enc = encode_pairs(self.tok, prompts, targets)
        rows, cols = enc.target_positions()
        hidden = final_hidden(self.model, enc.input_ids, enc.attention_mask)[rows, cols]
        if adapted:
            hidden = hidden + hidden @ self.adapter
        return head_logits(self.model, hidden), enc.flat_targets()

    def losses(self, batch):
        logits, targets = self._logits([r.prompt for r in batch], [r.target_new for r in batch], True)
        edit = torch.nn.functional.cross_entropy(logits, targets)
        probes = [p for r in batch for p in r.locality]
        with torch.no_grad():
            base, _ = self._logits([p.prompt for p in probes], [p.target for p in probes], False)
        new, _ = self._logits([p.prompt for p in probes], [p.target for p in probes], True)
        # a random perturbation of the loss exercises the trainer's saved RNG on resume
        noise = torch.rand((), generator=self.rng) * 1e-3
        return {"edit": edit + noise, "locality": locality_kl(base, new)}


def records():
    return tiny_requests() * 4


def hparams(**kw):
    base = dict(learning_rate=5e-2, max_steps=12, train_batch_size=2, val_every=3, checkpoint_every=4, patience=50)
    return TrainingHyperparams(**{**base, **kw})


def test_training_lowers_the_edit_loss(tmp_path):
    trainer = AdapterTrainer(hparams(), tmp_path, records(), records()[:2])
    before = trainer.validate()
    result = trainer.run()
    assert result.steps == 12 and result.history
    assert min(h["edit"] for h in result.history) < before["edit"]
    tensors, config = load_checkpoint(tmp_path)
    assert set(tensors) == {"adapter"} and config["config"] == {"hidden": 32}
    assert config["best_step"] == result.best_step


def test_resume_after_interruption_gives_the_same_checkpoint(tmp_path):
    AdapterTrainer(hparams(), tmp_path / "a", records()).run()
    interrupted = AdapterTrainer(hparams(), tmp_path / "b", records())
    partial = interrupted.run(stop_after=6)
    assert partial.steps == 6 and not (tmp_path / "b" / "model.safetensors").exists()
    state = json.loads((tmp_path / "b" / "state" / "state.json").read_text())
    assert state["step"] == 4  # the last checkpoint before the interruption
    resumed = AdapterTrainer(hparams(), tmp_path / "b", records()).run()
    assert resumed.steps == 12
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert torch.equal(a["adapter"], b["adapter"])
    assert not torch.equal(a["adapter"], torch.zeros_like(a["adapter"]))
    last_a = load_file(str(tmp_path / "a" / "state" / "last.safetensors"))
    last_b = load_file(str(tmp_path / "b" / "state" / "last.safetensors"))
    assert set(last_a) == set(last_b)
    for k in last_a:
        assert torch.equal(last_a[k], last_b[k]), k


def test_resume_refuses_other_hparams(tmp_path):
    AdapterTrainer(hparams(), tmp_path, records()).run(stop_after=5)
    with pytest.raises(KeditError, match="other hyperparameters"):
        AdapterTrainer(hparams(learning_rate=1e-3), tmp_path, records()).run()


def test_early_stopping(tmp_path):
    # a learning rate of ~0 never improves the validation loss after the first validation
    result = AdapterTrainer(hparams(learning_rate=1e-12, patience=2, max_steps=30), tmp_path, records()).run()
    assert result.stopped_early and result.steps < 30


def test_locality_kl_is_zero_for_equal_logits_and_positive_otherwise():
    a = torch.randn(3, 7)
    assert locality_kl(a, a).abs() < 1e-6
    assert locality_kl(a, a + torch.randn(3, 7)) > 0


def test_split_validation_is_seeded_and_disjoint():
    items = list(range(50))
    train, val = split_validation(items, 0.2, seed=3)
    assert len(val) == 10 and not set(train) & set(val) and sorted(train + val) == items
    assert split_validation(items, 0.2, seed=3) == (train, val)


def test_checkpoint_id_and_cache(tmp_path):
    """The id covers the canonical config.json and every tensor's bytes; the cache re-reads a changed file."""
    from kedit_core.errors import CheckpointError
    from kedit_core.trainer import CheckpointCache, read_checkpoint, save_tensors

    ckpt = tmp_path / "ckpt"
    save_tensors({"w": torch.ones(2, 3), "b": torch.zeros(3)}, ckpt / "model.safetensors")
    (ckpt / "config.json").write_text(json.dumps({"config": {"layers": [1, 2], "kind": "x"}}))
    first = read_checkpoint(ckpt)
    (ckpt / "config.json").write_text(json.dumps({"config": {"kind": "x", "layers": [1, 2]}}, indent=4))
    assert read_checkpoint(ckpt).id == first.id  # key order and whitespace
    cache = CheckpointCache()
    assert cache.read(ckpt) is cache.read(ckpt)
    (ckpt / "config.json").write_text(json.dumps({"config": {"kind": "x", "layers": [1, 3]}}))
    moved = cache.read(ckpt)
    assert moved.id != first.id and moved.config["layers"] == [1, 3]
    save_tensors({"w": torch.ones(2, 3), "b": torch.zeros(3, dtype=torch.float64)}, ckpt / "model.safetensors")
    assert cache.read(ckpt).id not in (first.id, moved.id)  # same values, another dtype
    torch.save({"w": torch.ones(2)}, ckpt / "model.safetensors")  # a pickle under the safetensors name
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        cache.read(ckpt)
