"""How an instruct model answers the benchmark's cloze prompts as plain completions and through its chat
template: the unedited model's greedy answers to CounterFact edit prompts, scored against the true answer
with the generation protocol's matchers (exact leading phrase / starts with / contains).

    python benchmarks/prompt_format.py --model qwen2.5-0.5b --n 100 --out benchmarks/results/prompt_format-qwen2.5-0.5b.json

Chat form: the prompt is the user's message, the reply starts after the template's assistant header
(``kedit_core.chat.chat_prompt``), nothing prefilled.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kedit_core.chat import chat_prompt
from kedit_core.evaluate import Evaluator
from kedit_core.evaluate.answers import contains, exact_match, starts_with
from kedit_core.models import load_model
from kedit_core.request import load_requests

MATCHERS = {"exact": exact_match, "starts": starts_with, "contains": contains}


def score(answers: list[str], truths: list[str]) -> dict[str, float]:
    return {name: sum(map(match, answers, truths)) / len(truths) for name, match in MATCHERS.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--data", default="counterfact")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    model, tok, _ = load_model(args.model)
    requests = [r for r in load_requests(args.data, limit=args.n) if r.ground_truth]
    truths = [r.ground_truth for r in requests]
    ev = Evaluator(model, tok)
    forms = {"completion": [r.prompt for r in requests], "chat": [chat_prompt(tok, r.prompt) for r in requests]}
    report = {"model": args.model, "data": args.data, "n": len(requests), "forms": {}}
    for form, prompts in forms.items():
        answers = ev.generate(prompts, max_new_tokens=args.max_new_tokens)
        report["forms"][form] = {
            "scores": score(answers, truths),
            "examples": list(zip(prompts[:8], answers[:8], strict=True)),
        }
        print(form, {k: round(v, 3) for k, v in report["forms"][form]["scores"].items()}, flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
