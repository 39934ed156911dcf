"""Editing a model dispatched by accelerate (``load_model(..., device_map=...)``, ``--device-map``) whose
layers are partly offloaded: their parameters are ``meta`` placeholders and accelerate's hooks load the
values from disk (or CPU memory) at forward time.

For every weight-editing method the patch computed on the dispatched model is the patch computed on the
same model loaded whole -- the same patch id, so the same tensors bit for bit and the same fingerprints of
the real weights -- and applied there it gives the same logits; revert leaves every value, offloaded ones
included, bit-identical and the model file untouched. On CPU the "devices" are the CPU and the disk.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kedit_core.architecture import resolve_architecture, weight_value, write_weight
from kedit_core.method import EditContext
from kedit_core.models import load_model, model_fingerprint
from kedit_core.offload import offload_slot
from kedit_core.ops.logits import model_device
from kedit_core.testing import state_fingerprint, tiny_model, tiny_requests

accelerate = pytest.importorskip("accelerate")

ROOT = Path(__file__).resolve().parents[2]
WEIGHT_METHODS = ("rome", "memit", "pmet", "alphaedit", "kn", "mend", "ke", "ft-l", "ft-m")
PROMPT = tiny_requests()[0].prompt


def tiny_hparams() -> dict:
    """The small hyperparameters of benchmarks/patch_ids.py (those of the conformance tests)."""
    spec = importlib.util.spec_from_file_location("patch_ids", ROOT / "benchmarks" / "patch_ids.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.HPARAMS


def split_map(model) -> dict[str, str]:
    """Layers 1 and 3 (the edited layers of most methods) and the output layer on disk, the rest on the CPU."""
    arch = resolve_architecture(model)
    disk = {arch.layer_path(1), arch.layer_path(3)}
    if not model.config.tie_word_embeddings:  # accelerate cannot offload one of two tied weights
        disk.add(arch.lm_head)
    top = {arch.layer_path(i) for i in range(arch.num_layers(model))} | {arch.embed, arch.final_norm, arch.lm_head}
    rest = {
        name
        for name, _ in model.named_modules()
        if name and not any(name == t or name.startswith(t + ".") or t.startswith(name + ".") for t in top)
    }
    return {name: "disk" if name in disk else "cpu" for name in top | rest}


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def overrides(model) -> dict:
    """What kedit wrote into accelerate's disk loaders in memory (empty when nothing differs from the file)."""
    loaders = {}
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        data = getattr(getattr(hook, "weights_map", None), "dataset", None)
        if data is not None and hasattr(data, "index"):
            loaders[id(data)] = data
    return {k: v for data in loaders.values() for k, v in data.state_dict.items()}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(whole, dispatched, tokenizer, model directory) of the tiny LLaMA saved as a Hugging Face directory."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    model, tok = tiny_model("llama")
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KEDIT_CACHE", str(tmp_path_factory.mktemp("cache")))
        whole, tok, _ = load_model(str(directory))
        dispatched, _, _ = load_model(str(directory), device_map=split_map(model))
    return whole, dispatched, tok, directory


@pytest.fixture(scope="module")
def registry():
    from kedit_core.plugins import Registry

    return Registry(autoload=True).load()


def logits(model, tok) -> torch.Tensor:
    with torch.no_grad():
        return model(**tok(PROMPT, return_tensors="pt")).logits


def test_weights_are_read_and_written_where_they_live(models):
    whole, dispatched, tok, directory = models
    name = "model.layers.1.mlp.down_proj.weight"
    assert dispatched.get_parameter(name).device.type == "meta" and offload_slot(dispatched, name) is not None
    assert dispatched.get_parameter("lm_head.weight").device.type == "meta"
    assert state_fingerprint(dispatched) == state_fingerprint(whole)
    assert model_fingerprint(dispatched) == model_fingerprint(whole)
    assert model_device(dispatched) == torch.device("cpu")
    file, before = directory / "model.safetensors", file_digest(directory / "model.safetensors")
    original = weight_value(dispatched, name).clone()
    write_weight(dispatched, name, original + 1)
    assert torch.equal(weight_value(dispatched, name), original + 1)
    assert not torch.equal(logits(dispatched, tok), logits(whole, tok))
    assert dispatched.get_parameter(name).device.type == "meta"  # still offloaded, not materialized
    dispatched.save_pretrained(directory / "saved")  # what `kedit patch apply --save-to` writes
    assert torch.equal(load_file(directory / "saved" / "model.safetensors")[name], original + 1)
    write_weight(dispatched, name, original)
    assert overrides(dispatched) == {}  # the file's value again: no copy kept in memory
    assert torch.equal(logits(dispatched, tok), logits(whole, tok))
    assert file_digest(file) == before


@pytest.mark.parametrize("name", WEIGHT_METHODS)
def test_method_on_a_dispatched_model(name, models, registry, tmp_path):
    whole, dispatched, tok, directory = models
    method = registry.method(name)
    hp = method.load_hparams(tiny_hparams()[name])
    arch = resolve_architecture(whole)
    patches = []
    for i, model in enumerate((whole, dispatched)):
        torch.manual_seed(0)
        ctx = EditContext(model_id="tiny", cache_dir=tmp_path / str(i))
        patches.append(method.compute_patch(model, tok, tiny_requests()[:1], hp, arch, ctx))
    expected_patch, patch = patches
    assert patch.patch_id == expected_patch.patch_id  # bit-identical tensors and fingerprints

    before, digest = state_fingerprint(dispatched), file_digest(directory / "model.safetensors")
    assert before == state_fingerprint(whole)
    with expected_patch.applied(whole):
        expected = logits(whole, tok)
    with patch.applied(dispatched):
        assert torch.equal(logits(dispatched, tok), expected)
        assert any(dispatched.get_parameter(p).device.type == "meta" for p in patch.parameters())
    assert state_fingerprint(dispatched) == before
    assert overrides(dispatched) == {}
    assert file_digest(directory / "model.safetensors") == digest


def test_sequential_editing_and_revert_from_file(models, registry, tmp_path):
    from kedit_core.editor import Editor

    whole, dispatched, tok, _ = models
    before = state_fingerprint(dispatched)
    editor = Editor(registry.method("ft-m"), dispatched, tok, hparams=tiny_hparams()["ft-m"], cache=tmp_path)
    result = editor.edit(tiny_requests(), sequential=True, keep_original_weight=False, evaluate=False)
    assert state_fingerprint(dispatched) != before
    editor.restore(result)
    assert state_fingerprint(dispatched) == before and overrides(dispatched) == {}

    # reverted from the file (by subtraction: exact only where rounding allows), as on the whole model
    patch = editor.compute_patch(tiny_requests()[:1])
    saved = {p: weight_value(whole, p).clone() for p in patch.parameters()}
    reports = []
    for model in (whole, dispatched):
        patch.apply(model, keep_copy=False).release()
        reports.append(patch.revert_from_file(model))
    assert reports[0] == reports[1]
    assert state_fingerprint(dispatched) == state_fingerprint(whole)
    for model in (whole, dispatched):
        for p, value in saved.items():
            write_weight(model, p, value)
    assert state_fingerprint(dispatched) == before and overrides(dispatched) == {}


@pytest.mark.parametrize("name", ["memit", "ft-l", "mend"])
def test_cpu_offload_of_a_conv1d_model(name, registry, tmp_path):
    """accelerate.cpu_offload: the values live in a plain dict; GPT-2 keeps weights as [in, out] (Conv1D)."""
    whole, tok = tiny_model("gpt2")
    offloaded, _ = tiny_model("gpt2")
    accelerate.cpu_offload(offloaded, execution_device=torch.device("cpu"))
    arch = resolve_architecture(whole)
    method = registry.method(name)
    hp = method.load_hparams(tiny_hparams()[name])
    patches = []
    for i, model in enumerate((whole, offloaded)):
        torch.manual_seed(0)
        ctx = EditContext(model_id="tiny", cache_dir=tmp_path / str(i))
        patches.append(method.compute_patch(model, tok, tiny_requests()[:1], hp, arch, ctx))
    assert patches[1].patch_id == patches[0].patch_id
    before = state_fingerprint(offloaded)
    with patches[0].applied(whole), patches[1].applied(offloaded):
        assert torch.equal(logits(offloaded, tok), logits(whole, tok))
    assert state_fingerprint(offloaded) == before


def test_a_meta_weight_nobody_holds_is_a_one_line_error():
    from kedit_core.errors import KeditError

    model, _ = tiny_model("llama")
    model.to("meta")
    name = "model.layers.1.mlp.down_proj.weight"
    with pytest.raises(KeditError, match=r"^parameter 'model\.layers\.1\.mlp\.down_proj\.weight' is on the meta"):
        weight_value(model, name)
    with pytest.raises(KeditError, match="is on the meta device"):
        write_weight(model, name, torch.zeros(32, 64))


def test_a_map_inferred_from_max_memory_with_offload(models, registry, tmp_path):
    """The way users split a model too big for their memory: accelerate infers the map from ``max_memory``
    (here half the weights fit in CPU memory, the rest goes to disk); ROME on it is ROME on the whole."""
    whole, _, tok, directory = models
    arch = resolve_architecture(whole)
    size = sum(p.numel() * p.element_size() for p in whole.parameters())
    layer_class = type(arch.layer_list(whole)[0]).__name__
    device_map = accelerate.infer_auto_device_map(
        whole, max_memory={"cpu": size // 2, "disk": 10 * size}, no_split_module_classes=[layer_class]
    )
    assert {"cpu", "disk"} <= set(device_map.values())
    dispatched, _, _ = load_model(str(directory), device_map=device_map)
    method = registry.method("rome")
    hp = method.load_hparams(tiny_hparams()["rome"])
    patches = [
        method.compute_patch(m, tok, tiny_requests()[:1], hp, arch, EditContext(model_id="tiny", cache_dir=tmp_path))
        for m in (whole, dispatched)
    ]
    assert patches[1].patch_id == patches[0].patch_id
    before = state_fingerprint(dispatched)
    with patches[0].applied(whole), patches[1].applied(dispatched):
        assert torch.equal(logits(dispatched, tok), logits(whole, tok))
    assert state_fingerprint(dispatched) == before and overrides(dispatched) == {}
