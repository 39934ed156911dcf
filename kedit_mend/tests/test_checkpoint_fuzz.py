"""Property-based tests of the trained-editor checkpoint loader (MEND on a tiny model): every checkpoint,
however malformed, either gives a patch or ends in one :class:`CheckpointError` line before the model
runs; a checkpoint that loads with other contents records another id.

CI runs ``KEDIT_FUZZ_EXAMPLES`` cases per property (default 40); ``benchmarks/fuzz_loaders.py`` runs 10,000+."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load

from kedit_core.architecture import resolve_architecture
from kedit_core.errors import CheckpointError
from kedit_core.method import EditContext
from kedit_core.request import EditRequest
from kedit_core.testing import tiny_model
from kedit_core.trainer import CONFIG_FILE, MODEL_FILE, save_tensors
from kedit_mend.mend import MEND

N = int(os.environ.get("KEDIT_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=N, deadline=None, suppress_health_check=list(HealthCheck))
REQUEST = EditRequest(
    prompt="The Eiffel Tower is located in the city of", subject="The Eiffel Tower", target_new="Rome"
)
HP = {"layers": [2, 3], "rank": 4}

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12
)
CONFIG_KEYS = st.sampled_from(
    ["kind", "params", "shapes", "rank", "n_layers", "edit_lr", "seed", "base_model", "extra"]
)
PARAMS = [f"model.layers.{i}.mlp.down_proj.weight" for i in range(4)] + [
    "model.embed_tokens.weight",
    "lm_head.weight",
    "x",
]


class Setup:
    """A tiny model, a valid checkpoint of MEND's untrained network for it, its bytes and its patch's id."""

    def __init__(self) -> None:
        self.model, self.tok = tiny_model("llama")
        self.arch = resolve_architecture(self.model)
        self.hp = MEND().load_hparams(HP)
        net = MEND().build_network(self.model, self.arch, self.hp)
        self.dir = Path(tempfile.mkdtemp(prefix="kedit-ckpt-fuzz-")) / "good"
        self.dir.mkdir()
        save_tensors(net.state_dict(), self.dir / MODEL_FILE)
        config = {**net.config(), "base_model": {"id": "tiny", "fingerprint": ""}}
        self.meta = {"trainer": "EditorTrainer", "config": config}
        (self.dir / CONFIG_FILE).write_text(json.dumps(self.meta))
        self.weights = (self.dir / MODEL_FILE).read_bytes()
        self.tensors = load(self.weights)
        self.forwards = 0
        for m in self.model.modules():
            m.register_forward_pre_hook(self._count)
        self.id = self.edit(self.dir).metadata["extra"]["checkpoint"]["id"]

    def _count(self, *_) -> None:
        self.forwards += 1

    def edit(self, ckpt: Path):
        ctx = EditContext(checkpoint=ckpt)
        return MEND().compute_patch(self.model, self.tok, [REQUEST], self.hp, self.arch, ctx)

    def outcome(self, ckpt: Path):
        """The patch, or None after a one-line CheckpointError raised before any forward pass."""
        self.forwards = 0
        try:
            return self.edit(ckpt)
        except CheckpointError as exc:
            message = str(exc)
            assert message and "\n" not in message and str(ckpt) in message, message
            assert self.forwards == 0, f"the model ran {self.forwards} times before: {message}"
            return None


S = Setup()


def checkpoint(tmp_path_factory, weights: bytes | None = None, config: bytes | None = None) -> Path:
    d = tmp_path_factory.mktemp("ckpt")
    (d / MODEL_FILE).write_bytes(S.weights if weights is None else weights)
    (d / CONFIG_FILE).write_bytes(json.dumps(S.meta).encode() if config is None else config)
    return d


@FUZZ
@given(data=st.binary(max_size=512))
def test_checkpoint_random_weight_bytes(tmp_path_factory, data):
    assert S.outcome(checkpoint(tmp_path_factory, weights=data)) is None


@FUZZ
@given(cut=st.integers(min_value=0, max_value=len(S.weights) - 1))
def test_checkpoint_truncated_weights(tmp_path_factory, cut):
    assert S.outcome(checkpoint(tmp_path_factory, weights=S.weights[:cut])) is None


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (``torch.equal`` calls 0.0 and -0.0 equal; the id does not)."""
    raw_a, raw_b = a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    return a.dtype == b.dtype and a.shape == b.shape and raw_a.equal(raw_b)


@FUZZ
@given(pos=st.integers(min_value=0, max_value=len(S.weights) - 1), byte=st.integers(0, 255))
def test_checkpoint_flipped_weight_byte_changes_the_id_or_nothing(tmp_path_factory, pos, byte):
    data = bytearray(S.weights)
    data[pos] = byte
    ckpt = checkpoint(tmp_path_factory, weights=bytes(data))
    patch = S.outcome(ckpt)
    if patch is not None:  # a flip that parses keeps the id only if every tensor is unchanged
        tensors = load(bytes(data))
        same = tensors.keys() == S.tensors.keys() and all(same_bytes(t, S.tensors[k]) for k, t in tensors.items())
        assert (patch.metadata["extra"]["checkpoint"]["id"] == S.id) == same
    shutil.rmtree(ckpt)


@FUZZ
@given(text=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_checkpoint_random_config_file(tmp_path_factory, text):
    assert S.outcome(checkpoint(tmp_path_factory, config=text)) is None


@FUZZ
@given(
    changes=st.dictionaries(CONFIG_KEYS, json_values | st.lists(st.sampled_from(PARAMS), max_size=3), max_size=3),
    dropped=st.sets(CONFIG_KEYS, max_size=2),
    shape=st.none() | json_values,
)
def test_checkpoint_mutated_config(tmp_path_factory, changes, dropped, shape):
    config = {k: v for k, v in S.meta["config"].items() if k not in dropped}
    config.update(changes)
    if shape is not None and isinstance(config.get("shapes"), dict) and config["shapes"]:
        config["shapes"] = {**config["shapes"], next(iter(config["shapes"])): shape}
    ckpt = checkpoint(tmp_path_factory, config=json.dumps({**S.meta, "config": config}).encode())
    patch = S.outcome(ckpt)
    if patch is not None:  # loads: the recorded id says whether the config differs from the good one
        same = json.loads(json.dumps(config)) == S.meta["config"]
        assert (patch.metadata["extra"]["checkpoint"]["id"] == S.id) == same
    shutil.rmtree(ckpt)
