"""Hyperparameters of Knowledge Neurons (Dai et al. 2022)."""

from __future__ import annotations

from pydantic import Field

from kedit_core.hparams import Hyperparams

#: prefixes that turn the edit prompt into further knowledge-expressing prompts (Sec. 3.3 asks for
#: several prompts per fact; these do not use the request's evaluation paraphrases)
DEFAULT_PREFIXES = ["", "Fact: ", "Here is a fact. ", "I read that ", "As far as I know, "]


class KNHyperparams(Hyperparams):
    #: layers whose FFN neurons are attributed; null for every layer (the paper's setting)
    layers: list[int] | None = None
    #: m, the number of Riemann steps approximating the integral of Eq. 3
    steps: int = Field(default=20, ge=1)
    #: t: a neuron is a coarse knowledge neuron of a prompt if its attribution exceeds t * max
    adaptive_threshold: float = Field(default=0.2, gt=0, le=1)
    #: p: keep neurons that are coarse neurons of at least this fraction of the prompts
    share_threshold: float = Field(default=0.5, gt=0, le=1)
    #: keep at most this many neurons (largest summed attribution first); null for no limit
    max_neurons: int | None = Field(default=None, ge=1)
    #: lambda_1 and lambda_2 of the value-slot update (Sec. 5.1): slot -= l1 * e(t) and += l2 * e(t')
    erase_scale: float = Field(default=1.0, ge=0)
    insert_scale: float = Field(default=8.0, ge=0)
    #: multiply each slot's update by the sign of the neuron's activation on the edit prompt. Gated
    #: FFNs (LLaMA, Gemma) have negative activations, where the literal update of the paper (false)
    #: would push the output away from the new answer
    sign_by_activation: bool = True
    #: prompts for attribution: the edit prompt with each prefix ...
    prompt_prefixes: list[str] = Field(default_factory=lambda: list(DEFAULT_PREFIXES), min_length=1)
    #: ... and, if true, the request's rephrase prompts (they are also the paraphrase test prompts)
    use_rephrases: bool = False
    #: rows (layers x steps) of one forward/backward pass of the attribution
    rows_per_pass: int = Field(default=120, ge=1)
    batch_size: int = Field(default=1, ge=1, le=1)
