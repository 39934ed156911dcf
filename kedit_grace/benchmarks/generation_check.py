"""What an edit does to free generation (issue 16): edit CounterFact records one at a time, each on
the unedited model, and compare greedy continuations before and after.

For every record: the edit prompt and its paraphrases continued for ``--tokens`` tokens, the
neighborhood prompts for ``--neighbor-tokens``. Reported shares:

- ``target_first``: edit-prompt continuations that start with the target (case-folded, whole words);
- ``loops``: continuations in which one word or a short n-gram (n <= 3) repeats 3+ times in a row
  (the unedited model's own share on the same prompts is printed next to it);
- ``paraphrase_target_first``: paraphrase continuations that start with the target;
- ``neighborhood_unchanged``: neighborhood continuations identical to the unedited model's;

plus the teacher-forced metrics of ``result.metrics("post")``.

    OMP_NUM_THREADS=1 python kedit_grace/benchmarks/generation_check.py grace --start 200 --n 20 \
        --out gen.json --baseline unedited.json    # the unedited model's continuations, cached
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

from kedit_core import Editor, load_requests


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.casefold())


def starts_with(text: str, target: str) -> bool:
    got, want = words(text), words(target)
    return bool(want) and got[: len(want)] == want


def loops(text: str, max_n: int = 3, times: int = 3) -> bool:
    w = words(text)
    for n in range(1, max_n + 1):
        for i in range(len(w) - n * times + 1):
            if all(w[i + k * n : i + (k + 1) * n] == w[i : i + n] for k in range(1, times)):
                return True
    return False


def generations(editor: Editor, request, tokens: int, neighbor_tokens: int) -> dict[str, list[str]]:
    ev = editor.evaluator()
    main = ev.generate([request.prompt, *request.rephrase_prompts], max_new_tokens=tokens)
    near = ev.generate(list(request.neighborhood_prompts), max_new_tokens=neighbor_tokens)
    return {"prompt": main[:1], "paraphrase": main[1:], "neighborhood": near}


def share(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("method")
    ap.add_argument("--start", type=int, default=200)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=30)
    ap.add_argument("--neighbor-tokens", type=int, default=8)
    ap.add_argument("--out", required=True)
    ap.add_argument("--baseline", default=None, help="JSON cache of the unedited model's continuations")
    args = ap.parse_args()
    torch.set_num_threads(1)
    requests = load_requests("counterfact")[args.start : args.start + args.n]
    editor = Editor(method=args.method, model="gemma3-270m")
    cache = Path(args.baseline) if args.baseline else None
    baseline = json.loads(cache.read_text()) if cache is not None and cache.exists() else {}
    rows, metrics = [], []
    t0 = time.time()
    for i, r in enumerate(requests):
        key = f"{args.start + i}:{args.tokens}:{args.neighbor_tokens}"
        if key not in baseline:
            baseline[key] = generations(editor, r, args.tokens, args.neighbor_tokens)
            if cache is not None:
                cache.write_text(json.dumps(baseline, indent=1))
        before = baseline[key]
        result = editor.edit([r], keep_original_weight=False, generation=False)
        try:
            after = generations(editor, r, args.tokens, args.neighbor_tokens)
        finally:
            editor.restore(result)
        metrics.append(result.metrics("post"))
        rows.append({"record": args.start + i, "target": r.target_new, "before": before, "after": after})
        print(f"[{time.time() - t0:.0f}s] {args.start + i} {r.target_new!r}: {after['prompt'][0]!r}", flush=True)
    summary = {}
    for when in ("before", "after"):
        summary[when] = {
            "target_first": share([starts_with(x[when]["prompt"][0], x["target"]) for x in rows]),
            "loops": share([loops(x[when]["prompt"][0]) for x in rows]),
            "paraphrase_target_first": share(
                [starts_with(p, x["target"]) for x in rows for p in x[when]["paraphrase"]]
            ),
            "paraphrase_loops": share([loops(p) for x in rows for p in x[when]["paraphrase"]]),
        }
    summary["after"]["neighborhood_unchanged"] = share(
        [a == b for x in rows for a, b in zip(x["before"]["neighborhood"], x["after"]["neighborhood"], strict=True)]
    )
    keys = sorted({k for m in metrics for k, v in m.items() if isinstance(v, (int, float))})
    summary["post_metrics"] = {k: sum(m[k] for m in metrics if k in m) / len(metrics) for k in keys}
    print(json.dumps(summary, indent=2))
    Path(args.out).write_text(json.dumps({"args": vars(args), "summary": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
