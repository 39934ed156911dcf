import math

import pytest
import torch

from kedit_core.evaluate import Evaluator, ngram_entropy, token_accuracy
from kedit_core.evaluate.evaluator import Reference
from kedit_core.ops.tokens import split_prompt_target
from kedit_core.request import EditRequest
from kedit_core.testing import tiny_model, tiny_requests


def test_token_accuracy_hand_computed():
    assert token_accuracy([1, 2, 3], [1, 0, 3]) == pytest.approx(2 / 3)
    assert token_accuracy([5], [5]) == 1.0
    assert token_accuracy([], []) == 0.0


def test_ngram_entropy_hand_computed():
    # "a b a b": bigrams ab, ba, ab -> p = 2/3, 1/3 ; trigrams aba, bab -> 1/2, 1/2
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    h3 = 1.0
    expected = (2 / 3 * h2 + 4 / 3 * h3) / 2
    assert ngram_entropy("a b a b") == pytest.approx(expected)
    assert ngram_entropy("the the the the the") == 0.0


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_batched_scores_match_one_at_a_time_full_forward(family):
    model, tok = tiny_model(family)
    ev = Evaluator(model, tok, batch_size=3)
    pairs = [
        ("The Eiffel Tower is located in the city of", "Rome"),
        ("Toyota is a company headquartered in", "Japan"),
        ("Michael Jordan plays", "the sport of basketball"),
        ("Paris", "is the capital of France"),
    ]
    scores = ev.score_pairs(pairs)
    for (prompt, target), s in zip(pairs, scores, strict=False):
        p, t = split_prompt_target(tok, prompt, target)
        with torch.no_grad():
            logits = model(torch.tensor([p + t])).logits[0].float()
        logp = torch.log_softmax(logits, -1)
        expect_pred = [logits[len(p) - 1 + j].argmax().item() for j in range(len(t))]
        expect_lp = [logp[len(p) - 1 + j, tok_id].item() for j, tok_id in enumerate(t)]
        assert s.predicted == expect_pred and s.target == t
        assert s.logprobs == pytest.approx(expect_lp, abs=1e-4)


def test_metrics_definitions_on_tiny_model():
    model, tok = tiny_model("llama")
    ev = Evaluator(model, tok)
    req = tiny_requests()[0]
    refs = ev.reference([req])
    [m] = ev.evaluate([req], refs)
    assert m["locality"] == 1.0  # nothing changed since the reference
    rel = ev.score_pairs([(req.prompt, req.target_new)])[0]
    assert m["reliability"] == rel.accuracy
    new, true = ev.score_pairs([(req.prompt, req.target_new), (req.prompt, req.ground_truth)])
    assert m["efficacy_score"] == float(new.mean_nll < true.mean_nll)
    assert set(m) >= {
        "reliability",
        "generalization",
        "locality",
        "efficacy_score",
        "paraphrase_score",
        "neighborhood_score",
    }


def test_locality_against_a_changed_reference():
    model, tok = tiny_model("llama")
    ev = Evaluator(model, tok)
    req = tiny_requests()[0]
    [ref] = ev.reference([req])
    n = len(ref.locality_tokens[0])
    wrong = Reference([[t + 1 for t in ref.locality_tokens[0]]])
    assert ev.evaluate([req], [wrong])[0]["locality"] == 0.0
    half = Reference([ref.locality_tokens[0][:1] + [-1] * (n - 1)])
    assert ev.evaluate([req], [half])[0]["locality"] == pytest.approx(1 / n)


def test_generation_and_fluency():
    model, tok = tiny_model("gemma3")
    ev = Evaluator(model, tok, max_new_tokens=5)
    texts = ev.generate(["The capital of Italy is", "Paris"])
    assert len(texts) == 2
    req = EditRequest(prompt="The capital of Italy is", subject="Italy", target_new="Paris")
    [m] = ev.evaluate([req])
    assert m["fluency"] >= 0.0 and "ground_truth" not in m


def test_reference_from_the_pre_edit_pass_equals_a_separate_reference():
    model, tok = tiny_model("gpt2")
    ev = Evaluator(model, tok)
    reqs = tiny_requests()
    metrics, refs = ev.evaluate_with_reference(reqs)
    assert [r.locality_tokens for r in refs] == [r.locality_tokens for r in ev.reference(reqs)]
    assert metrics == ev.evaluate(reqs, refs)
