"""The generation protocol: answer spans, matches, degeneracy -- on text, and end to end on tiny models
whose output layer is steered by a hook (a loop, a special token)."""

import pytest
import torch

from kedit_core.evaluate import Evaluator
from kedit_core.evaluate.answers import (
    answer_span,
    answer_text,
    contains,
    exact_match,
    normalize,
    repeated_ngram,
    same_answer,
    starts_with,
)
from kedit_core.evaluate.generation import answer_complete, greedy_continuations, special_ids
from kedit_core.evaluate.protocol import KINDS, Generations, Reference, first_words, flag_degenerate, reference_of
from kedit_core.request import EditRequest
from kedit_core.testing import tiny_model, tiny_requests


@pytest.mark.parametrize(
    ("continuation", "target", "span"),
    [
        (" Rome, Italy. It is old.", "Rome", "Rome"),
        (" Constantinople in 1851. The", "Constantinople", "Constantinople"),
        (" bishop of Jerusalem, was the first", "bishop", "bishop"),
        (" Bank of America in 1998", "Bank of America", "Bank of America"),
        ("\n\nWashington, D.C. is a city", "Washington, D.C.", "Washington, D.C"),
        (" J. R. R. Tolkien. He", "J. R. R. Tolkien", "J. R. R. Tolkien"),
        (" the Buddha. In", "Buddhism", "the Buddha"),
        (" Paris\nLondon", "Paris", "Paris"),
    ],
)
def test_answer_span_is_the_leading_phrase(continuation, target, span):
    assert answer_span(continuation, target) == span


def test_matches_hand_checked():
    assert exact_match(" The Eiffel Tower. It", "Eiffel Tower")
    assert not exact_match(" Honda Motor Company", "Honda")
    assert starts_with(" Honda Motor Company", "Honda") and not starts_with(" Hondas are", "Honda")
    assert contains(" In 2006, it began", "2006") and not exact_match(" In 2006, it began", "2006")
    assert not contains(" Paris.\n\nRome is", "Rome")  # the answer ends at the newline
    assert not exact_match(" anything", "") and not starts_with(" ", "Rome")
    assert normalize("The  Côte-d'Ivoire!") == "côte d ivoire"
    # markup is not part of the answer; an angle bracket that opens no tag stays
    assert exact_match(" <strong>actor</strong>.\n\nDino is", "actor")
    assert normalize('<a href="x">Rome</a> <br/> 3 < 4 >') == "rome 3 4"


def test_answer_text_stops_at_newline_and_sentence_end():
    assert answer_text("\n\n Rome. It is old.") == "Rome."
    assert answer_text(" St. Petersburg is big. Yes") == "St. Petersburg is big."
    assert answer_text(" version 2.5 of it") == "version 2.5 of it"
    assert answer_complete(" Rome. It") and answer_complete(" Rome\n")
    assert not answer_complete("\n\n Rome") and not answer_complete(" Rome.")


def test_same_answer_compares_spans():
    assert same_answer(" Tokyo, Japan. It", " Tokyo. The city")
    assert not same_answer(" Madrid, Spain.", " Tokyo, Japan.")


def test_repeated_ngram_finds_loops_not_ordinary_text():
    assert repeated_ngram("Madrid, Madrid Madrid Madrid Madrid") == "madrid"
    assert repeated_ngram("of the city of the city of the city") == "of the city"
    assert repeated_ngram("It is the tallest building in the world. It is old.") is None
    assert repeated_ngram("a b a b") is None


def _steer(model, token_id):
    """Make ``token_id`` the argmax at every position."""

    def hook(module, args, output):
        output = output.clone()
        output[..., token_id] += 1e4
        return output

    return model.lm_head.register_forward_hook(hook)


def test_continuations_stop_at_budget_and_keep_special_tokens():
    model, tok = tiny_model("gpt2")
    bos = tok.convert_tokens_to_ids("<bos>")
    assert bos in special_ids(tok) and tok.eos_token_id not in special_ids(tok)
    handle = _steer(model, bos)
    try:
        [a, b] = greedy_continuations(model, tok, ["The capital", "Japan is"], [3, 5], stop_at_answer=True)
    finally:
        handle.remove()
    assert a.text == b.text == "" and a.specials == [bos] * 3 and b.specials == [bos] * 5
    assert a.shown.count("<bos>") == 3  # what kedit edit prints: the special tokens shown


def test_continuations_stop_at_eos():
    model, tok = tiny_model("gpt2")
    handle = _steer(model, tok.eos_token_id)
    try:
        [c] = greedy_continuations(model, tok, ["The capital"], [6], stop_at_answer=False)
    finally:
        handle.remove()
    assert c.text == "" and c.specials == []


def test_batched_continuations_equal_one_at_a_time():
    model, tok = tiny_model("llama")
    prompts = ["The capital of Japan is", "Paris", "A much longer prompt about the capital of France"]
    together = greedy_continuations(model, tok, prompts, [4, 7, 5], stop_at_answer=False, batch_size=3)
    alone = [
        greedy_continuations(model, tok, [p], [n], stop_at_answer=False)[0]
        for p, n in zip(prompts, [4, 7, 5], strict=True)
    ]
    assert [c.text for c in together] == [c.text for c in alone]


def _word(tok):
    [token] = tok(" capital", add_special_tokens=False)["input_ids"]
    return token


def _request():
    return EditRequest(
        prompt="The capital of Japan is",
        subject="Japan",
        target_new="capital",
        rephrase_prompts=("Japan's capital is",),
        locality=({"prompt": "Paris is in", "target": "France"},),
    )


def test_a_loop_the_edit_causes_is_degenerate_and_fails_success_metrics():
    model, tok = tiny_model("gpt2")
    ev = Evaluator(model, tok, max_new_tokens=8)
    req = _request()
    [pre], [ref] = ev.evaluate_with_reference([req])
    assert pre["degenerate"] == 0.0 and pre["gen_locality"] == 1.0
    handle = _steer(model, _word(tok))  # "capital capital capital ...": the target first, then a loop
    try:
        [post] = ev.evaluate([req], [ref])
        gens = ev.last_generations[0]
    finally:
        handle.remove()
    assert post["gen_reliability_starts"] == 0.0 and post["degenerate"] == 1.0
    assert any(f.startswith("repeats 'capital'") for f in gens.flags)
    assert gens.answer.split()[:3] == ["capital"] * 3


def test_a_loop_the_unedited_model_already_makes_is_not_blamed_on_the_edit():
    model, tok = tiny_model("gpt2")
    ev = Evaluator(model, tok, max_new_tokens=8)
    handle = _steer(model, _word(tok))
    try:
        [pre], refs = ev.evaluate_with_reference([_request()])
        [post] = ev.evaluate([_request()], refs)
    finally:
        handle.remove()
    assert pre["degenerate"] == post["degenerate"] == 0.0
    # the answer starts with the target; its span ("capital capital ...") is not the target alone
    assert post["gen_reliability_starts"] == 1.0 and post["gen_reliability"] == 0.0


def test_special_tokens_make_a_request_degenerate():
    model, tok = tiny_model("gpt2")
    ev = Evaluator(model, tok, max_new_tokens=4)
    [_], refs = ev.evaluate_with_reference([_request()])
    handle = _steer(model, tok.convert_tokens_to_ids("<bos>"))
    try:
        [post] = ev.evaluate([_request()], refs)
    finally:
        handle.remove()
    assert post["degenerate"] == 1.0 and post["gen_locality"] == 0.0
    assert any("special token" in f for f in ev.last_generations[0].flags)


def test_fluency_drop_against_the_reference_is_flagged():
    model, tok = tiny_model("gpt2")
    ev = Evaluator(model, tok, max_new_tokens=8)
    [_], [ref] = ev.evaluate_with_reference([_request()])
    high = Reference(ref.locality_tokens, ref.locality_answers, (ref.fluency or 0.0) + 5.0, ref.repeating)
    ev.evaluate([_request()], [high])
    assert any(f.startswith("fluency") for f in ev.last_generations[0].flags)
    ev.evaluate([_request()], [ref])
    assert not any(f.startswith("fluency") for f in ev.last_generations[0].flags)


UNEDITED = [
    " the German carmaker in 1964, and it has been built in Stuttgart ever since by a large team",
    " a sports car with a rear engine, sold in many countries and raced at Le Mans for decades",
]


def _fluency_generations(texts: list[str]) -> Generations:
    g = Generations({k: [] for k in KINDS}, {k: [] for k in KINDS})
    g.texts["fluency"], g.prompts["fluency"] = list(texts), ["Porsche 911, created by", "The 911 is"]
    return g


def test_a_continuation_that_ends_early_is_compared_at_its_own_length():
    """An answer that stops ("Honda" and the end) is short, not disfluent: it is held to the unedited
    continuation cut to the same words. A continuation as long as the unedited one is held to all of it."""
    ref = reference_of(_request(), _fluency_generations(UNEDITED), [])
    short = _fluency_generations([" Honda\n\n", " Honda\n\n"])
    flag_degenerate(short, ref, 1.0)
    assert short.flags == []
    old = Reference(ref.locality_tokens, ref.locality_answers, ref.fluency, ref.repeating)  # saved without texts
    flag_degenerate(short := _fluency_generations([" Honda\n\n", " Honda\n\n"]), old, 1.0)
    assert [f for f in short.flags if f.startswith("fluency")]
    babble = " the the car car the the car car the car the car the car the car the car the car"
    full = _fluency_generations([babble, babble])
    flag_degenerate(full, ref, 1.0)
    assert [f for f in full.flags if f.startswith("fluency")]


def test_first_words_cuts_after_the_nth_word_token():
    assert first_words(" Honda, in 1998. It was", 2) == " Honda,"
    assert first_words(" Honda", 5) == " Honda"
    assert first_words(" Honda", 0) == ""


def test_locality_compares_with_the_unedited_answers():
    model, tok = tiny_model("gpt2")
    ev = Evaluator(model, tok, max_new_tokens=6)
    reqs = tiny_requests()
    _, refs = ev.evaluate_with_reference(reqs)
    moved = [Reference(r.locality_tokens, ["zzz qqq" for _ in r.locality_answers or []], r.fluency) for r in refs]
    for m, r in zip(ev.evaluate(reqs, refs), reqs, strict=True):
        assert m.get("gen_locality", 1.0) == 1.0 or not r.locality
    for m, r in zip(ev.evaluate(reqs, moved), reqs, strict=True):
        if r.locality:
            assert m["gen_locality"] == 0.0


def test_reference_round_trips_and_reads_old_runs():
    ref = Reference([[1, 2]], ["Tokyo"], 4.5, ["p"], [" a continuation"])
    assert Reference.from_dict(ref.to_dict()) == ref
    assert Reference.from_dict([[1, 2]]) == Reference([[1, 2]])


def test_generation_off_scores_teacher_forced_only():
    model, tok = tiny_model("gpt2")
    [m] = Evaluator(model, tok, generation=False).evaluate([_request()])
    assert "reliability" in m and not any(k.startswith("gen_") for k in m) and "degenerate" not in m
    assert torch.is_grad_enabled()
