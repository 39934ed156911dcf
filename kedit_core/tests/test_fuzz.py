"""Property-based tests of the loaders: every input ends in a kedit error with a message, or loads.

CI runs a few hundred cases per loader; ``benchmarks/fuzz_loaders.py`` runs 10,000+."""

import json
import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kedit_core.errors import HparamsError, PatchError, RequestError
from kedit_core.hparams import Hyperparams
from kedit_core.method import PatchKind
from kedit_core.patch import Patch
from kedit_core.request import requests_from_records
from kedit_core.testing import tiny_model

N = int(os.environ.get("KEDIT_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=N, deadline=None, suppress_health_check=list(HealthCheck))

_MODEL = tiny_model("llama")[0]
PARAM = "model.layers.1.mlp.down_proj.weight"
_GOOD = Patch.create(method="t", kind=PatchKind.WEIGHT_DELTA, model=_MODEL,
                     tensors={f"delta/{PARAM}": torch.full_like(_MODEL.get_parameter(PARAM), 1e-3)})


def _good_bytes(tmp_path_factory=None) -> bytes:
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "g.kedit.safetensors"
    _GOOD.save(path)
    return path.read_bytes()


GOOD_BYTES = _good_bytes()
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12)


def _load(tmp_path, data: bytes):
    path = tmp_path / "f.kedit.safetensors"
    path.write_bytes(data)
    try:
        return Patch.load(path)
    except PatchError as exc:
        assert str(exc).strip()
        return None


@FUZZ
@given(data=st.binary(max_size=512))
def test_patch_loader_random_bytes(tmp_path_factory, data):
    assert _load(tmp_path_factory.mktemp("p"), data) is None


@FUZZ
@given(cut=st.integers(min_value=0, max_value=len(GOOD_BYTES) - 1))
def test_patch_loader_truncated(tmp_path_factory, cut):
    assert _load(tmp_path_factory.mktemp("p"), GOOD_BYTES[:cut]) is None


@FUZZ
@given(pos=st.integers(min_value=0, max_value=len(GOOD_BYTES) - 1), byte=st.integers(0, 255))
def test_patch_loader_flipped_byte_never_loads_a_different_patch(tmp_path_factory, pos, byte):
    data = bytearray(GOOD_BYTES)
    data[pos] = byte
    patch = _load(tmp_path_factory.mktemp("p"), bytes(data))
    if patch is not None:  # a flip that parses must not change what the patch does
        assert patch.patch_id == _GOOD.patch_id
        assert all(torch.equal(patch.tensors[k], v) for k, v in _GOOD.tensors.items())


@FUZZ
@given(header=json_values)
def test_patch_loader_bad_headers(tmp_path_factory, header):
    raw = json.dumps(header).encode()
    data = len(raw).to_bytes(8, "little") + raw
    assert _load(tmp_path_factory.mktemp("p"), data) is None


@FUZZ
@given(meta=st.dictionaries(st.sampled_from(["format_version", "kind", "method", "patch_id", "base_model", "fingerprints",
                                             "requests", "hparams"]), st.text(max_size=30), max_size=8))
def test_patch_loader_bad_metadata(tmp_path_factory, meta):
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("p") / "m.kedit.safetensors"
    save_file({f"delta/{PARAM}": torch.zeros(2, 2)}, str(path), metadata=meta)
    try:
        Patch.load(path)
        raise AssertionError("loaded a patch with fuzzed metadata")
    except PatchError as exc:
        assert str(exc)


record_keys = st.sampled_from(["prompt", "subject", "target_new", "ground_truth", "src", "alt", "answers", "rephrase",
                               "loc", "loc_ans", "requested_rewrite", "locality", "portability", "rephrase_prompts", "x"])


@FUZZ
@given(records=st.lists(st.dictionaries(record_keys, json_values, max_size=6) | json_values, min_size=1, max_size=3))
def test_request_loader_random_records(records):
    try:
        reqs = requests_from_records(records)
    except RequestError as exc:
        assert "record" in str(exc)
        return
    for r in reqs:
        assert r.subject in r.prompt and r.target_new.strip()


@FUZZ
@given(prompt=st.text(max_size=30), subject=st.text(max_size=10), target=st.text(max_size=10))
def test_request_strings(prompt, subject, target):
    try:
        r = requests_from_records([{"prompt": prompt, "subject": subject, "target_new": target}])[0]
    except RequestError:
        return
    assert subject in prompt and r.subject.strip() and r.target_new.strip()


class FuzzHP(Hyperparams):
    layers: list[int] = [1]
    lr: float = 0.1
    steps: int = 3


@FUZZ
@given(data=st.dictionaries(st.text(max_size=8), json_values, max_size=5) | json_values)
def test_hparams_random(data):
    try:
        hp = FuzzHP.from_dict(data)
    except HparamsError as exc:
        assert str(exc)
        return
    assert isinstance(hp.lr, float) and isinstance(hp.steps, int)


@FUZZ
@given(text=st.binary(max_size=200))
def test_hparams_files(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("h") / "h.yaml"
    path.write_bytes(text)
    try:
        FuzzHP.from_file(path)
    except HparamsError as exc:
        assert str(path) in str(exc)
