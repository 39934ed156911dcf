"""SERAC's counterfactual model h_ψ(z_e, x): predicts the output for an in-scope input x given edit z_e.

Here h_ψ is the base model itself conditioned on the edit in context,

    h_ψ(z_e, x) = p_base( · | D ⊕ fact(z_e) ⊕ x )

where D are a few demonstrations taken from the training records at training time (a fact with a
counterfactual answer, then a rephrased question answered from the fact), stored in the checkpoint's
config.
"""

from __future__ import annotations

from kedit_core.request import EditRequest


def fact(prompt: str, target: str) -> str:
    """The edit as a statement: ``"<prompt> <target>.\\n"``."""
    return f"{prompt.rstrip()} {target.strip()}.\n"


def demonstration(request: EditRequest) -> str:
    """A fact followed by a rephrased query answered from it."""
    query = request.rephrase_prompts[0] if request.rephrase_prompts else request.prompt
    return fact(request.prompt, request.target_new) + fact(query, request.target_new) + "\n"


def pick_demonstrations(requests: list[EditRequest], n: int) -> list[str]:
    """The first ``n`` training records that have a rephrase, as demonstrations."""
    return [demonstration(r) for r in requests if r.rephrase_prompts][:n]


def context(demonstrations: list[str], prompt: str, target: str) -> str:
    """``D ⊕ fact(z_e)``: the text the counterfactual model reads before the input."""
    return "".join(demonstrations) + fact(prompt, target)
