"""Editing is a transaction: a run that fails part-way leaves the model exactly as it was before the
call (issue 15), and what cannot work is refused before the first edit."""

import json
import re

import pytest

from kedit_core.editor import Editor
from kedit_core.errors import EditError, RequestError
from kedit_core.evaluate import Evaluator
from kedit_core.patch import revert_all, stack
from kedit_core.request import EditRequest, Probe
from kedit_core.testing import state_fingerprint, tiny_model, tiny_requests

HP = {"layers": [1], "lr": 0.05, "num_steps": 3}
LONG = "The Eiffel Tower is located in " * 40 + "the city of"  # ~560 tokens; the tiny models have 128 positions

pytestmark = pytest.mark.usefixtures("ft_plugin")


def editor(family: str = "gpt2") -> Editor:
    model, tok = tiny_model(family)
    return Editor("ft-m", model, tok, hparams=HP)


def failing_on_call(ed: Editor, n: int, exc: Exception) -> list[int]:
    """Make the method raise ``exc`` on its ``n``-th compute_patch call (1-based)."""
    calls = []
    original = ed.method.compute_patch

    def compute_patch(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise exc
        return original(*args, **kwargs)

    ed.method.compute_patch = compute_patch
    return calls


def assert_pristine(ed: Editor, before: dict) -> None:
    assert state_fingerprint(ed.model) == before
    assert stack(ed.model) == []
    assert revert_all(ed.model) == 0 and state_fingerprint(ed.model) == before


@pytest.mark.parametrize("keep", [False, True])
def test_too_long_request_is_refused_before_any_edit(keep):
    ed = editor()
    before = state_fingerprint(ed.model)
    calls = failing_on_call(ed, 0, RuntimeError("never"))
    too_long = EditRequest(prompt=LONG, subject="The Eiffel Tower", target_new="Rome")
    with pytest.raises(
        RequestError,
        match=r"^record 1: prompt \+ target 'Rome' is \d+ tokens, more than the "
        r"model's 128 positions",
    ):
        ed.edit([tiny_requests()[0], too_long], sequential=True, keep_original_weight=keep)
    assert calls == []  # nothing was computed
    assert_pristine(ed, before)


@pytest.mark.parametrize(
    "field,update",
    [
        ("rephrase_prompts[1]", {"rephrase_prompts": ("Where is it?", LONG)}),
        ("locality[0]", {"locality": (Probe(prompt=LONG, target="Japan"),)}),
        ("portability[0]", {"portability": (Probe(prompt=LONG, target="Italy"),)}),
        ("neighborhood_prompts[0]", {"neighborhood_prompts": (LONG,)}),
    ],
)
def test_too_long_probe_is_refused_with_record_index_and_field(field, update):
    ed = editor("llama")
    reqs = tiny_requests()
    reqs[1] = reqs[1].model_copy(update=update)
    with pytest.raises(RequestError, match="^record 1: " + re.escape(field) + r" \+ target"):
        ed.edit(reqs)


def test_generation_prompt_is_checked_with_the_generated_tokens_only_when_generation_is_on():
    ed = editor("llama")
    gen = "Toyota is a company headquartered in"
    while len(ed.tokenizer(gen)["input_ids"]) < 100:  # fits in 128 positions, but not with 40 more tokens
        gen += " Japan"
    reqs = [tiny_requests()[0].model_copy(update={"generation_prompts": (gen,)})]
    with pytest.raises(RequestError, match=r"^record 0: generation_prompts\[0\] \+ 40 generated tokens is \d+ tokens"):
        ed.edit(reqs)
    ed.edit(reqs, generation=False)  # without the generation protocol nothing is generated: accepted


@pytest.mark.parametrize("keep", [False, True])
def test_failed_sequential_run_leaves_the_model_bit_identical(keep):
    ed = editor()
    before = state_fingerprint(ed.model)
    failing_on_call(ed, 2, IndexError("index out of range in self"))
    with pytest.raises(
        EditError, match=r"^record 1: method 'ft-m' failed: IndexError: index out of range in self$"
    ) as err:
        ed.edit(tiny_requests(), sequential=True, keep_original_weight=keep)
    assert isinstance(err.value.__cause__, IndexError)
    assert_pristine(ed, before)
    result = editor().edit(tiny_requests(), sequential=True, keep_original_weight=False)  # the editor still works
    assert len(result.patches) == 2


def test_failure_after_the_patch_is_applied_reverts_it(monkeypatch):
    ed = editor("llama")
    before = state_fingerprint(ed.model)
    original = Evaluator.evaluate

    def evaluate(self, requests, references=None):
        if stack(self.model):
            raise RuntimeError("scoring failed")
        return original(self, requests, references)

    monkeypatch.setattr(Evaluator, "evaluate", evaluate)
    with pytest.raises(RuntimeError, match="scoring failed"):
        ed.edit(tiny_requests()[:1], keep_original_weight=False)
    assert_pristine(ed, before)
    with pytest.raises(RuntimeError, match="scoring failed"):
        ed.edit(tiny_requests(), sequential=True, keep_original_weight=False)
    assert_pristine(ed, before)


def test_interrupt_restores_the_model():
    ed = editor("llama")
    before = state_fingerprint(ed.model)
    failing_on_call(ed, 3, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        ed.edit(tiny_requests() * 2, sequential=True, keep_original_weight=False, evaluate=False)
    assert_pristine(ed, before)


def test_failed_resumable_run_keeps_saved_progress_and_resumes(tmp_path):
    reqs = [*tiny_requests(), tiny_requests()[0].model_copy(update={"target_new": "Berlin"})]
    full = editor("llama")
    full.edit(reqs, sequential=True, keep_original_weight=False, evaluate=False)
    ed = editor("llama")
    before = state_fingerprint(ed.model)
    failing_on_call(ed, 3, ValueError("bad"))
    with pytest.raises(EditError, match="^record 2: method 'ft-m' failed: ValueError: bad$"):
        ed.edit(reqs, sequential=True, keep_original_weight=False, evaluate=False, run_dir=tmp_path)
    assert_pristine(ed, before)
    assert json.loads((tmp_path / "run.json").read_text())["done"] == 2  # the last saved edit
    calls = failing_on_call(ed, 0, RuntimeError("never"))
    ed.edit(reqs, sequential=True, keep_original_weight=False, evaluate=False, run_dir=tmp_path)
    assert len(calls) == 1  # only the third edit is computed again
    assert state_fingerprint(ed.model) == state_fingerprint(full.model)


def test_contradictory_requests_in_one_batch_are_refused_with_both_record_indices():
    ed = editor("llama")
    before = state_fingerprint(ed.model)
    a, b = tiny_requests()
    berlin = a.model_copy(update={"target_new": "Berlin", "prompt": a.prompt + "  "})
    with pytest.raises(
        RequestError,
        match=r"^records 2 and 3 ask the same prompt .* \('Rome' and 'Berlin'\) in one batch; "
        "edit them in separate batches or sequentially$",
    ):
        ed.edit([a, b, a, berlin], batch_size=2, evaluate=False)
    assert_pristine(ed, before)
    ed.edit([a, berlin], sequential=True, batch_size=1, evaluate=False)  # one after the other: the later wins
    ed.edit([a, b, berlin], batch_size=2, evaluate=False)  # in different batches
    ed.edit([a, a], batch_size=2, evaluate=False)  # the same request twice asks nothing contradictory
