from kedit_core.testing import MethodConformance


class TestGradStepConformance(MethodConformance):
    method_name = "grad-step"
    hparams = {"layer": 1, "step_norm": 0.5, "steps": 2}
    layer_hparams = ("layer",)
