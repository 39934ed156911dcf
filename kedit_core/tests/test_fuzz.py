"""Property-based tests of the loaders: every input ends in a kedit error with a message, or loads.

CI runs a few hundred cases per loader; ``benchmarks/fuzz_loaders.py`` runs 10,000+."""

import json
import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kedit_core.errors import HparamsError, KeditError, PatchError, RequestError
from kedit_core.hookspecs import hookimpl
from kedit_core.hparams import Hyperparams
from kedit_core.method import EditMethod, PatchKind
from kedit_core.patch import Patch, stack, tensor_fingerprint
from kedit_core.request import requests_from_records
from kedit_core.testing import state_fingerprint, tiny_model

N = int(os.environ.get("KEDIT_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=N, deadline=None, suppress_health_check=list(HealthCheck))

_MODEL = tiny_model("llama")[0]
PARAM = "model.layers.1.mlp.down_proj.weight"
_GOOD = Patch.create(
    method="t",
    kind=PatchKind.WEIGHT_DELTA,
    model=_MODEL,
    tensors={f"delta/{PARAM}": torch.full_like(_MODEL.get_parameter(PARAM), 1e-3)},
)


def _good_bytes(tmp_path_factory=None) -> bytes:
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "g.kedit.safetensors"
    _GOOD.save(path)
    return path.read_bytes()


GOOD_BYTES = _good_bytes()
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12
)


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
@given(
    meta=st.dictionaries(
        st.sampled_from(
            ["format_version", "kind", "method", "patch_id", "base_model", "fingerprints", "requests", "hparams"]
        ),
        st.text(max_size=30),
        max_size=8,
    )
)
def test_patch_loader_bad_metadata(tmp_path_factory, meta):
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("p") / "m.kedit.safetensors"
    save_file({f"delta/{PARAM}": torch.zeros(2, 2)}, str(path), metadata=meta)
    try:
        Patch.load(path)
        raise AssertionError("loaded a patch with fuzzed metadata")
    except PatchError as exc:
        assert str(exc)


record_keys = st.sampled_from(
    [
        "prompt",
        "subject",
        "target_new",
        "ground_truth",
        "src",
        "alt",
        "answers",
        "rephrase",
        "loc",
        "loc_ans",
        "requested_rewrite",
        "locality",
        "portability",
        "rephrase_prompts",
        "x",
    ]
)


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


# -- apply / revert checks: hand-edited metadata with the patch id recomputed (issue 15) ---------------------
# Each example builds a genuine patch, edits its metadata as a forger would (recomputing the id so the file
# loads), and requires a kedit error with the model bit-identical. A model forward is not needed: the
# fingerprints of every tensor of the model are compared.

N_APPLY = max(5, N // 10)
FUZZ_APPLY = settings(max_examples=N_APPLY, deadline=None, suppress_health_check=list(HealthCheck))
PARAMS = [n for n, _ in _MODEL.named_parameters()]
hex64 = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)


def _forge(patch: Patch, **meta) -> Patch:
    forged = Patch(dict(patch.tensors), {**patch.metadata, **meta})
    forged.metadata["patch_id"] = forged.content_id()
    return forged


def _fingerprint_forgery(draw, genuine: dict, param: str):
    """A mapping that differs from ``genuine`` where it matters; never one that is right for the model."""
    other = draw(st.sampled_from([n for n in PARAMS if n != param]))
    how = draw(st.sampled_from(["random", "other param", "renamed", "wrong extra", "dropped", "not a dict"]))
    if how == "random":
        return {**genuine, param: draw(hex64.filter(lambda h: h != genuine[param]))}
    if how == "other param":
        return {**genuine, param: tensor_fingerprint(_MODEL.get_parameter(other))}
    if how == "renamed":
        return {other: genuine[param]}
    if how == "wrong extra":
        return {**genuine, other: draw(hex64)}
    if how == "dropped":
        return {}
    return draw(json_values.filter(lambda v: not isinstance(v, dict)))


@st.composite
def forged_pre(draw):
    return _fingerprint_forgery(draw, _GOOD.metadata["fingerprints"], PARAM)


@st.composite
def forged_post(draw):
    genuine = _GOOD.metadata["post_fingerprints"]
    if draw(st.booleans()):  # the forger claims the patch leaves the weight as it was
        return {PARAM: _GOOD.metadata["fingerprints"][PARAM]}
    return _fingerprint_forgery(draw, genuine, PARAM)


@FUZZ_APPLY
@given(fingerprints=forged_pre())
def test_apply_refuses_forged_fingerprints(fingerprints):
    before = state_fingerprint(_MODEL)
    try:
        _forge(_GOOD, fingerprints=fingerprints).apply(_MODEL)
        raise AssertionError(f"applied a patch with forged fingerprints {fingerprints!r}")
    except KeditError as exc:
        assert str(exc)
    assert state_fingerprint(_MODEL) == before and stack(_MODEL) == []


@FUZZ_APPLY
@given(post=forged_post(), edited=st.booleans())
def test_apply_revert_from_file_refuses_forged_post_fingerprints(post, edited):
    handle = _GOOD.apply(_MODEL) if edited else None
    try:
        held = state_fingerprint(_MODEL)
        forged = _forge(_GOOD, post_fingerprints=post)
        try:
            forged.revert_from_file(_MODEL)
            refused = False
        except KeditError as exc:
            assert str(exc)
            refused = True
        # only on the unedited model may a forger's "post = pre" pass the check: kedit then keeps the weight
        assert refused or (not edited and post == {PARAM: _GOOD.metadata["fingerprints"][PARAM]})
        assert state_fingerprint(_MODEL) == held
    finally:
        if handle is not None:
            handle.revert()


class _ShiftMethod(EditMethod):
    """A module-state method: adds its state vector to the output of the MLP down projections it names."""

    name = "fuzz-shift"
    kind = PatchKind.MODULE_STATE
    wraps = "mlp_out"

    def compute_edit(self, *a, **k):  # pragma: no cover - patches are built by hand
        raise AssertionError

    def attach(self, target, patch):
        state = patch.state()
        handles = []
        for path in patch.metadata["modules"]:
            shift = state[f"{path}/shift"]
            handles.append(target.model.get_submodule(path).register_forward_hook(lambda m, i, o, s=shift: o + s))
        return lambda: [h.remove() for h in handles]


class _ShiftPlugin:
    @hookimpl
    def register_methods(self, register):
        register(_ShiftMethod)


MLP_OUT = PARAM.removesuffix(".weight")
_SHIFT = Patch.create(
    method="fuzz-shift",
    kind=PatchKind.MODULE_STATE,
    model=_MODEL,
    modules=[MLP_OUT],
    tensors={f"state/{MLP_OUT}/shift": torch.full((32,), 0.5)},
    fingerprint_params=[PARAM],
)
MODULES = [n for n, _ in _MODEL.named_modules()]
MLP_OUTS = {n for n in MODULES if n.endswith("mlp.down_proj")}


@st.composite
def wrong_targets(draw):
    """(modules, fingerprint params) a forger might write into the shift patch."""
    module = draw(
        st.sampled_from([m for m in MODULES if m != MLP_OUT])
        | st.text(max_size=12)
        | st.integers(4, 99).map(lambda i: f"model.layers.{i}.mlp.down_proj")
    )
    params = [n for n in PARAMS if n.rpartition(".")[0] == module]
    how = draw(
        st.sampled_from(["modules only", "consistent"] if params and module not in MLP_OUTS else ["modules only"])
    )
    modules = draw(st.sampled_from([[module], [MLP_OUT, module], [module, module]]))
    return modules, (params if how == "consistent" else [PARAM])


@FUZZ_APPLY
@given(target=wrong_targets())
def test_apply_refuses_module_state_patches_aimed_at_other_modules(target):
    from kedit_core.testing import plugin_registered

    modules, params = target
    tensors = {f"state/{m}/shift": torch.full((32,), 0.5) for m in modules}
    fps = {n: tensor_fingerprint(_MODEL.get_parameter(n)) for n in params}
    forged = _forge(Patch(tensors, dict(_SHIFT.metadata)), modules=modules, fingerprints=fps)
    before = state_fingerprint(_MODEL)
    with plugin_registered(_ShiftPlugin(), "fuzz-shift"):
        try:
            forged.apply(_MODEL)
            raise AssertionError(f"attached a shift patch to {modules} fingerprinting {params}")
        except KeditError as exc:
            assert str(exc)
    assert state_fingerprint(_MODEL) == before and stack(_MODEL) == []
    assert not any(m._forward_hooks for m in _MODEL.modules())


_GPT2 = tiny_model("gpt2")[0]
TIED = ("transformer.wte.weight", "lm_head.weight")
GPT2_PARAMS = [n for n, _ in _GPT2.named_parameters()]  # lists a tied tensor once, under its first name


@FUZZ_APPLY
@given(
    names=st.permutations(TIED),
    extra=st.sampled_from([[], *[[n] for n in GPT2_PARAMS[1:6]]]),
    scale=st.floats(1e-6, 4.0),
    by_hand=st.booleans(),
)
def test_apply_refuses_patches_that_name_tied_weights(names, extra, scale, by_hand):
    before = state_fingerprint(_GPT2)
    deltas = {n: torch.full_like(_GPT2.get_parameter(n), scale) for n in [*names, *extra]}
    try:
        if by_hand:  # built without Patch.create (which refuses), id recomputed
            fps = {n: tensor_fingerprint(_GPT2.get_parameter(n)) for n in deltas}
            meta = {**_GOOD.metadata, "fingerprints": fps, "post_fingerprints": dict.fromkeys(deltas, "0" * 64)}
            _forge(Patch({f"delta/{n}": d for n, d in deltas.items()}, meta)).apply(_GPT2)
        else:
            Patch.create(
                method="t",
                kind=PatchKind.WEIGHT_DELTA,
                model=_GPT2,
                tensors={f"delta/{n}": d for n, d in deltas.items()},
            )
        raise AssertionError(f"accepted a patch naming tied weights {names}")
    except KeditError as exc:
        assert "share storage" in str(exc)
    assert state_fingerprint(_GPT2) == before and stack(_GPT2) == []


@FUZZ_APPLY
@given(name=st.sampled_from(TIED), scale=st.floats(1e-6, 4.0))
def test_apply_one_of_two_tied_weights_reverts_bit_exactly(name, scale):
    before = state_fingerprint(_GPT2)
    patch = Patch.create(
        method="t",
        kind=PatchKind.WEIGHT_DELTA,
        model=_GPT2,
        tensors={f"delta/{name}": torch.full_like(_GPT2.get_parameter(name), scale)},
    )
    patch.apply(_GPT2).revert()
    assert state_fingerprint(_GPT2) == before
