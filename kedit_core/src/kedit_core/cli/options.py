"""Options shared by several commands."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import click


def model_options(fn: Callable) -> Callable:
    @click.option(
        "--model",
        "model",
        default="gemma3-270m",
        show_default=True,
        help="gemma3-270m (offline default), a local HF directory, a .gguf file, or a HF model id.",
    )
    @click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
    @click.option("--dtype", default="float32", show_default=True, help="float32, bfloat16 or float16.")
    @click.option("--device-map", default=None, help="'auto' shards a large model over the GPUs (accelerate).")
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return wrapper


def prompt_form_option(fn: Callable) -> Callable:
    return click.option(
        "--prompt-form",
        type=click.Choice(["completion", "chat"]),
        default="completion",
        show_default=True,
        help="Present every prompt as written (completion) or as the user's message of the model's chat template "
        "(chat: the edit and the scores are on the text a chat user's question becomes).",
    )(fn)


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
