"""Resumable sequential runs: an interrupted run started again loses and repeats no edit, and ends
exactly where an uninterrupted run ends (in-process, and with `kedit eval` killed mid-run)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kedit_core.editor import Editor
from kedit_core.errors import KeditError
from kedit_core.request import EditRequest
from kedit_core.testing import state_fingerprint, tiny_model, tiny_requests

HP = {"layers": [1], "lr": 0.05, "num_steps": 6}


class Interrupted(Exception):
    pass


pytestmark = pytest.mark.usefixtures("ft_plugin")


def requests() -> list[EditRequest]:
    a, b = tiny_requests()
    return [a, b, a.model_copy(update={"target_new": "Berlin"}), b.model_copy(update={"target_new": "golf"})]


def fresh() -> Editor:
    model, tok = tiny_model("llama")
    return Editor("ft-m", model, tok, hparams=HP)


def test_interrupted_run_resumes_without_losing_or_repeating(tmp_path):
    full_editor = fresh()
    full = full_editor.edit(requests(), sequential=True, keep_original_weight=False)
    full_state = state_fingerprint(full_editor.model)

    calls = []

    def stop_after_two(done, result):
        calls.append(done)
        if done == 2:
            raise Interrupted

    first = fresh()
    before = state_fingerprint(first.model)
    with pytest.raises(Interrupted):
        first.edit(requests(), sequential=True, run_dir=tmp_path, on_chunk=stop_after_two)
    assert state_fingerprint(first.model) == before  # the interrupted editor was restored
    saved = json.loads((tmp_path / "run.json").read_text())
    assert saved["done"] == 2 and len(saved["patch_files"]) == 2 and len(saved["post"]) == 2

    second = fresh()
    computed = []
    original = second.compute_patch
    second.compute_patch = lambda chunk, parent=None: computed.append(chunk[0].target_new) or original(chunk, parent)
    resumed = second.edit(requests(), sequential=True, keep_original_weight=False, run_dir=tmp_path)
    assert computed == ["Berlin", "golf"]  # only the two edits not done before
    assert state_fingerprint(second.model) == full_state
    assert resumed.post_final == full.post_final and resumed.post[:2] == full.post[:2]
    assert [p.patch_id for p in resumed.patches] == [p.patch_id for p in full.patches]
    assert len(resumed.edit_seconds) == 4 and json.loads((tmp_path / "run.json").read_text())["done"] == 4


def test_a_directory_of_another_run_is_refused(tmp_path):
    fresh().edit(requests()[:2], sequential=True, run_dir=tmp_path)
    other = fresh()
    other.hparams = other.hparams.updated(lr=0.01)
    before = state_fingerprint(other.model)
    with pytest.raises(KeditError, match="holds another run .*hparams"):
        other.edit(requests()[:2], sequential=True, run_dir=tmp_path)
    with pytest.raises(KeditError, match="holds another run .*requests_sha256"):
        fresh().edit(requests()[1:3], sequential=True, run_dir=tmp_path)
    assert state_fingerprint(other.model) == before
    with pytest.raises(KeditError, match="needs sequential=True"):
        fresh().edit(requests()[:2], run_dir=tmp_path)


def _eval_cmd(model_dir, data, run_dir, out):
    return [
        str(Path(sys.executable).parent / "kedit"),
        "eval",
        "--method",
        "ft-m",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--sequential",
        "--hparams",
        str(data.parent / "hp.json"),
        "--json",
        str(out),
    ] + (["--run-dir", str(run_dir)] if run_dir else [])


def test_kedit_eval_killed_mid_run_resumes(tmp_path):
    model, tok = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    data = tmp_path / "d.json"
    reqs = requests() * 2
    data.write_text(json.dumps([{**r.model_dump(mode="json"), "case_id": str(i)} for i, r in enumerate(reqs)]))
    (tmp_path / "hp.json").write_text(json.dumps({**HP, "num_steps": 25}))
    env = {k: v for k, v in os.environ.items() if k != "KEDIT_DISABLE_PLUGIN_AUTOLOAD"}
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        _eval_cmd(tmp_path / "m", data, run_dir, tmp_path / "a.json"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    done = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            done = json.loads((run_dir / "run.json").read_text())["done"]
        except (OSError, ValueError):
            done = 0
        if done >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert 2 <= done < len(reqs), "the run was not caught mid-way"
    assert not (tmp_path / "a.json").exists()
    subprocess.run(
        _eval_cmd(tmp_path / "m", data, run_dir, tmp_path / "a.json"), env=env, check=True, capture_output=True
    )
    resumed = json.loads((tmp_path / "a.json").read_text())
    from kedit_core.models import load_model

    m, t, _ = load_model(str(tmp_path / "m"))
    straight = Editor("ft-m", m, t, hparams=tmp_path / "hp.json").edit(reqs, sequential=True).to_report()
    assert [r["final"] for r in resumed["per_request"]] == [r["final"] for r in straight["per_request"]]
    assert resumed["metrics"] == straight["metrics"] and resumed["n"] == len(reqs)
    assert len(json.loads((run_dir / "run.json").read_text())["patch_files"]) == len(reqs)


HOLDER = """
import sys, time
import kedit_ft.plugin
from kedit_core.editor import Editor
from kedit_core.plugins import reset_registry
from kedit_core.testing import tiny_model, tiny_requests
reset_registry(autoload=False).add_plugin(kedit_ft.plugin, name="ft", package="kedit-ft", version="9.9")
a, b = tiny_requests()
reqs = [a, b, a.model_copy(update={"target_new": "Berlin"}), b.model_copy(update={"target_new": "golf"})]
model, tok = tiny_model("llama")

def hold(done, result):
    print("ready", flush=True)
    time.sleep(120)

Editor("ft-m", model, tok, hparams=%r).edit(reqs, sequential=True, run_dir=sys.argv[1], on_chunk=hold)
"""


def test_two_runs_on_one_directory_the_second_fails_at_once(tmp_path):
    from kedit_core.errors import RunLocked
    from kedit_core.runstate import RunState

    with RunState(tmp_path, {}).locked():
        with pytest.raises(
            RunLocked,
            match=rf"^{tmp_path} is in use by another run \(process {os.getpid()} holds "
            rf"{tmp_path / 'run.lock'}\); wait for it to end or use another run directory$",
        ):
            with RunState(tmp_path, {}).locked():
                pass
    with RunState(tmp_path, {}).locked():  # released when the first run ended
        pass


def test_a_second_process_on_a_run_directory_fails_at_once_and_resumes_once_the_first_is_gone(tmp_path):
    from kedit_core.errors import RunLocked

    proc = subprocess.Popen([sys.executable, "-c", HOLDER % HP, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"  # the first process holds the directory, one edit done
        second = fresh()
        before = state_fingerprint(second.model)
        computed = []
        original = second.compute_patch
        second.compute_patch = lambda chunk, parent=None: computed.append(chunk) or original(chunk, parent)
        with pytest.raises(RunLocked, match=rf"in use by another run \(process {proc.pid} holds"):
            second.edit(requests(), sequential=True, run_dir=tmp_path)
        assert computed == [] and state_fingerprint(second.model) == before
    finally:
        proc.kill()
        proc.wait()
    second.edit(requests(), sequential=True, run_dir=tmp_path)  # the lock died with its process
    assert len(computed) == 3  # and the run resumed after the first process's saved edit
