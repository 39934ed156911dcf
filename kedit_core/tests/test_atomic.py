"""Atomic writes: a writer killed mid-write leaves the previous file or none -- never one that loads corrupt."""

import os
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch

from kedit_core.errors import PatchError
from kedit_core.patch import Patch

WRITER = textwrap.dedent("""
    import sys, torch
    from kedit_core.method import PatchKind
    from kedit_core.patch import Patch
    from kedit_core.testing import tiny_model
    model = tiny_model("llama")[0]
    name = "model.layers.1.mlp.down_proj.weight"
    big = torch.zeros(4096, 1024)
    i = 0
    print("ready", flush=True)
    while True:
        i += 1
        p = Patch.create(method="t", kind=PatchKind.WEIGHT_DELTA, model=model,
                         tensors={f"delta/{name}": torch.full_like(model.get_parameter(name), i * 1e-6),
                                  "state/filler/x": big + i})
        p.save(sys.argv[1])
""")


def test_killed_writer_never_leaves_a_corrupt_patch(tmp_path):
    target = tmp_path / "p.kedit.safetensors"
    for delay in (0.1, 0.3, 0.6):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if target.exists():
            patch = Patch.load(target)  # must load: a complete earlier version
            assert patch.kind.value == "weight_delta"
        leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        for p in leftovers:  # a killed writer may leave its temporary file; it never has the patch's name
            try:
                Patch.load(p)
            except PatchError:
                pass
            p.unlink()


def test_failed_save_keeps_the_old_file(tmp_path):
    import pytest
    import torch

    from kedit_core.method import PatchKind
    from kedit_core.testing import tiny_model

    model = tiny_model("llama")[0]
    name = "model.layers.1.mlp.down_proj.weight"
    good = Patch.create(
        method="t",
        kind=PatchKind.WEIGHT_DELTA,
        model=model,
        tensors={f"delta/{name}": torch.zeros_like(model.get_parameter(name))},
    )
    path = good.save(tmp_path / "p.kedit.safetensors")
    bad = Patch.create(
        method="t",
        kind=PatchKind.WEIGHT_DELTA,
        model=model,
        tensors={f"delta/{name}": torch.full_like(model.get_parameter(name), float("nan"))},
    )
    with pytest.raises(PatchError):
        bad.save(path)
    assert Patch.load(path).patch_id == good.patch_id
    assert [p.name for p in tmp_path.iterdir()] == ["p.kedit.safetensors"]


@pytest.fixture()
def umask():
    """Set the process umask for a test, restoring it afterwards."""
    old = os.umask(0o022)
    try:
        yield lambda mask: os.umask(mask)
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_patches_and_written_files_get_the_mode_the_umask_gives(tmp_path, umask, mask):
    from kedit_core.fsutil import atomic_write_text, current_umask
    from kedit_core.method import PatchKind
    from kedit_core.testing import tiny_model

    umask(mask)
    assert current_umask() == mask
    model = tiny_model("llama")[0]
    name = "model.layers.1.mlp.down_proj.weight"
    patch = Patch.create(
        method="t",
        kind=PatchKind.WEIGHT_DELTA,
        model=model,
        tensors={f"delta/{name}": torch.ones_like(model.get_parameter(name))},
    )
    path = patch.save(tmp_path / "p.kedit.safetensors")
    atomic_write_text(tmp_path / "run.json", "{}")
    (tmp_path / "plain").write_text("")  # what open() gives, for comparison
    for f in (path, tmp_path / "run.json", tmp_path / "plain"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f


def test_apply_umask_opens_a_mkdtemp_directory_as_mkdir_would(tmp_path, umask):
    from kedit_core.fsutil import apply_umask

    umask(0o022)
    d = Path(tempfile.mkdtemp(dir=tmp_path))
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    apply_umask(d)
    assert stat.S_IMODE(d.stat().st_mode) == 0o755
    fd, f = tempfile.mkstemp(dir=d)
    os.close(fd)
    apply_umask(f, umask=0o077)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
    apply_umask(f)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o644
