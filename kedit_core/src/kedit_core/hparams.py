"""Hyperparameters: validated pydantic models loaded from YAML or JSON.

Each method declares a subclass of :class:`Hyperparams` with its knobs. Unknown keys are rejected,
so a typo in a file is an error, not a silently ignored setting. Module paths belong to the
:class:`~kedit_core.architecture.ArchitectureSpec`; device and dtype to the Editor.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import HparamsError

H = TypeVar("H", bound="Hyperparams")


class Hyperparams(BaseModel):
    """Base class of every method's hyperparameters."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    #: the method these hyperparameters belong to (optional in files; checked when present)
    method: str | None = None

    @classmethod
    def from_dict(cls: type[H], data: Any, source: str = "hyperparameters") -> H:
        if not isinstance(data, dict):
            raise HparamsError(f"{source}: expected a mapping of hyperparameters, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise HparamsError(f"{source}: {_format_errors(exc)}") from None

    @classmethod
    def from_file(cls: type[H], path: str | Path) -> H:
        """Load from ``.yaml``/``.yml``/``.json``; errors name the file and the field."""
        path = Path(path)
        data = read_mapping_file(path)
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def updated(self: H, **changes: Any) -> H:
        """A validated copy with some fields changed."""
        return type(self).from_dict({**self.to_dict(), **changes})


def read_mapping_file(path: Path) -> Any:
    if not path.is_file():
        raise HparamsError(f"hyperparameter file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise HparamsError(f"{path}: cannot read: {exc}") from None
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text)
        return yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise HparamsError(f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: {first}") from None


def _format_errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(root)"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown field {loc!r}")
        elif err["type"] == "missing":
            parts.append(f"missing field {loc!r}")
        else:
            parts.append(f"field {loc!r}: {err['msg']} (got {err.get('input')!r})")
    return "; ".join(parts)


def preset_files(package: str, method: str) -> dict[str, Any]:
    """Packaged presets ``<package>/hparams/<method>/<model>.yaml``, by model key."""
    try:
        root = resources.files(package) / "hparams" / method
    except ModuleNotFoundError:
        return {}
    if not root.is_dir():
        return {}
    return {p.name.rsplit(".", 1)[0]: p for p in root.iterdir() if p.name.endswith((".yaml", ".yml", ".json"))}
