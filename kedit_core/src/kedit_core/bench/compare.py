"""``kedit bench --compare OLD.json NEW.json``: what changed between two bench runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import KeditError

#: the tables compared, with the column that names a row
TABLES = ("table1", "table2", "counterfact")
IDENTITY = ("kedit_version", "model", "model_fingerprint", "data", "machine")


def load_document(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KeditError(f"{p}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KeditError(f"{p}: not a bench JSON file: {exc}") from None
    if not isinstance(doc, dict) or "schema" not in doc or not all(t in doc for t in TABLES):
        raise KeditError(f"{p}: not a bench JSON file (written by `kedit bench`)")
    return doc


def _flatten(doc: dict[str, Any]) -> dict[tuple[str, str, str], Any]:
    out = {}
    for table in TABLES:
        for row in doc.get(table, []):
            for col, value in row.items():
                if col != "method" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    out[(table, row["method"], col)] = value
    for row in doc.get("sequential", []):
        for phase in ("final", "after_each"):
            for col, value in row.get(phase, {}).items():
                if value is not None:
                    out[("sequential", row["method"], f"{col} ({phase})")] = value
    return out


def compare(old: dict[str, Any], new: dict[str, Any], *, tolerance: float = 0.0) -> dict[str, Any]:
    """Differences in identity fields, and per (table, method, column) the old and new values."""
    identity = {k: {"old": old.get(k), "new": new.get(k)} for k in IDENTITY if old.get(k) != new.get(k)}
    a, b = _flatten(old), _flatten(new)
    rows = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if va is not None and vb is not None and abs(vb - va) <= tolerance:
            continue
        delta = vb - va if va is not None and vb is not None else None
        rel = delta / abs(va) if delta is not None and va else None
        rows.append(
            {"table": key[0], "method": key[1], "column": key[2], "old": va, "new": vb, "delta": delta, "relative": rel}
        )
    return {"identity": identity, "changes": rows, "old_date": old.get("date"), "new_date": new.get("date")}
