"""Requests presented through a model's chat template.

kedit edits and scores a request's prompts as plain completions. An instruct model served through its
chat template reads each prompt as a user's message and answers after the template's assistant header;
:func:`in_chat_form` rewrites every prompt of a request that way, so that the edit is made, and scored, on
the text a chat user's question becomes. The subject stays inside the prompt, so methods that locate it
(ROME's last subject token) work unchanged; targets still continue the prompt after a space.
"""

from __future__ import annotations

from typing import Any

from .errors import KeditError
from .request import EditRequest, Probe

#: the ways a prompt can be presented: as written, or as the user's message in the chat template
PROMPT_FORMS = ("completion", "chat")


def chat_prompt(tokenizer: Any, text: str) -> str:
    """``text`` as the user's message of ``tokenizer``'s chat template, ending where the reply begins."""
    if not getattr(tokenizer, "chat_template", None):
        raise KeditError(f"{type(tokenizer).__name__} has no chat template; present the prompts as completions")
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def in_chat_form(request: EditRequest, tokenizer: Any) -> EditRequest:
    """``request`` with its prompt, paraphrases, probes, neighborhood and generation prompts in chat form."""

    def wrap(text: str) -> str:
        return chat_prompt(tokenizer, text)

    def probes(items: tuple[Probe, ...]) -> tuple[Probe, ...]:
        return tuple(p.model_copy(update={"prompt": wrap(p.prompt)}) for p in items)

    return request.model_copy(
        update={
            "prompt": wrap(request.prompt),
            "rephrase_prompts": tuple(map(wrap, request.rephrase_prompts)),
            "locality": probes(request.locality),
            "portability": probes(request.portability),
            "neighborhood_prompts": tuple(map(wrap, request.neighborhood_prompts)),
            "generation_prompts": tuple(map(wrap, request.generation_prompts)),
        }
    )


def present(requests: list[EditRequest], tokenizer: Any, form: str) -> list[EditRequest]:
    """``requests`` in prompt ``form`` (one of :data:`PROMPT_FORMS`)."""
    if form not in PROMPT_FORMS:
        raise KeditError(f"prompt form {form!r}: expected one of {', '.join(PROMPT_FORMS)}")
    if form == "completion":
        return list(requests)
    return [in_chat_form(r, tokenizer) for r in requests]
