"""Edits of an instruct model made in one prompt form and scored in both: each CounterFact record is edited
from the unedited model with its prompts as plain completions and, separately, in the chat template
(``kedit_core.chat``), and every edit is scored on both forms of the record (the teacher-forced scores
and the generation protocol, locality against the unedited model in the same form).

    python benchmarks/chat_edits.py --model qwen2.5-0.5b --methods rome ike --n 20 \
        --out benchmarks/results/chat_edits-qwen2.5-0.5b.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from statistics import mean

from kedit_core.chat import PROMPT_FORMS, present
from kedit_core.editor import Editor
from kedit_core.evaluate import Evaluator
from kedit_core.models import load_model
from kedit_core.request import load_requests

#: the columns of the printed table
SHOWN = (
    "efficacy_score",
    "paraphrase_score",
    "neighborhood_score",
    "gen_reliability",
    "gen_reliability_contains",
    "gen_generalization_contains",
    "gen_locality",
    "degenerate",
)


def averaged(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for r in rows for k in r})
    return {k: round(mean(r[k] for r in rows if k in r), 4) for k in keys}


def run_method(editor: Editor, ev: Evaluator, forms: dict, refs: dict, n: int) -> dict:
    """``{edit form: {"scores": {eval form: means}, "s_per_edit": ...}}`` for one method."""
    out = {}
    for edit_form in PROMPT_FORMS:
        post: dict[str, list[dict[str, float]]] = {f: [] for f in PROMPT_FORMS}
        examples, t_edit = [], 0.0
        for i in range(n):
            t0 = time.perf_counter()
            patch = editor.compute_patch([forms[edit_form][i]])
            handle = patch.apply(editor.model, tokenizer=editor.tokenizer)
            t_edit += time.perf_counter() - t0
            try:
                for f in PROMPT_FORMS:
                    post[f].extend(ev.evaluate([forms[f][i]], [refs[f][i]]))
                    if i < 3:
                        examples.append({"eval": f, "answer": ev.last_generations[0].texts["reliability"][0]})
            finally:
                handle.revert()
            print(f"{editor.method.name} edited as {edit_form}: {i + 1}/{n}", flush=True)
        out[edit_form] = {
            "scores": {f: averaged(rows) for f, rows in post.items()},
            "s_per_edit": round(t_edit / n, 2),
            "examples": examples,
        }
    return out


def table(report: dict) -> str:
    head = ["method", "edited as", "scored as", *SHOWN]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    pre = report["unedited"]
    for f in PROMPT_FORMS:
        lines.append("| unedited | - | " + f + " | " + " | ".join(f"{pre[f].get(k, 0):.3f}" for k in SHOWN) + " |")
    for method, by_form in report["methods"].items():
        for edit_form, res in by_form.items():
            for f, s in res["scores"].items():
                cells = " | ".join(f"{s.get(k, 0):.3f}" for k in SHOWN)
                lines.append(f"| {method} | {edit_form} | {f} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--methods", nargs="+", default=["rome", "ike"])
    ap.add_argument("--data", default="counterfact")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    model, tok, info = load_model(args.model)
    reqs = load_requests(args.data)[args.start : args.start + args.n]
    forms = {f: present(reqs, tok, f) for f in PROMPT_FORMS}
    ev = Evaluator(model, tok)
    pre, refs = {}, {}
    for f in PROMPT_FORMS:
        rows, refs[f] = ev.evaluate_with_reference(forms[f])
        pre[f] = averaged(rows)
    report = {"model": args.model, "data": args.data, "records": [args.start, args.start + len(reqs)]}
    report |= {"unedited": pre, "methods": {}}
    for method in args.methods:
        editor = Editor(method, model, tok, model_info=info)
        report["methods"][method] = run_method(editor, ev, forms, refs, len(reqs))
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(table(report))


if __name__ == "__main__":
    main()
