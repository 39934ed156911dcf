"""Does the model stay a model: perplexity on the held-out text and the share of unchanged answers, on
tiny random models."""

import math

import pytest
import torch

from kedit_core.evaluate.drift import (
    greedy_answers,
    heldout_text,
    perplexity,
    text_score,
    text_windows,
    unchanged_share,
)
from kedit_core.testing import tiny_model

PROMPTS = [
    "The Eiffel Tower is located in the city of",
    "Toyota is a company headquartered in",
    "The capital of Italy is",
    "Michael Jordan plays the sport of",
    "Mount Fuji is the highest mountain in",
    "The official language of Brazil is",
]


def direct_nll(model, windows):
    """Total next-token loss of each window from the model's own full-vocabulary forward."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            ids = torch.tensor([w])
            logits = model(input_ids=ids).logits[0, :-1].float()
            total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += len(w) - 1
    return total, count


def trained(model, tok, text, steps=30):
    """The tiny random model after a few optimizer steps on ``text`` (a random model is near uniform)."""
    batch = torch.tensor([w for w in text_windows(tok, text, 32) if len(w) == 32])
    model.requires_grad_(True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model.requires_grad_(False).eval()


def perturbed(model, scale=3.0, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.std().clamp_min(1e-3))
    return model


def test_heldout_text_is_shipped_prose():
    text = heldout_text()
    assert 2500 <= len(text.split()) <= 4000
    assert "Rivers and Deltas" in text


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_perplexity_equals_a_direct_computation(family):
    model, tok = tiny_model(family)
    text = heldout_text()[:3000]
    windows = text_windows(tok, text, 48)
    assert sum(len(w) - 1 for w in windows) == len(tok(text, add_special_tokens=False)["input_ids"])
    total, count = direct_nll(model, windows)
    score = text_score(model, tok, text, window=48, batch_size=3, head_chunk=17)
    assert score.tokens == count and score.windows == len(windows)
    assert score.mean_nll == pytest.approx(total / count, rel=1e-5)
    assert perplexity(model, tok, text, window=48) == pytest.approx(math.exp(total / count), rel=1e-5)


def test_windows_hold_every_token_once_and_fit():
    _, tok = tiny_model("llama")
    windows = text_windows(tok, heldout_text(), 32)
    assert all(len(w) <= 32 and w[0] == tok.bos_token_id for w in windows)
    with pytest.raises(ValueError, match="no room"):
        text_windows(tok, "some text", 1)


def test_scoring_leaves_the_model_unchanged_and_perturbation_raises_perplexity():
    model, tok = tiny_model("llama")
    text = heldout_text()[:4000]
    untrained = perplexity(model, tok, text, window=64)
    model = trained(model, tok, text)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ppl = perplexity(model, tok, text, window=64)
    assert ppl < 0.5 * untrained
    greedy_answers(model, tok, PROMPTS, 6)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert perplexity(model, tok, text, window=64) == ppl
    assert perplexity(perturbed(model), tok, text, window=64) > 1.5 * ppl


def test_unchanged_share_of_the_same_model_is_one_and_falls_when_perturbed():
    model, tok = tiny_model("llama")
    model = trained(model, tok, heldout_text()[:4000])
    answers = greedy_answers(model, tok, PROMPTS, [6, 7, 6, 5, 6, 8])
    assert len(answers) == len(PROMPTS) and all(isinstance(a, str) for a in answers)
    assert unchanged_share(answers, greedy_answers(model, tok, PROMPTS, [6, 7, 6, 5, 6, 8])) == 1.0
    after = greedy_answers(perturbed(model, scale=5.0), tok, PROMPTS, [6, 7, 6, 5, 6, 8])
    assert unchanged_share(answers, after) < 0.5


def test_unchanged_share_on_text():
    assert unchanged_share([" Paris, France.", " Japan"], [" Paris. It is", " Germany"]) == 0.5
    assert unchanged_share([], []) == 1.0
    with pytest.raises(ValueError):
        unchanged_share([" a"], [])
    with pytest.raises(ValueError, match="budgets"):
        greedy_answers(None, None, PROMPTS, [3])
