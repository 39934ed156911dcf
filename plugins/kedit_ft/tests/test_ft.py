import pytest
import torch

from kedit_core.architecture import resolve_architecture
from kedit_core.method import EditContext
from kedit_core.testing import MethodConformance, tiny_model, tiny_requests


class TestFTLConformance(MethodConformance):
    method_name = "ft-l"
    hparams = {"layers": [1], "lr": 0.05, "num_steps": 4}
    layer_hparams = ("layers",)


class TestFTMConformance(MethodConformance):
    method_name = "ft-m"
    hparams = {"layers": [1, 2], "lr": 0.05, "num_steps": 4}
    layer_hparams = ("layers",)


@pytest.mark.parametrize("name", ["ft-l", "ft-m"])
def test_norm_constraint_bounds_every_entry(name):
    from kedit_ft.ft import FTL, FTM

    method = {"ft-l": FTL, "ft-m": FTM}[name]()
    model, tok = tiny_model("gemma3")
    hp = method.load_hparams({"layers": [1], "lr": 0.5, "num_steps": 5, "norm_constraint": 1e-3})
    patch = method.compute_patch(model, tok, tiny_requests()[:1], hp, resolve_architecture(model), EditContext())
    [delta] = patch.deltas().values()
    assert delta.abs().max().item() <= 1e-3 + 1e-7 and delta.abs().max().item() > 0


def test_ftm_raises_target_probability():
    from kedit_core.evaluate import Evaluator
    from kedit_ft.ft import FTM

    model, tok = tiny_model("llama")
    method = FTM()
    req = tiny_requests()[0]
    hp = method.load_hparams({"layers": [1, 2, 3], "lr": 0.05, "num_steps": 30})
    ev = Evaluator(model, tok)
    before = ev.score_pairs([(req.prompt, req.target_new)])[0]
    patch = method.compute_patch(model, tok, [req], hp, resolve_architecture(model), EditContext())
    with patch.applied(model):
        after = ev.score_pairs([(req.prompt, req.target_new)])[0]
    assert after.mean_nll < before.mean_nll and after.accuracy == 1.0


def test_ftl_loss_is_at_the_last_prompt_token():
    from kedit_ft.ft import _FineTune

    model, tok = tiny_model("gpt2")
    req = tiny_requests()[0]
    loss = _FineTune._loss_fn(model, tok, [req], torch.device("cpu"), "prompt_last")()
    ids = tok(req.prompt)["input_ids"]
    target = tok(" " + req.target_new, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1], -1)
    assert loss.item() == pytest.approx(-logp[target].mean().item(), rel=1e-4)
