"""Write IKE's packaged demonstration pool, ``src/kedit_serac/pools/ike_pool.json``.

    python kedit_serac/benchmarks/make_ike_pool.py [--data-dir DIR]   (default: the records shipped with kedit-core)

The pool is the first 2,000 records of EasyEdit's CounterFact training split
(``counterfact_easyedit_train.json``) followed by the first 1,000 records of the MEND zsRE training
subset (``zsre_train.json``), copied unchanged (both MIT-licensed, see kedit_core/data/SOURCES.md).
Training files only: no record of an evaluation file is read. Records whose target is empty are
dropped (EasyEdit's loaders skip them too).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kedit_core.datasets import data_dir

OUT = Path(__file__).resolve().parents[1] / "src" / "kedit_serac" / "pools" / "ike_pool.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default=str(data_dir()))
    ap.add_argument("--counterfact", type=int, default=2000)
    ap.add_argument("--zsre", type=int, default=1000)
    args = ap.parse_args()
    data = Path(args.data_dir)
    cf = json.loads((data / "counterfact_easyedit_train.json").read_text(encoding="utf-8"))[: args.counterfact]
    zsre = json.loads((data / "zsre_train.json").read_text(encoding="utf-8"))[: args.zsre]
    records = [r for r in cf if str(r.get("target_new", "")).strip()]
    records += [r for r in zsre if str(r.get("alt", "")).strip()]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(records, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")
    print(f"{OUT}: {len(records)} records")


if __name__ == "__main__":
    main()
