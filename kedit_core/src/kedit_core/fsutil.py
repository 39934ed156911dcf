"""Atomic file writes (a temporary file beside the target, fsync, rename) with the permissions of an
ordinary file.

``tempfile.mkstemp``/``mkdtemp`` create files 0600 and directories 0700 whatever the umask; a patch or a
cache written through them would be unreadable to the rest of a team sharing a directory. Every final
file and directory gets the mode ``open()``/``mkdir()`` would give it: 0666/0777 less the umask.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path


def current_umask() -> int:
    """The process's umask, read without changing it where Linux reports it (``/proc/self/status``);
    elsewhere by setting and restoring it (``os.umask`` has no getter; racy only against a thread that
    creates a file in that instant)."""
    try:
        match = re.search(r"^Umask:\s*([0-7]+)\s*$", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        match = None
    if match:
        return int(match.group(1), 8)
    old = os.umask(0o022)
    os.umask(old)
    return old


def apply_umask(path: str | Path, umask: int | None = None) -> None:
    """Give ``path`` (a file, or a directory: not its contents) the mode a plain ``open()``/``mkdir()``
    would: 0666 (files) or 0777 (directories) less the umask. Use on what mkstemp/mkdtemp made."""
    mask = current_umask() if umask is None else umask
    base = 0o777 if Path(path).is_dir() else 0o666
    os.chmod(path, base & ~mask)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path; on success it replaces ``path`` atomically (with the mode the umask
    gives a new file), on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        apply_umask(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
