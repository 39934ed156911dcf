"""The records shipped with kedit-core (``kedit_core/data``), reachable by name from any directory.

``load_requests("counterfact")`` and ``kedit eval --data zsre`` read them; any other value is a path.
Where each file comes from and its license: ``data/SOURCES.md`` and ``data/LICENSE``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

#: name -> file in kedit_core/data
SHIPPED = {
    "counterfact": "counterfact.json",
    "zsre": "zsre.json",
    "zsre-train": "zsre_train.json",
    "counterfact-train": "counterfact_easyedit_train.json",
}


def data_dir() -> Path:
    """The directory holding the shipped files."""
    return Path(str(resources.files("kedit_core") / "data"))


def shipped_path(name: str) -> Path | None:
    """The file of a shipped data set's name, or None if ``name`` is not one."""
    file = SHIPPED.get(name.lower())
    return data_dir() / file if file else None


def resolve_data(name_or_path: str | Path) -> Path:
    """A shipped data set's file for its name; anything else is taken as a path."""
    if isinstance(name_or_path, str) and not Path(name_or_path).exists():
        shipped = shipped_path(name_or_path)
        if shipped is not None:
            return shipped
    return Path(name_or_path)
