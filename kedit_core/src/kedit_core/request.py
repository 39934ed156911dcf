"""Edit requests and the loaders for CounterFact, ZsRE (MEND/EasyEdit), EasyEdit's flat format and
kedit's own JSON/JSONL.

The format of a file is detected from its records; a record that fits none is reported with its
index and the field it lacks.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import RequestError


class Probe(BaseModel):
    """A prompt and the answer expected from it (locality, portability, paraphrase)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(min_length=1)
    target: str = Field(min_length=1)

    @field_validator("prompt", "target")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank")
        return v


class EditRequest(BaseModel):
    """One fact to edit: ``prompt`` (containing ``subject``) should be completed by ``target_new``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(min_length=1)
    subject: str = Field(min_length=1)
    target_new: str = Field(min_length=1)
    ground_truth: str | None = None
    rephrase_prompts: tuple[str, ...] = ()
    locality: tuple[Probe, ...] = ()
    portability: tuple[Probe, ...] = ()
    #: CounterFact neighborhood prompts, scored with P(true) > P(new)
    neighborhood_prompts: tuple[str, ...] = ()
    #: prompts to generate from for the fluency metric (defaults to the edit prompt)
    generation_prompts: tuple[str, ...] = ()
    case_id: str | None = None

    @field_validator("prompt", "subject", "target_new")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank")
        return v

    @field_validator("ground_truth")
    @classmethod
    def _optional_not_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            return None
        return v

    @model_validator(mode="after")
    def _subject_in_prompt(self) -> EditRequest:
        if self.subject not in self.prompt:
            raise ValueError(f"subject {self.subject!r} does not occur in prompt {self.prompt!r}")
        return self

    @property
    def target_true(self) -> str | None:
        return self.ground_truth

    def subject_span(self) -> tuple[int, int]:
        """Character span of the last occurrence of the subject in the prompt."""
        start = self.prompt.rindex(self.subject)
        return start, start + len(self.subject)

    @classmethod
    def create(cls, index: int | None = None, **fields: Any) -> EditRequest:
        """Validate, turning pydantic's error into a one-line :class:`RequestError`."""
        try:
            return cls.model_validate(fields)
        except ValidationError as exc:
            raise RequestError(_describe(exc, index)) from None


def _describe(exc: ValidationError, index: int | None) -> str:
    where = f"record {index}: " if index is not None else ""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown field {loc!r}")
        elif err["type"] == "missing":
            parts.append(f"missing field {loc!r}")
        else:
            parts.append(f"{loc}: {msg}" if loc else msg)
    return where + "; ".join(parts)


# -- format detection and conversion ---------------------------------------------------------------


def _req(rec: dict, key: str, index: int, fmt: str) -> Any:
    if key not in rec:
        raise RequestError(f"record {index} ({fmt} format): missing field {key!r}")
    return rec[key]


def _str(value: Any, key: str, index: int) -> str:
    if not isinstance(value, str):
        raise RequestError(f"record {index}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _str_list(value: Any, key: str, index: int) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RequestError(f"record {index}: field {key!r} must be a string or a list of strings")
    return value


def from_counterfact(rec: dict, index: int) -> EditRequest:
    rw = _req(rec, "requested_rewrite", index, "CounterFact")
    if not isinstance(rw, dict):
        raise RequestError(f"record {index}: 'requested_rewrite' must be an object")
    template = _str(_req(rw, "prompt", index, "CounterFact"), "requested_rewrite.prompt", index)
    subject = _str(_req(rw, "subject", index, "CounterFact"), "requested_rewrite.subject", index)
    if "{}" not in template:
        raise RequestError(f"record {index}: requested_rewrite.prompt has no '{{}}' subject slot")
    new, true = (_req(rw, k, index, "CounterFact") for k in ("target_new", "target_true"))
    new = _str(new.get("str") if isinstance(new, dict) else new, "requested_rewrite.target_new.str", index)
    true = _str(true.get("str") if isinstance(true, dict) else true, "requested_rewrite.target_true.str", index)
    neighborhood = _str_list(rec.get("neighborhood_prompts", []), "neighborhood_prompts", index)
    return EditRequest.create(
        index,
        prompt=template.replace("{}", subject),
        subject=subject,
        target_new=new,
        ground_truth=true,
        rephrase_prompts=_str_list(rec.get("paraphrase_prompts", []), "paraphrase_prompts", index),
        locality=[{"prompt": p, "target": true} for p in neighborhood],
        neighborhood_prompts=neighborhood,
        generation_prompts=_str_list(rec.get("generation_prompts", []), "generation_prompts", index),
        case_id=str(rec["case_id"]) if "case_id" in rec else None,
    )


def from_zsre(rec: dict, index: int) -> EditRequest:
    fmt = "ZsRE"
    answers = _req(rec, "answers", index, fmt)
    answers = _str_list(answers, "answers", index)
    portability = []
    port = rec.get("portability")
    if isinstance(port, dict) and port.get("New Question") and port.get("New Answer"):
        portability.append({"prompt": port["New Question"], "target": port["New Answer"]})
    locality = []
    if rec.get("loc") and rec.get("loc_ans"):
        locality.append({"prompt": rec["loc"], "target": rec["loc_ans"]})
    rephrase = rec.get("rephrase")
    return EditRequest.create(
        index,
        prompt=_str(_req(rec, "src", index, fmt), "src", index),
        subject=_str(_req(rec, "subject", index, fmt), "subject", index),
        target_new=_str(_req(rec, "alt", index, fmt), "alt", index),
        ground_truth=answers[0] if answers else None,
        rephrase_prompts=_str_list(rephrase, "rephrase", index) if rephrase else [],
        locality=locality,
        portability=portability,
        case_id=str(rec.get("case_id", index)),
    )


def from_easyedit(rec: dict, index: int) -> EditRequest:
    """EasyEdit's flat records (``prompt``, ``subject``, ``target_new``, ``ground_truth``,
    ``rephrase_prompt``, ``locality_prompt``/``locality_ground_truth``, ``portability``)."""
    locality = []
    if rec.get("locality_prompt") and rec.get("locality_ground_truth"):
        locality.append({"prompt": rec["locality_prompt"], "target": rec["locality_ground_truth"]})
    for group in (rec.get("locality") or {}).values() if isinstance(rec.get("locality"), dict) else ():
        locality.extend(_knowedit_probes(group))
    portability = []
    if isinstance(rec.get("portability"), dict):
        for group in rec["portability"].values():
            portability.extend(_knowedit_probes(group))
    gt = rec.get("ground_truth")
    while isinstance(gt, list) and gt:
        gt = gt[0]
    rephrase = rec.get("rephrase_prompt") or rec.get("rephrase_prompts") or []
    return EditRequest.create(
        index,
        prompt=_str(_req(rec, "prompt", index, "EasyEdit"), "prompt", index),
        subject=_str(_req(rec, "subject", index, "EasyEdit"), "subject", index),
        target_new=_str(_req(rec, "target_new", index, "EasyEdit"), "target_new", index),
        ground_truth=gt if isinstance(gt, str) else None,
        rephrase_prompts=_str_list(rephrase, "rephrase_prompt", index),
        locality=locality,
        portability=portability,
        case_id=str(rec["case_id"]) if "case_id" in rec else None,
    )


def _knowedit_probes(group: Any) -> list[dict]:
    out = []
    for item in group if isinstance(group, list) else [group]:
        if not isinstance(item, dict):
            continue
        prompt, answer = item.get("prompt"), item.get("ground_truth")
        while isinstance(prompt, list) and prompt:
            prompt = prompt[0]
        while isinstance(answer, list) and answer:
            answer = answer[0]
        if isinstance(prompt, str) and isinstance(answer, str) and prompt.strip() and answer.strip():
            out.append({"prompt": prompt, "target": answer})
    return out


KEDIT_FIELDS = set(EditRequest.model_fields)


def detect_format(rec: Any, index: int = 0) -> str:
    """Name of the schema a record follows: counterfact, zsre, kedit or easyedit."""
    if not isinstance(rec, dict):
        raise RequestError(f"record {index}: expected a JSON object, got {type(rec).__name__}")
    if "requested_rewrite" in rec:
        return "counterfact"
    if "src" in rec or "alt" in rec:
        return "zsre"
    keys = set(rec)
    if keys and keys <= KEDIT_FIELDS and "rephrase_prompt" not in rec:
        return "kedit"
    if "prompt" in rec or "target_new" in rec:
        return "easyedit"
    raise RequestError(
        f"record {index}: fits no known format (CounterFact needs 'requested_rewrite'; ZsRE needs 'src', "
        f"'alt', 'subject', 'answers'; kedit/EasyEdit need 'prompt', 'subject', 'target_new'); "
        f"its fields are {sorted(keys)}"
    )


CONVERTERS = {
    "counterfact": from_counterfact,
    "zsre": from_zsre,
    "easyedit": from_easyedit,
    "kedit": lambda rec, i: EditRequest.create(i, **rec),
}


def requests_from_records(records: Iterable[Any], fmt: str | None = None) -> list[EditRequest]:
    out = []
    for i, rec in enumerate(records):
        kind = fmt or detect_format(rec, i)
        if not isinstance(rec, dict):
            raise RequestError(f"record {i}: expected a JSON object, got {type(rec).__name__}")
        out.append(CONVERTERS[kind](rec, i))
    return out


def load_requests(path: str | Path, limit: int | None = None, fmt: str | None = None) -> list[EditRequest]:
    """Load edit requests from a JSON list, a single JSON object, or JSONL; ``path`` may also name a data
    set shipped with kedit-core (``counterfact``, ``zsre``, ``zsre-train``, ``counterfact-train``)."""
    from .datasets import SHIPPED, resolve_data

    path = resolve_data(path)
    if fmt is not None and fmt not in CONVERTERS:
        raise RequestError(f"unknown format {fmt!r}; known: {', '.join(CONVERTERS)}")
    if not path.is_file():
        names = ", ".join(SHIPPED)
        raise RequestError(f"data file not found: {path} (shipped data sets by name: {names})")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    records = _parse_records(text, path)
    if limit is not None:
        records = records[:limit]
    if not records:
        raise RequestError(f"{path}: no records")
    try:
        return requests_from_records(records, fmt)
    except RequestError as exc:
        raise RequestError(f"{path}: {exc}") from None


def _parse_records(text: str, path: Path) -> list[Any]:
    stripped = text.strip()
    if not stripped:
        return []
    try:
        data = json.loads(stripped)
    except json.JSONDecodeError as whole_err:
        records = []
        for lineno, line in enumerate(stripped.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise RequestError(
                    f"{path}: not JSON or JSONL (line {lineno}: {whole_err.msg if lineno == 1 else 'invalid JSON'})"
                ) from None
        return records
    if isinstance(data, dict):
        return [data]
    if not isinstance(data, list):
        raise RequestError(f"{path}: expected a list of records, got {type(data).__name__}")
    return data
