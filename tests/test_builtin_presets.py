"""Every method ships a preset for every built-in model, and each preset fits that model."""

from __future__ import annotations

import importlib

import pytest

from kedit_core.hookspecs import MethodSpec
from kedit_core.models import BUILTIN_MODELS

FAMILIES = ["kedit_rome", "kedit_mend", "kedit_serac", "kedit_grace", "kedit_ft"]
#: decoder layers of each built-in model (its config.json)
N_LAYERS = {"gemma3-270m": 18, "qwen2.5-0.5b": 24}


def _method_classes() -> dict[str, type]:
    specs: list[MethodSpec] = []
    for family in FAMILIES:
        importlib.import_module(f"{family}.plugin").register_methods(register=specs.append)
    classes = {}
    for spec in specs:
        module, name = spec.target.split(":")
        classes[spec.name] = getattr(importlib.import_module(module), name)
    return classes


METHODS = _method_classes()


def test_the_twelve_methods_alphaedit_and_wise_are_covered():
    assert len(METHODS) == 14 and set(N_LAYERS) == set(BUILTIN_MODELS)


def _layers(hp) -> list[int]:
    """Every layer index a preset names (``layers``, ``layer``, ``router_layer``, ``lora_layers``)."""
    found: list[int] = []
    for field in ("layers", "lora_layers"):
        found += list(getattr(hp, field, None) or [])
    for field in ("layer", "router_layer"):
        if getattr(hp, field, None) is not None:
            found.append(getattr(hp, field))
    return found


@pytest.mark.parametrize("model", sorted(N_LAYERS))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_preset_fits_the_model(method, model):
    cls = METHODS[method]
    assert model in cls.presets(), f"{method} has no preset for {model}"
    hp = cls.load_hparams(None, model)
    layers = _layers(hp)
    assert all(-N_LAYERS[model] <= layer < N_LAYERS[model] for layer in layers), layers
    checkpoint = getattr(hp, "checkpoint", None)
    if checkpoint:  # MEND and KE: the named checkpoint ships with the package, trained for this model
        from kedit_mend.editor_method import packaged_checkpoint

        path = packaged_checkpoint(checkpoint)
        assert (path / "model.safetensors").is_file() and model in checkpoint
