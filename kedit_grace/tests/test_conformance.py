"""kedit's plugin contract for GRACE, MELO and WISE (tiny gpt2 / llama / gemma3 models)."""

from helpers import TINY_HPARAMS

from kedit_core.testing import MethodConformance


class TestGraceConformance(MethodConformance):
    method_name = "grace"
    hparams = TINY_HPARAMS["grace"]
    layer_hparams = ("layer",)


class TestMeloConformance(MethodConformance):
    method_name = "melo"
    hparams = TINY_HPARAMS["melo"]
    layer_hparams = ("lora_layers",)  # router_layer: test_layers.py


class TestWiseConformance(MethodConformance):
    method_name = "wise"
    hparams = TINY_HPARAMS["wise"]
    layer_hparams = ("layer",)
