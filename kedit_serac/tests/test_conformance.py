"""Both methods pass kedit's MethodConformance suite on the tiny gpt2/llama/gemma3 models."""

from pathlib import Path

from kedit_core.testing import MethodConformance

POOL = str(Path(__file__).resolve().parent / "data" / "pool.json")


class TestSERACConformance(MethodConformance):
    method_name = "serac"
    hparams = {"n_demonstrations": 1}


class TestIKEConformance(MethodConformance):
    method_name = "ike"
    hparams = {"k": 2, "pool": POOL}
