"""Hyperparameters: validated pydantic models loaded from YAML or JSON.

Each method declares a subclass of :class:`Hyperparams` with its knobs. Unknown keys are rejected,
so a typo in a file is an error, not a silently ignored setting. Module paths belong to the
:class:`~kedit_core.architecture.ArchitectureSpec`; device and dtype to the Editor.

Values are strict: they are validated as the YAML/JSON values they are (pydantic strict mode, JSON
flavour), so ``num_steps: true`` or ``lr: "0.05"`` is an error rather than 1 or 0.05. An integer is a
valid float, a list is a valid tuple, a string a valid path -- the forms a file has for them. YAML is
read with YAML 1.2's numbers: ``5e-1`` is a float (PyYAML's YAML 1.1 would read a string).
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import HparamsError

H = TypeVar("H", bound="Hyperparams")


class Hyperparams(BaseModel):
    """Base class of every method's hyperparameters."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, strict=True)

    #: the method these hyperparameters belong to (optional in files; checked when present)
    method: str | None = None

    @classmethod
    def from_dict(cls: type[H], data: Any, source: str = "hyperparameters") -> H:
        if not isinstance(data, dict):
            raise HparamsError(f"{source}: expected a mapping of hyperparameters, got {type(data).__name__}")
        try:
            text = json.dumps(data, allow_nan=True)
        except (TypeError, ValueError) as exc:
            raise HparamsError(
                f"{source}: values must be numbers, strings, booleans, lists or mappings ({exc})"
            ) from None
        try:  # validated as JSON: strict types, with JSON's forms of tuples and paths
            return cls.model_validate_json(text)
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
        return yaml.load(text, Loader=_Yaml12NumbersLoader)  # noqa: S506 - a SafeLoader subclass
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise HparamsError(
            f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: {first}"
        ) from None


class _Yaml12NumbersLoader(yaml.SafeLoader):
    """PyYAML's safe loader reading exponent floats without a dot (``5e-1``, ``1E3``) as YAML 1.2 does."""


_Yaml12NumbersLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


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
