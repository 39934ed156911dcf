"""Resumable sequential runs: ``Editor.edit(..., sequential=True, run_dir=DIR)``.

After every edit the run's progress is written to ``DIR``: ``run.json`` (what the run is, how many
requests are done, the scores so far, the unedited model's locality references) and the patches under
``DIR/patches/``. A run started again with the same method, hyperparameters, model and requests
applies the saved patches in order -- the model is then exactly as it was after the last saved edit --
and goes on with the next request: no edit is lost or repeated. ``run.json`` is written atomically
after the patch it names, so a kill at any moment leaves a consistent state.

Methods whose sequential patches each carry the whole state (``EditMethod.cumulative_patches``) keep
only the newest patch on disk.

One process at a time: a run holds an exclusive lock on ``DIR/run.lock`` (``fcntl.flock``, released
when the run ends or its process dies); a second run on the same directory fails at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import KeditError, RunLocked
from .evaluate.protocol import Reference
from .fsutil import atomic_write_text
from .patch import Patch

STATE_FILE = "run.json"
PATCH_DIR = "patches"
LOCK_FILE = "run.lock"

log = logging.getLogger(__name__)


def run_signature(
    method: str, hparams: dict[str, Any], model_fingerprint: str, requests: list[Any], batch_size: int, generation: bool
) -> dict[str, Any]:
    """What must match for a saved run to be resumed."""
    h = hashlib.sha256()
    for r in requests:
        h.update(r.model_dump_json().encode())
    return {
        "method": method,
        "hparams": hparams,
        "model_fingerprint": model_fingerprint,
        "requests_sha256": h.hexdigest(),
        "n": len(requests),
        "batch_size": batch_size,
        "generation": generation,
    }


class RunState:
    def __init__(self, directory: str | Path, signature: dict[str, Any]) -> None:
        self.dir = Path(directory)
        self.signature = json.loads(json.dumps(signature, default=str))
        self.patch_files: list[str] = []

    @contextlib.contextmanager
    def locked(self) -> Iterator[RunState]:
        """Hold the directory's exclusive lock for the run; raises :class:`RunLocked` at once if another
        process (or another run of this one) holds it."""
        try:
            import fcntl
        except ImportError:  # no flock on this platform: run unlocked
            log.warning("%s: file locking is not available here; do not start a second run on it", self.dir)
            yield self
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                raise RunLocked(
                    f"{self.dir} is in use by another run (process {holder} holds {path}); "
                    "wait for it to end or use another run directory"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            yield self
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def load(self) -> dict[str, Any] | None:
        """The saved progress, or None for a new run; refuses a directory of a different run."""
        path = self.dir / STATE_FILE
        if not path.is_file():
            return None
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise KeditError(f"{path}: unreadable run state: {exc}") from None
        saved = state.get("signature", {})
        diff = sorted(k for k in set(saved) | set(self.signature) if saved.get(k) != self.signature.get(k))
        if diff:
            raise KeditError(
                f"{self.dir} holds another run (differs in: {', '.join(diff)}); use a new directory or delete it"
            )
        self.patch_files = list(state["patch_files"])
        missing = [f for f in self.patch_files if not (self.dir / PATCH_DIR / f).is_file()]
        if missing:
            raise KeditError(f"{self.dir}: saved patches missing: {', '.join(missing[:3])}")
        return state

    def patches(self) -> list[Patch]:
        return [Patch.load(self.dir / PATCH_DIR / f) for f in self.patch_files]

    @staticmethod
    def references(state: dict[str, Any]) -> list[Reference] | None:
        refs = state.get("refs")
        return None if refs is None else [Reference.from_dict(r) for r in refs]

    def save(self, result: Any, refs: list[Reference] | None, done: int, patch: Patch, cumulative: bool) -> None:
        """Record that ``done`` requests are edited, ``patch`` being the newest."""
        name = f"{done:06d}.kedit.safetensors"
        patch.save(self.dir / PATCH_DIR / name)
        old = self.patch_files if cumulative else []
        self.patch_files = [name] if cumulative else [*self.patch_files, name]
        state = {
            "signature": self.signature,
            "done": done,
            "patch_files": self.patch_files,
            "pre": result.pre,
            "post": result.post,
            "generations": result.generations,
            "edit_seconds": result.edit_seconds,
            "one_time_seconds": result.one_time_seconds,
            "rss_mb_curve": result.rss_mb_curve,
            "refs": None if refs is None else [r.to_dict() for r in refs],
        }
        atomic_write_text(self.dir / STATE_FILE, json.dumps(state))
        for f in old:
            if f != name:
                (self.dir / PATCH_DIR / f).unlink(missing_ok=True)
