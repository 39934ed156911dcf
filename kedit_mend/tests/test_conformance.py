"""MEND and KE pass kedit's MethodConformance suite on the tiny gpt2/llama/gemma3 models (untrained
editor networks: a tiny model has no shipped checkpoint)."""

from kedit_core.testing import MethodConformance


class TestMENDConformance(MethodConformance):
    method_name = "mend"
    hparams = {"layers": [2, 3], "rank": 8}
    layer_hparams = ("layers",)


class TestKEConformance(MethodConformance):
    method_name = "ke"
    hparams = {"layers": [2, 3], "lstm_hidden": 8, "cond_dim": 8, "head_hidden": 8}
    layer_hparams = ("layers",)
