"""Requests in chat form: every prompt of a request becomes the user's message of the tokenizer's chat
template, ending at the assistant header; the rest of the request is kept; a tokenizer without a template
is refused."""

import pytest

from kedit_core.chat import chat_prompt, in_chat_form, present
from kedit_core.errors import KeditError
from kedit_core.testing import tiny_requests, tiny_tokenizer

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture
def tok():
    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def test_chat_prompt_is_the_users_message_up_to_the_reply(tok):
    assert chat_prompt(tok, "Paris is in") == "<|user|>Paris is in<|end|>\n<|assistant|>\n"


def test_every_prompt_of_a_request_is_wrapped_and_the_rest_kept(tok):
    r = tiny_requests()[0]
    c = in_chat_form(r, tok)
    assert c.prompt == chat_prompt(tok, r.prompt)
    assert c.rephrase_prompts == tuple(chat_prompt(tok, p) for p in r.rephrase_prompts)
    assert [p.prompt for p in c.locality] == [chat_prompt(tok, p.prompt) for p in r.locality]
    assert [p.target for p in c.locality] == [p.target for p in r.locality]
    assert c.neighborhood_prompts == tuple(chat_prompt(tok, p) for p in r.neighborhood_prompts)
    assert (c.subject, c.target_new, c.ground_truth) == (r.subject, r.target_new, r.ground_truth)
    assert c.prompt[c.subject_span()[0] :].startswith(r.subject)


def test_present_keeps_completions_and_refuses_unknown_forms(tok):
    reqs = tiny_requests()
    assert present(reqs, tok, "completion") == reqs
    assert [r.prompt for r in present(reqs, tok, "chat")] == [chat_prompt(tok, r.prompt) for r in reqs]
    with pytest.raises(KeditError, match="prompt form 'dialog'"):
        present(reqs, tok, "dialog")


def test_a_tokenizer_without_a_template_is_refused():
    with pytest.raises(KeditError, match="no chat template"):
        chat_prompt(tiny_tokenizer(), "Paris is in")
