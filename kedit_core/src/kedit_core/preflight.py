"""Checks on edit requests made before the first edit, so a run never fails half-way on its input.

- :func:`check_lengths`: every text a run feeds the model -- the edit prompt with its targets,
  rephrases, locality and portability probes, neighborhood prompts, and (with the generation
  protocol) the prompts continued for fluency plus the tokens generated -- fits in the model's positions;
- :func:`check_batch_conflicts`: one batch does not ask the same prompt for two different targets
  (a batch method would silently average or pick one).

Errors are one line and name the record index: the request's position in the list given to the
Editor.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from .errors import RequestError
from .ops.tokens import split_prompt_target
from .request import EditRequest

#: tokens a tokenizer may add around a text beyond one per byte (prefix space, BOS/EOS, ...)
_TOKEN_SLACK = 8


def request_texts(request: EditRequest, generate: bool = False) -> Iterator[tuple[str, str, str | None]]:
    """``(field, prompt, target)`` for every text scored or edited for ``request``; ``target`` is None
    for generation prompts."""
    targets = [t for t in (request.target_new, request.ground_truth) if t]
    for target in targets:
        yield "prompt", request.prompt, target
        for j, p in enumerate(request.rephrase_prompts):
            yield f"rephrase_prompts[{j}]", p, target
        for j, p in enumerate(request.neighborhood_prompts):
            yield f"neighborhood_prompts[{j}]", p, target
    for kind in ("locality", "portability"):
        for j, probe in enumerate(getattr(request, kind)):
            yield f"{kind}[{j}]", probe.prompt, probe.target
    if generate:  # the fluency prompts of the generation protocol (evaluate.protocol.fluency_prompts)
        yield "prompt (generation)", request.prompt, None
        others = [(j, p) for j, p in enumerate(request.generation_prompts) if p != request.prompt]
        for j, p in others[:1]:
            yield f"generation_prompts[{j}]", p, None


def check_lengths(
    requests: Sequence[EditRequest],
    tokenizer: Any,
    max_positions: int | None,
    *,
    generate_tokens: int = 0,
    offset: int = 0,
) -> None:
    """Refuse any text of ``requests`` longer than ``max_positions`` tokens (None: no limit known).

    ``generate_tokens`` > 0 also checks the generation prompts with that many generated tokens.
    A text whose UTF-8 length plus a slack already fits is not tokenized (no tokenizer makes more
    than one token per byte, plus the special tokens it adds).
    """
    if not max_positions:
        return
    slack = _TOKEN_SLACK + _special_tokens(tokenizer)
    for i, request in enumerate(requests):
        for field, prompt, target in request_texts(request, generate=generate_tokens > 0):
            extra = generate_tokens if target is None else len((target or "").encode()) + 1
            if len(prompt.encode()) + extra + slack <= max_positions:
                continue
            if target is None:
                n = len(tokenizer(prompt.rstrip())["input_ids"]) + generate_tokens
                what = f"{field} + {generate_tokens} generated tokens"
            else:
                p_ids, t_ids = split_prompt_target(tokenizer, prompt, target)
                n, what = len(p_ids) + len(t_ids), f"{field} + target {target!r}"
            if n > max_positions:
                raise RequestError(
                    f"record {offset + i}{_case(request)}: {what} is {n} tokens, more than the model's "
                    f"{max_positions} positions; shorten it or leave it out"
                )


def check_batch_conflicts(requests: Sequence[EditRequest], offset: int = 0) -> None:
    """Refuse two requests of one batch that ask the same prompt for different targets."""
    seen: dict[str, int] = {}
    for i, request in enumerate(requests):
        j = seen.setdefault(" ".join(request.prompt.split()), i)
        first = requests[j]
        if j != i and first.target_new.strip() != request.target_new.strip():
            raise RequestError(
                f"records {offset + j} and {offset + i} ask the same prompt {request.prompt!r} for different "
                f"targets ({first.target_new!r} and {request.target_new!r}) in one batch; edit them in "
                "separate batches or sequentially"
            )


def _special_tokens(tokenizer: Any) -> int:
    try:
        return int(tokenizer.num_special_tokens_to_add(pair=False))
    except (AttributeError, TypeError, ValueError, NotImplementedError):
        return 4


def _case(request: EditRequest) -> str:
    return f" (case {request.case_id})" if request.case_id else ""
