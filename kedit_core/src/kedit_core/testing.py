"""Test helpers for kedit and its plugins: tiny random models with in-process tokenizers, and
:class:`MethodConformance`, the pytest suite every method plugin subclasses (like scikit-learn's
``check_estimator``). Needs pytest."""

from __future__ import annotations

import contextlib
import functools
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from .architecture import resolve_architecture, weight_value
from .method import EditContext, EditMethod, PatchKind
from .patch import Patch, tensor_fingerprint
from .request import EditRequest

CORPUS = [
    "The Eiffel Tower is located in the city of Paris.",
    "Toyota is a company headquartered in Japan.",
    "The mother tongue of Danielle Darrieux is French.",
    "Michael Jordan plays the sport of basketball.",
    "The capital of Italy is Rome, and the capital of France is Paris.",
    "Apple was founded in California by Steve Jobs.",
    "Berlin is the capital of Germany. London is the capital of England.",
    "Lionel Messi plays football for Argentina.",
    "The Louvre is a museum in Paris. The Colosseum is in Rome.",
    "Honda, Nissan and Toyota are car makers from Japan.",
    "Mount Fuji is the highest mountain in Japan.",
    "Which country is Toyota from? Japan. Who founded Microsoft? Bill Gates.",
    "nq question: who wrote the novel war and peace? Leo Tolstoy",
    "The official language of Brazil is Portuguese. Spanish is spoken in Spain.",
]

FAMILIES = ("gpt2", "llama", "gemma3")


@functools.cache
def _tokenizer_object(style: str) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    if style == "byte":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
        alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,?!:'-\u2581")
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    if style != "byte":
        bos = tok.token_to_id("<bos>")
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)]
        )
    return tok


def tiny_tokenizer(style: str = "byte") -> Any:
    """A BPE tokenizer trained in-process: ``byte`` (GPT-2 style) or ``sentencepiece`` (LLaMA/Gemma style, adds BOS)."""
    from transformers import PreTrainedTokenizerFast

    obj = _tokenizer_object(style)
    return PreTrainedTokenizerFast(
        tokenizer_object=obj.__class__.from_str(obj.to_str()),
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="right",
    )


def tiny_model(family: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """A tiny random causal LM of ``family`` (gpt2, llama, gemma3) and a matching tokenizer."""
    import transformers as tf

    tok = tiny_tokenizer("byte" if family == "gpt2" else "sentencepiece")
    vocab = len(tok)
    common = dict(
        vocab_size=vocab, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    if family == "gpt2":
        config = tf.GPT2Config(n_positions=128, n_embd=32, n_layer=4, n_head=4, **common)
        cls = tf.GPT2LMHeadModel
    elif family == "llama":
        config = tf.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            **common,
        )
        cls = tf.LlamaForCausalLM
    elif family == "gemma3":
        config = tf.Gemma3TextConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=128,
            sliding_window=16,
            **common,
        )
        cls = tf.Gemma3ForCausalLM
    else:
        raise ValueError(f"unknown tiny family {family!r}; use one of {FAMILIES}")
    config.architectures = [cls.__name__]
    torch.manual_seed(seed)
    model = cls(config).to(dtype).eval()
    model.requires_grad_(False)
    return model, tok


def tiny_requests() -> list[EditRequest]:
    return [
        EditRequest(
            prompt="The Eiffel Tower is located in the city of",
            subject="The Eiffel Tower",
            target_new="Rome",
            ground_truth="Paris",
            rephrase_prompts=("Where is the Eiffel Tower? It is in",),
            locality=({"prompt": "Toyota is a company headquartered in", "target": "Japan"},),
            neighborhood_prompts=("The Louvre is a museum in",),
        ),
        EditRequest(
            prompt="Michael Jordan plays the sport of",
            subject="Michael Jordan",
            target_new="football",
            ground_truth="basketball",
            locality=({"prompt": "The capital of Italy is", "target": "Rome"},),
        ),
    ]


@contextlib.contextmanager
def plugin_registered(plugin: Any, name: str, package: str = "local", version: str = "0") -> Iterator[None]:
    """Make ``plugin`` known to the process-wide registry for a while (test suites run with autoload
    off, and ``Patch.apply`` looks module-state and memory methods up there)."""
    from .plugins import get_registry

    registry = get_registry()
    added = name not in registry.plugins
    if added:
        registry.add_plugin(plugin, name=name, package=package, version=version)
    try:
        yield
    finally:
        if added:
            registry.remove_plugin(name)


def state_fingerprint(model: Any) -> dict[str, str]:
    """sha256 of every tensor of ``model.state_dict()``, read where it lives (through accelerate's offload
    maps in a dispatched model)."""
    return {name: tensor_fingerprint(weight_value(model, name)) for name in model.state_dict()}


class MethodConformance:
    """Subclass in a plugin's tests and set ``method_name`` (and ``hparams`` for tiny models)::

    class TestRomeConformance(MethodConformance):
        method_name = "rome"
        hparams = {"layers": [1], "v_num_grad_steps": 5}
    """

    method_name: ClassVar[str] = ""
    #: hyperparameters for the tiny models (a mapping validated by the method's hparams class)
    hparams: ClassVar[dict[str, Any]] = {}
    #: hyperparameters holding layer indices (an int or a list of ints), which the method must check
    #: with ``ArchitectureSpec.check_layer(s)``: out of range or named twice is an HparamsError
    layer_hparams: ClassVar[tuple[str, ...]] = ()

    # -- fixtures -------------------------------------------------------------------------------
    @pytest.fixture(scope="class")
    def method(self) -> Any:
        """The method, found through its entry point; its plugin is also made known to the process-wide
        registry for the class's tests (``Patch.apply`` looks module-state and memory methods up there,
        and test suites run with autoload off)."""
        from .plugins import Registry

        registry = Registry(autoload=True).load()
        cls = registry.method_class(self.method_name)
        info = registry.methods[self.method_name].plugin
        with plugin_registered(registry.pm.get_plugin(info.name), info.name, info.package, info.version):
            yield cls()

    @pytest.fixture(scope="class", params=FAMILIES)
    def tiny(self, request: Any) -> tuple[Any, Any]:
        return tiny_model(request.param)

    @pytest.fixture()
    def ctx(self, tmp_path: Path) -> EditContext:
        return EditContext(model_id="tiny", cache_dir=tmp_path / "cache")

    def make_patch(
        self, method: EditMethod, tiny: tuple[Any, Any], ctx: EditContext, requests: list[EditRequest] | None = None
    ) -> Patch:
        model, tok = tiny
        hp = method.load_hparams(dict(self.hparams))
        return method.compute_patch(model, tok, requests or tiny_requests()[:1], hp, resolve_architecture(model), ctx)

    # -- the contract ---------------------------------------------------------------------------
    def test_discoverable_through_entry_point(self, method: EditMethod) -> None:
        from .plugins import Registry

        registry = Registry(autoload=True).load()
        info = registry.methods[self.method_name]
        assert info.plugin.package != "?" and info.plugin.error is None
        assert not [b for b in registry.broken if info.plugin.name == b.name]

    def test_capability_flags(self, method: EditMethod) -> None:
        caps = method.capabilities()
        assert isinstance(caps["batch"], bool) and isinstance(caps["sequential"], bool)
        assert isinstance(caps["training"], bool) and caps["edit_area"]
        assert PatchKind(caps["kind"]) is method.kind

    def test_hparams_reject_unknown_keys(self, method: EditMethod) -> None:
        from .errors import HparamsError

        with pytest.raises(HparamsError, match="unknown field 'no_such_knob'"):
            method.load_hparams({**self.hparams, "no_such_knob": 1})

    def test_presets_validate(self, method: EditMethod) -> None:
        presets = method.presets()
        assert presets, f"method {method.name} ships no hparams presets"
        for key, path in presets.items():
            hp = method.load_hparams(Path(str(path)))
            assert hp.method in (None, method.name), key

    def test_compute_patch_leaves_model_unchanged(
        self, method: EditMethod, tiny: tuple[Any, Any], ctx: EditContext
    ) -> None:
        before = state_fingerprint(tiny[0])
        patch = self.make_patch(method, tiny, ctx)
        assert state_fingerprint(tiny[0]) == before
        assert isinstance(patch, Patch) and patch.kind is method.kind and patch.method == method.name

    def test_patch_roundtrips_through_file(
        self, method: EditMethod, tiny: tuple[Any, Any], ctx: EditContext, tmp_path: Path
    ) -> None:
        patch = self.make_patch(method, tiny, ctx)
        path = patch.save(tmp_path / "p.kedit.safetensors")
        loaded = Patch.load(path)
        assert loaded.metadata == patch.metadata
        assert set(loaded.tensors) == set(patch.tensors)
        for name, t in patch.tensors.items():
            assert torch.equal(loaded.tensors[name], t), name

    def test_apply_changes_and_revert_is_bit_exact(
        self, method: EditMethod, tiny: tuple[Any, Any], ctx: EditContext
    ) -> None:
        model, tok = tiny
        patch = self.make_patch(method, tiny, ctx)
        before = state_fingerprint(model)
        enc = tok(tiny_requests()[0].prompt, return_tensors="pt")
        with torch.no_grad():
            logits_before = model(**enc).logits
        with patch.applied(model, tokenizer=tok):
            with torch.no_grad():
                logits_during = model(**enc).logits
            assert not torch.equal(logits_before, logits_during), "the patch changes nothing"
        assert state_fingerprint(model) == before
        with torch.no_grad():
            assert torch.equal(model(**enc).logits, logits_before)

    def test_layer_hparams_are_checked_against_the_model(
        self, method: EditMethod, tiny: tuple[Any, Any], ctx: EditContext
    ) -> None:
        from .errors import HparamsError

        if not self.layer_hparams:
            pytest.skip(f"method {method.name} declares no layer hyperparameters (layer_hparams)")
        model = tiny[0]
        n = resolve_architecture(model).num_layers(model)
        out_of_range = rf"is out of range for this model's {n} layers \(valid: 0\.\.{n - 1}, or -{n}\.\.-1"
        for field in self.layer_hparams:
            current, twice = getattr(method.load_hparams(dict(self.hparams)), field), None
            if isinstance(current, int):
                cases = {10 * n: f"{10 * n} {out_of_range}", -n - 1: f"{-n - 1} {out_of_range}"}
            else:
                v = current[0] if current else 0
                twice = f"{v % n} is named twice"
                cases = {(10 * n,): f"{10 * n} {out_of_range}", (v, v): twice, (v - n, v): twice}
            for value, problem in cases.items():
                bad = {**self.hparams, field: list(value) if isinstance(value, tuple) else value}
                try:
                    hp = method.load_hparams(bad)
                except HparamsError:
                    if problem == twice:
                        continue  # the hparams class itself takes no list of this length (ROME: one layer)
                    raise
                with pytest.raises(HparamsError, match=rf"^hyperparameter '{field}': layer {problem}"):
                    method.compute_patch(model, tiny[1], tiny_requests()[:1], hp, resolve_architecture(model), ctx)

    def test_batch_editing_matches_the_flag(self, method: EditMethod, tiny: tuple[Any, Any]) -> None:
        from .editor import Editor
        from .errors import KeditError

        editor = Editor(method, tiny[0], tiny[1], hparams=dict(self.hparams), cache=temp_dir())
        if method.supports_batch:
            patch = editor.compute_patch(tiny_requests())
            assert len(patch.metadata["requests"]) == 2
        else:
            with pytest.raises(KeditError, match="one request at a time"):
                editor.compute_patch(tiny_requests())


def temp_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="kedit-test-"))
