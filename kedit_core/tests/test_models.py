import pytest
import torch

from kedit_core.errors import ModelLoadError
from kedit_core.models import load_model, model_fingerprint, model_key, parse_dtype
from kedit_core.testing import tiny_model


def test_model_keys():
    assert model_key("gemma3-270m") == "gemma3-270m"
    assert model_key("/models/GPT2-XL") == "gpt2-xl"
    assert model_key("meta-llama/Llama-2-7b-hf") == "llama-2-7b-hf"
    assert model_key("/x/gemma-3-270m-q4_k_m.gguf") == "gemma-3-270m-q4_k_m"


def test_dtypes():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype(None) is torch.float32
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        parse_dtype("float8")


def test_load_local_directory_in_dtype(tmp_path):
    model, tok = tiny_model("gemma3")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, ltok, info = load_model(str(tmp_path), dtype="bfloat16")
    assert next(loaded.parameters()).dtype is torch.bfloat16 and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    assert info.key == tmp_path.name.lower() and ltok.pad_token is not None


def test_bad_model_paths(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="not a model directory"):
        load_model(str(tmp_path / "file.txt"))
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_model(str(tmp_path))  # a directory without a config


def test_fingerprint_tracks_weights():
    a, _ = tiny_model("llama", seed=0)
    b, _ = tiny_model("llama", seed=0)
    c, _ = tiny_model("llama", seed=1)
    assert model_fingerprint(a) == model_fingerprint(b) != model_fingerprint(c)


def test_tokenizer_build_tables_are_released_and_it_still_works(tmp_path):
    import transformers as tf

    from kedit_core.models import release_build_tables

    vocab = {"a": 0, "b": 1, "ab": 2, "\u0120": 3, "<|endoftext|>": 4}
    tok = tf.Qwen2Tokenizer(vocab=dict(vocab), merges=[("a", "b")])
    ids, text = tok("ab a")["input_ids"], tok.decode([2, 3, 0])
    release_build_tables(tok)
    assert tok._vocab == {} and tok._merges == []  # the Python copies transformers keeps of them
    assert tok("ab a")["input_ids"] == ids == [2, 3, 0] and tok.decode([2, 3, 0]) == text == "ab a"
    assert tok.get_vocab() == vocab
    tok.save_pretrained(tmp_path)  # saved through the Rust tokenizer: the merge survives
    assert tf.AutoTokenizer.from_pretrained(tmp_path)("ab a")["input_ids"] == ids


def test_fingerprint_reads_the_model_not_the_software_version_or_path():
    a, _ = tiny_model("llama", seed=0)
    before = model_fingerprint(a)
    a.config.transformers_version = "0.0.1"
    a.config._name_or_path = "/somewhere/else"
    assert model_fingerprint(a) == before
    a.config.rms_norm_eps = a.config.rms_norm_eps * 2  # the config still counts
    assert model_fingerprint(a) != before
