"""Batched evaluation of edit requests under both protocols: teacher-forced (one padded forward per
batch of (prompt, target) pairs, logits only at target positions) and generation (greedy continuations
scored on their answer span, :mod:`.protocol`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import KeditError
from ..ops.logits import logits_at, model_device
from ..ops.tokens import encode_pairs
from ..request import EditRequest
from . import protocol
from .generation import greedy_continuations
from .metrics import mean, token_accuracy
from .protocol import Generations, Reference


@dataclass
class PairScore:
    predicted: list[int]
    target: list[int]
    logprobs: list[float]

    @property
    def accuracy(self) -> float:
        return token_accuracy(self.predicted, self.target)

    @property
    def mean_nll(self) -> float:
        return -sum(self.logprobs) / max(1, len(self.logprobs))


@dataclass
class Evaluator:
    """Scores requests on a model. ``generation`` adds the generation protocol, fluency and the
    degeneracy check (greedy decoding: slower); ``last_generations`` holds the continuations of the
    latest :meth:`evaluate` per request, for plugin judges (``register_metrics``) and reports."""

    model: nn.Module
    tokenizer: Any
    batch_size: int = 32
    generation: bool = True
    #: tokens of the fluency continuations (no early stop)
    max_new_tokens: int = 40
    #: an answer may run this many tokens past the target's length before it is cut
    answer_slack: int = 8
    #: a request whose fluency falls more than this many bits below the unedited model's is degenerate
    fluency_drop: float = 1.0
    last_generations: list[Generations] = field(default_factory=list)

    def answer_budget(self, target: str) -> int:
        return len(self.tokenizer(" " + target, add_special_tokens=False)["input_ids"]) + self.answer_slack

    # -- core scoring ---------------------------------------------------------------------------
    @torch.no_grad()
    def score_pairs(self, pairs: list[tuple[str, str]]) -> list[PairScore]:
        """Teacher-forced argmax tokens and target log-probs for each (prompt, target)."""
        results: list[PairScore | None] = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
        device = model_device(self.model)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            enc = encode_pairs(self.tokenizer, [pairs[i][0] for i in idx], [pairs[i][1] for i in idx], device)
            rows, cols = enc.target_positions()
            logits = logits_at(self.model, enc.input_ids, enc.attention_mask, rows, cols).float()
            logp = torch.log_softmax(logits, dim=-1)
            targets = enc.flat_targets().to(logp.device)
            picked = logp.gather(1, targets[:, None])[:, 0].tolist()
            argmax = logp.argmax(-1).tolist()
            k = 0
            for j, i in enumerate(idx):
                n = len(enc.target_ids[j])
                results[i] = PairScore(argmax[k : k + n], enc.target_ids[j], picked[k : k + n])
                k += n
        return results  # type: ignore[return-value]

    def reference(self, requests: list[EditRequest]) -> list[Reference]:
        """Record the unedited model's locality predictions (call before editing)."""
        pairs = [(p.prompt, p.target) for r in requests for p in r.locality]
        scores = iter(self.score_pairs(pairs)) if pairs else iter(())
        return [Reference([next(scores).predicted for _ in r.locality]) for r in requests]

    # -- metrics ----------------------------------------------------------------------------------
    def evaluate(
        self, requests: list[EditRequest], references: list[Reference] | None = None
    ) -> list[dict[str, float]]:
        """Per-request metrics. Locality needs the ``references`` taken before the edit; without
        them it is the accuracy of the probes' own answers."""
        return self._evaluate(requests, references)[0]

    def evaluate_with_reference(self, requests: list[EditRequest]) -> tuple[list[dict[str, float]], list[Reference]]:
        """Metrics of the unedited model and, from the same forward passes, the locality references."""
        return self._evaluate(requests, None, self_reference=True)

    def _evaluate(
        self, requests: list[EditRequest], references: list[Reference] | None, self_reference: bool = False
    ) -> tuple[list[dict[str, float]], list[Reference]]:
        pairs: list[tuple[str, str]] = []
        index: dict[tuple[str, str], int] = {}
        slots: list[tuple[int, str, int, int]] = []

        def add(i: int, kind: str, j: int, prompt: str, target: str) -> None:
            key = (prompt, target)
            if key not in index:  # CounterFact's locality probes are its neighborhood prompts: score once
                index[key] = len(pairs)
                pairs.append(key)
            slots.append((i, kind, j, index[key]))

        for i, r in enumerate(requests):
            add(i, "rel", 0, r.prompt, r.target_new)
            for j, p in enumerate(r.rephrase_prompts):
                add(i, "gen", j, p, r.target_new)
            for j, probe in enumerate(r.locality):
                add(i, "loc", j, probe.prompt, probe.target)
            for j, probe in enumerate(r.portability):
                add(i, "port", j, probe.prompt, probe.target)
            if r.ground_truth:
                add(i, "es_true", 0, r.prompt, r.ground_truth)
                for j, p in enumerate(r.rephrase_prompts):
                    add(i, "ps_true", j, p, r.ground_truth)
                for j, p in enumerate(r.neighborhood_prompts):
                    add(i, "ns_true", j, p, r.ground_truth)
                    add(i, "ns_new", j, p, r.target_new)
        scores = self.score_pairs(pairs)
        table: list[dict[str, dict[int, PairScore]]] = [{} for _ in requests]
        for i, kind, j, k in slots:
            table[i].setdefault(kind, {})[j] = scores[k]
        own_refs = [
            Reference([table[i]["loc"][j].predicted for j in range(len(r.locality))]) for i, r in enumerate(requests)
        ]
        if self_reference:
            references = own_refs
        out = []
        for i, r in enumerate(requests):
            t = table[i]
            m: dict[str, float] = {"reliability": t["rel"][0].accuracy}
            if r.rephrase_prompts:
                m["generalization"] = mean([s.accuracy for s in t["gen"].values()])
            if r.locality:
                if references is not None:
                    ref = references[i].locality_tokens
                    m["locality"] = mean(
                        [token_accuracy(t["loc"][j].predicted, ref[j]) for j in range(len(r.locality))]
                    )
                else:
                    m["locality"] = mean([s.accuracy for s in t["loc"].values()])
            if r.portability:
                m["portability"] = mean([s.accuracy for s in t["port"].values()])
            if r.ground_truth:
                m["efficacy_score"] = float(t["rel"][0].mean_nll < t["es_true"][0].mean_nll)
                if r.rephrase_prompts:
                    m["paraphrase_score"] = mean(
                        [float(t["gen"][j].mean_nll < t["ps_true"][j].mean_nll) for j in range(len(r.rephrase_prompts))]
                    )
                if r.neighborhood_prompts:
                    m["neighborhood_score"] = mean(
                        [
                            float(t["ns_true"][j].mean_nll < t["ns_new"][j].mean_nll)
                            for j in range(len(r.neighborhood_prompts))
                        ]
                    )
            out.append(m)
        if self.generation:
            own_refs = self._generation_metrics(out, requests, references, own_refs, self_reference)
        self._plugin_metrics(out, requests, own_refs if self_reference else references)
        return out, own_refs

    def _generation_metrics(
        self,
        out: list[dict[str, float]],
        requests: list[EditRequest],
        references: list[Reference] | None,
        own_refs: list[Reference],
        self_reference: bool,
    ) -> list[Reference]:
        """Add the generation-scored metrics to ``out``; returns the references completed with this
        model's continuations (the unedited model's, when ``self_reference``)."""
        gens = protocol.generate_all(self, requests)
        full = [
            protocol.reference_of(r, g, ref.locality_tokens) for r, g, ref in zip(requests, gens, own_refs, strict=True)
        ]
        refs = full if self_reference else references
        for i, (r, g) in enumerate(zip(requests, gens, strict=True)):
            ref = refs[i] if refs is not None else None
            protocol.flag_degenerate(g, ref, self.fluency_drop)
            out[i].update(protocol.score(r, g, ref))
        self.last_generations = gens
        return full

    def _plugin_metrics(
        self, out: list[dict[str, float]], requests: list[EditRequest], references: list[Reference] | None
    ) -> None:
        """Metrics plugins registered (``register_metrics``), each computed on the model as it is now."""
        from ..plugins import get_registry

        for metric in get_registry().metrics:
            values = metric.compute(self, requests, references)
            if len(values) != len(requests):
                raise KeditError(f"metric {metric.name!r} gave {len(values)} values for {len(requests)} requests")
            for m, value in zip(out, values, strict=True):
                if value is not None:
                    m[metric.name] = float(value)

    # -- generation -----------------------------------------------------------------------------
    def generate(self, prompts: list[str], max_new_tokens: int | None = None, show_special: bool = False) -> list[str]:
        """Greedy continuations (left-padded batches) of ``max_new_tokens`` tokens or up to EOS; returns
        only the generated text, special tokens left out (``show_special``: shown)."""
        n = max_new_tokens or self.max_new_tokens
        conts = greedy_continuations(
            self.model, self.tokenizer, prompts, [n] * len(prompts), stop_at_answer=False, batch_size=self.batch_size
        )
        return [c.shown if show_special else c.text for c in conts]
