import pytest
import torch

from kedit_core.architecture import ArchitectureSpec, get_module, resolve_architecture
from kedit_core.errors import ArchitectureError
from kedit_core.testing import tiny_model


@pytest.mark.parametrize(
    "family,layout,normalized", [("gpt2", "conv1d", False), ("llama", "linear", False), ("gemma3", "linear", True)]
)
def test_resolve_and_paths(family, layout, normalized):
    model, _ = tiny_model(family)
    spec = resolve_architecture(model)
    assert spec.weight_layout == layout and spec.mlp_output_normalized is normalized
    assert spec.num_layers(model) == 4
    w = spec.weight(model, spec.mlp_out_param(1))
    mlp_out = spec.module(model, 1, spec.mlp_out)
    x = torch.randn(3, w.shape[1])
    y = mlp_out(x)
    bias = getattr(mlp_out, "bias", None)
    expected = x @ w.T + (bias if bias is not None else 0)
    assert torch.allclose(y, expected, atol=1e-5), "weight() must be the [out, in] matrix of the module"
    delta = torch.randn(w.shape)
    assert spec.to_param_layout(delta).shape == model.get_parameter(spec.mlp_out_param(1)).shape
    a, b = torch.randn(w.shape[0], 1), torch.randn(1, w.shape[1])
    pa, pb = spec.lowrank_to_param_layout(a, b)
    assert torch.allclose(pa @ pb, spec.to_param_layout(a @ b))


def test_unknown_architecture_says_how_to_register():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ArchitectureError, match="register_architectures"):
        resolve_architecture(model)


def test_missing_module_is_a_clear_error():
    model, _ = tiny_model("llama")
    with pytest.raises(ArchitectureError, match="not found"):
        get_module(model, "model.layers.9.mlp")
    spec = resolve_architecture(model)
    with pytest.raises(ArchitectureError, match="out of range"):
        spec.layer(model, 10)


def test_plugin_architecture_registration():
    from kedit_core.hookspecs import hookimpl
    from kedit_core.plugins import reset_registry

    class Toy(torch.nn.Module):
        pass

    spec = ArchitectureSpec(
        names=("Toy",),
        layers="l",
        embed="e",
        final_norm="n",
        lm_head="h",
        attn="a",
        attn_out="a.o",
        mlp="m",
        mlp_in=("m.i",),
        mlp_out="m.o",
    )

    class P:
        @hookimpl
        def register_architectures(self, register):
            register(spec)

    reg = reset_registry(autoload=False)
    try:
        reg.add_plugin(P(), name="toy")
        assert resolve_architecture(Toy()) is spec
    finally:
        reset_registry()


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_layer_rule_counts_from_the_end_for_negatives_and_refuses_the_rest(family):
    from kedit_core.errors import HparamsError

    model, _ = tiny_model(family)
    spec = resolve_architecture(model)
    assert spec.check_layers(model, [0, 3], "layers") == [0, 3]
    assert spec.check_layers(model, [-1, -4], "layers") == [3, 0] and spec.check_layer(model, -2, "layer") == 2
    for bad in (4, 40, -5):
        with pytest.raises(
            HparamsError,
            match=rf"^hyperparameter 'layers': layer {bad} is out of range for this "
            r"model's 4 layers \(valid: 0\.\.3, or -4\.\.-1 counting from the end\)$",
        ):
            spec.check_layers(model, [1, bad], "layers")
    with pytest.raises(HparamsError, match=r"^hyperparameter 'layer': layer True is out of range"):
        spec.check_layer(model, True, "layer")
    with pytest.raises(HparamsError, match=r"^hyperparameter 'lora_layers': layer 1 is named twice in \[1, 1\]$"):
        spec.check_layers(model, [1, 1], "lora_layers")
    with pytest.raises(HparamsError, match=r"^hyperparameter 'layers': layer 3 is named twice in \[3, -1\]$"):
        spec.check_layers(model, [3, -1], "layers")


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_max_positions_comes_from_the_config(family):
    model, _ = tiny_model(family)
    assert resolve_architecture(model).max_positions(model) == 128
    assert (
        ArchitectureSpec(
            names=("X",),
            layers="l",
            embed="e",
            final_norm="n",
            lm_head="h",
            attn="a",
            attn_out="o",
            mlp="m",
            mlp_in=("i",),
            mlp_out="o",
        ).max_positions(torch.nn.Linear(1, 1))
        is None
    )
