"""Batched evaluation of edit requests: one padded forward per batch of (prompt, target) pairs,
logits only at target positions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import KeditError
from ..ops.logits import logits_at, model_device
from ..ops.tokens import encode_pairs
from ..request import EditRequest
from .metrics import mean, ngram_entropy, token_accuracy


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
class Reference:
    """What the unedited model predicts on a request's locality probes (the locality baseline)."""

    locality_tokens: list[list[int]] = field(default_factory=list)


@dataclass
class Evaluator:
    """Scores requests on a model. ``fluency`` turns on greedy generation (slower)."""

    model: nn.Module
    tokenizer: Any
    batch_size: int = 32
    fluency: bool = False
    max_new_tokens: int = 40

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
        if self.fluency:
            for m, value in zip(out, self.fluency_scores(requests), strict=True):
                m["fluency"] = value
        self._plugin_metrics(out, requests, references)
        return out, own_refs

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
    @torch.no_grad()
    def generate(self, prompts: list[str], max_new_tokens: int | None = None) -> list[str]:
        """Greedy continuations (left-padded batches); returns only the generated text."""
        tok = self.tokenizer
        device = model_device(self.model)
        outputs: list[str] = []
        side = tok.padding_side
        tok.padding_side = "left"
        try:
            for start in range(0, len(prompts), self.batch_size):
                batch = [p.rstrip() for p in prompts[start : start + self.batch_size]]
                enc = tok(batch, return_tensors="pt", padding=True).to(device)
                gen = self.model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens or self.max_new_tokens,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                    top_p=None,
                    top_k=None,
                    temperature=None,
                )
                new = gen[:, enc["input_ids"].shape[1] :]
                outputs.extend(tok.batch_decode(new, skip_special_tokens=True))
        finally:
            tok.padding_side = side
        return outputs

    def fluency_scores(self, requests: list[EditRequest]) -> list[float]:
        prompts, owner = [], []
        for i, r in enumerate(requests):
            for p in r.generation_prompts or (r.prompt,):
                prompts.append(p)
                owner.append(i)
        texts = self.generate(prompts)
        per: list[list[float]] = [[] for _ in requests]
        for i, p, text in zip(owner, prompts, texts, strict=False):
            per[i].append(ngram_entropy(p + " " + text))
        return [mean(v) or 0.0 for v in per]
