"""Progress for slow steps: a line on stderr when a step starts, its time when it ends, and a record of
the one-time steps (dequantizing a model, key statistics, context templates, ...) so that a command can
say where its time went. The lines are written when stderr is a terminal or ``KEDIT_PROGRESS=1``;
``KEDIT_QUIET=1`` silences them. The record is kept either way.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class StepTime:
    what: str
    seconds: float
    one_time: bool


_steps: list[StepTime] = []


def _on(var: str) -> bool:
    return os.environ.get(var, "") in ("1", "true", "yes")


def _say(text: str) -> None:
    if not _on("KEDIT_QUIET") and (_on("KEDIT_PROGRESS") or sys.stderr.isatty()):
        print(f"kedit: {text}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def step(what: str, *, one_time: bool = False) -> Iterator[None]:
    """Announce ``what``, run the block, report and record its time. ``one_time``: the result is cached,
    later runs skip the step."""
    _say(f"{what}{' (one-time; cached for later runs)' if one_time else ''} ...")
    start = time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    _steps.append(StepTime(what, seconds, one_time))
    _say(f"{what}: done in {seconds:.1f} s")


def recorded(since: int = 0) -> list[StepTime]:
    """The steps finished in this process (from index ``since``: ``mark()`` before a phase)."""
    return list(_steps[since:])


def mark() -> int:
    return len(_steps)
