"""The generation protocol: what the model says, scored against the target, and whether it degenerated.

For every request the evaluator greedily continues its rephrasings, its portability and locality probes
(each stopped at its answer's natural end or ``len(target tokens) + answer_slack`` tokens) and its
fluency prompts -- the edit prompt and the first of its generation prompts -- for ``max_new_tokens``
tokens with no early stop (the edit prompt's answer is read from the start of that continuation:
greedy decoding gives the same tokens either way). A request is
*degenerate* when any of its continuations holds a special/control token, repeats a word n-gram three
times in a row where the unedited model's continuation of the same prompt does not, or when the n-gram
entropy of its fluency continuations falls more than ``fluency_drop`` bits below the unedited model's.
A fluency continuation that ended early (EOS, or a method's own stop such as IKE's) is compared with the
unedited model's continuation cut to the same number of words: n-gram entropy grows with length, and
an answer that stops is short, not disfluent.
A degenerate request scores 0 on every generation-scored success metric (reliability, generalization,
portability), whatever its answer span says.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..request import EditRequest
from .answers import MATCHES, exact_match, repeated_ngram, same_answer
from .generation import Continuation, greedy_continuations
from .metrics import WORD_RE, mean, ngram_entropy

KINDS = ("reliability", "generalization", "portability", "locality", "fluency")


@dataclass
class Reference:
    """What the unedited model does on a request's probes: its teacher-forced argmax tokens on the
    locality probes, and (generation protocol) its continuations of them, the n-gram entropy of its
    fluency continuations and the prompts it already answers with a loop."""

    locality_tokens: list[list[int]] = field(default_factory=list)
    locality_answers: list[str] | None = None
    fluency: float | None = None
    repeating: list[str] = field(default_factory=list)
    #: the fluency continuations themselves (a shorter edited one is compared with them cut to its length)
    fluency_texts: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "locality_tokens": self.locality_tokens,
            "locality_answers": self.locality_answers,
            "fluency": self.fluency,
            "repeating": self.repeating,
            "fluency_texts": self.fluency_texts,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Reference:
        if isinstance(data, list):  # a run saved before the generation protocol: the tokens alone
            return cls(data)
        return cls(
            data.get("locality_tokens", []),
            data.get("locality_answers"),
            data.get("fluency"),
            data.get("repeating", []),
            data.get("fluency_texts"),
        )


@dataclass
class Generations:
    """One request's continuations by kind (``KINDS``; texts in the request's order of prompts) and
    the reasons it was found degenerate (empty: not degenerate)."""

    texts: dict[str, list[str]] = field(default_factory=dict)
    prompts: dict[str, list[str]] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)

    @property
    def answer(self) -> str:
        return (self.texts.get("reliability") or [""])[0]

    def to_dict(self) -> dict[str, Any]:
        return {"texts": self.texts, "flags": self.flags}


#: kinds continued for ``max_new_tokens`` tokens with no early stop
LONG = ("reliability", "fluency")


def fluency_prompts(request: EditRequest) -> list[str]:
    """The edit prompt and the first of the request's generation prompts that differs from it."""
    others = [p for p in request.generation_prompts if p != request.prompt]
    return [request.prompt, *others[:1]]


def probes(request: EditRequest) -> dict[str, list[tuple[str, str]]]:
    """(prompt, expected answer) per kind; fluency prompts carry no answer."""
    return {
        "reliability": [(request.prompt, request.target_new)],
        "generalization": [(p, request.target_new) for p in request.rephrase_prompts],
        "portability": [(p.prompt, p.target) for p in request.portability],
        "locality": [(p.prompt, p.target) for p in request.locality],
        "fluency": [(p, "") for p in fluency_prompts(request)],
    }


def generate_all(evaluator: Any, requests: list[EditRequest]) -> list[Generations]:
    """Every request's continuations, each distinct (prompt, stop rule) generated once."""
    jobs: dict[tuple[str, bool], int] = {}
    for r in requests:
        for kind, items in probes(r).items():
            for prompt, target in items:
                key = (prompt, kind not in LONG)
                budget = evaluator.answer_budget(target) if key[1] else evaluator.max_new_tokens
                jobs[key] = max(jobs.get(key, 0), budget)
    conts: dict[tuple[str, bool], Continuation] = {}
    for stop in (True, False):
        keys = [k for k in jobs if k[1] is stop]
        if keys:
            texts = greedy_continuations(
                evaluator.model,
                evaluator.tokenizer,
                [k[0] for k in keys],
                [jobs[k] for k in keys],
                stop_at_answer=stop,
                batch_size=evaluator.batch_size,
            )
            conts.update(zip(keys, texts, strict=True))
    out = []
    for r in requests:
        g = Generations()
        for kind, items in probes(r).items():
            got = [conts[(p, kind not in LONG)] for p, _ in items]
            g.texts[kind] = [c.text for c in got]
            g.prompts[kind] = [p for p, _ in items]
            g.flags.extend(f"special token {evaluator.tokenizer.decode([t])!r}" for c in got for t in c.specials[:1])
        out.append(g)
    return out


def reference_of(request: EditRequest, g: Generations, tokens: list[list[int]]) -> Reference:
    """The unedited model's reference for a request, from its own generations."""
    repeating = [p for kind in KINDS for p, t in zip(g.prompts[kind], g.texts[kind], strict=True) if repeated_ngram(t)]
    return Reference(tokens, g.texts["locality"], fluency_of(_fluency(g)), repeating, list(g.texts["fluency"]))


def _fluency(g: Generations) -> list[tuple[str, str]]:
    return list(zip(g.prompts["fluency"], g.texts["fluency"], strict=True))


def fluency_of(pairs: list[tuple[str, str]]) -> float | None:
    """Mean n-gram entropy of ``prompt + " " + continuation`` over ``(prompt, continuation)`` pairs."""
    return mean([ngram_entropy(p + " " + t) for p, t in pairs])


def reference_fluency(g: Generations, ref: Reference) -> float | None:
    """The unedited model's fluency to hold ``g``'s against: per prompt, its continuation cut to the
    words of ``g``'s where that one is shorter (ended early); the stored mean for references saved
    without their texts."""
    if ref.fluency_texts is None or len(ref.fluency_texts) != len(g.texts["fluency"]):
        return ref.fluency
    pairs = zip(_fluency(g), ref.fluency_texts, strict=True)
    return fluency_of([(p, first_words(u, len(WORD_RE.findall(t)))) for (p, t), u in pairs])


def first_words(text: str, n: int) -> str:
    """``text`` up to the end of its ``n``-th word token (:data:`WORD_RE`); all of it if it has fewer."""
    ends = [m.end() for m in WORD_RE.finditer(text)]
    return text if n >= len(ends) else text[: ends[n - 1]] if n > 0 else ""


def flag_degenerate(g: Generations, ref: Reference | None, fluency_drop: float) -> None:
    """Add to ``g.flags`` the loops the unedited model does not make and a fluency drop."""
    seen = set(ref.repeating) if ref is not None else set()
    for kind in KINDS:
        for p, t in zip(g.prompts[kind], g.texts[kind], strict=True):
            gram = repeated_ngram(t)
            if gram and p not in seen:
                g.flags.append(f"repeats {gram!r}: {t.strip()[:80]!r}")
                seen.add(p)
    before = reference_fluency(g, ref) if ref is not None else None
    if before is not None:
        now = fluency_of(_fluency(g)) or 0.0
        if now < before - fluency_drop:
            g.flags.append(f"fluency {now:.2f} < unedited {before:.2f} - {fluency_drop:g}")
    g.flags[:] = list(dict.fromkeys(g.flags))


def score(request: EditRequest, g: Generations, ref: Reference | None) -> dict[str, float]:
    """The generation-scored metrics of one request (a degenerate request fails every success metric)."""
    ok = 0.0 if g.flags else 1.0
    m: dict[str, float] = {}
    items = probes(request)
    for kind in ("reliability", "generalization"):
        if items[kind]:
            for match, fn in MATCHES.items():
                name = f"gen_{kind}" if match == "exact" else f"gen_{kind}_{match}"
                m[name] = ok * mean([float(fn(t, a)) for t, (_, a) in zip(g.texts[kind], items[kind], strict=True)])
    if items["portability"]:
        pairs = zip(g.texts["portability"], items["portability"], strict=True)
        m["gen_portability"] = ok * mean([float(exact_match(t, a)) for t, (_, a) in pairs])
    if items["locality"]:
        if ref is not None and ref.locality_answers is not None:
            pairs = zip(g.texts["locality"], ref.locality_answers, strict=True)
            m["gen_locality"] = mean([float(same_answer(t, u)) for t, u in pairs])
        else:
            pairs = zip(g.texts["locality"], items["locality"], strict=True)
            m["gen_locality"] = mean([float(exact_match(t, a)) for t, (_, a) in pairs])
    m["degenerate"] = 1.0 - ok
    m["fluency"] = fluency_of(_fluency(g)) or 0.0
    return m
