import pytest

from kedit_core.editor import Editor
from kedit_core.errors import KeditError
from kedit_core.patch import stack
from kedit_core.testing import state_fingerprint, tiny_model, tiny_requests

HP = {"layers": [1], "lr": 0.05, "num_steps": 10}


pytestmark = pytest.mark.usefixtures("ft_plugin")


@pytest.fixture()
def editor():
    model, tok = tiny_model("llama")
    return Editor("ft-m", model, tok, hparams=HP)


def test_independent_edits_leave_model_unchanged(editor):
    before = state_fingerprint(editor.model)
    result = editor.edit(tiny_requests())
    assert state_fingerprint(editor.model) == before
    assert len(result.patches) == 2 and all(p.parent is None for p in result.patches)
    assert len(result.pre) == len(result.post) == 2 and result.post_final is None
    assert all(r["reliability"] >= p["reliability"] for r, p in zip(result.post, result.pre, strict=False))
    assert len(result.edit_seconds) == 2 and result.peak_rss_mb > 0


def test_batch_chunks(editor):
    result = editor.edit(tiny_requests() * 2, batch_size=2)
    assert len(result.patches) == 2 and [len(p.metadata["requests"]) for p in result.patches] == [2, 2]


def test_sequential_chains_and_scores_twice(editor):
    before = state_fingerprint(editor.model)
    result = editor.edit(tiny_requests(), sequential=True)
    first, second = result.patches
    assert second.parent == first.patch_id and first.parent is None
    assert result.post_final is not None and len(result.post_final) == 2
    assert state_fingerprint(editor.model) == before  # keep_original_weight=True by default
    report = result.to_report()
    assert report["metrics"] == result.metrics("final") and "metrics_after_each" in report


def test_keep_original_weight_false_keeps_edits(editor):
    before = state_fingerprint(editor.model)
    result = editor.edit(tiny_requests(), sequential=True, keep_original_weight=False)
    assert state_fingerprint(editor.model) != before and len(stack(editor.model)) == 2
    editor.restore(result)
    assert state_fingerprint(editor.model) == before and stack(editor.model) == []


def test_sequential_run_keeps_one_snapshot_per_weight_not_one_per_edit(editor):
    from kedit_core.errors import PatchError

    before = state_fingerprint(editor.model)
    result = editor.edit(tiny_requests() * 3, sequential=True, keep_original_weight=False, evaluate=False)
    touched = {n for p in result.patches for n in p.parameters()}
    assert set(result.baseline) == touched  # one copy per touched weight, however many edits
    assert all(h.copyless and h.saved == {} for h in result.handles)
    with pytest.raises(PatchError, match="without a copy"):
        result.handles[-1].revert()
    assert state_fingerprint(editor.model) != before
    editor.restore(result)
    assert state_fingerprint(editor.model) == before and stack(editor.model) == [] and result.baseline == {}


def test_single_chunk_can_stay_applied(editor):
    result = editor.edit(tiny_requests()[:1], keep_original_weight=False)
    assert len(stack(editor.model)) == 1
    editor.restore(result)


def test_independent_multi_chunk_cannot_stay(editor):
    with pytest.raises(KeditError, match="use sequential=True"):
        editor.edit(tiny_requests(), keep_original_weight=False)


def test_report_contract(editor):
    report = editor.edit(tiny_requests()[:1]).to_report()
    assert {"method", "model", "n", "metrics", "time_per_edit_s", "peak_rss_mb", "per_request", "protocols"} <= set(
        report
    )
    assert report["n"] == 1 and set(report["per_request"][0]) >= {"pre", "post"}
    assert set(report["protocols"]) == set(report["metrics"])


def test_bad_requests_are_clear(editor):
    with pytest.raises(KeditError, match="does not occur in prompt"):
        editor.edit([{"prompt": "The tower is tall", "subject": "Louvre", "target_new": "x"}])
    with pytest.raises(KeditError, match="no edit requests"):
        editor.edit([])


def test_from_hparams_file_picks_method(tmp_path):
    model, tok = tiny_model("gpt2")
    p = tmp_path / "h.yaml"
    p.write_text("method: ft-l\nlayers: [2]\nnum_steps: 2\n")
    ed = Editor.from_hparams(p, model, tokenizer=tok)
    assert ed.method.name == "ft-l" and ed.hparams.layers == [2]
    p.write_text("method: ft-m\nlayerz: [2]\n")
    with pytest.raises(KeditError, match="unknown field 'layerz'"):
        Editor.from_hparams(p, model, tokenizer=tok)
    p.write_text("layers: [2]\n")
    with pytest.raises(KeditError, match="needs a 'method' field"):
        Editor.from_hparams(p, model, tokenizer=tok)


def test_baseline_dir_shares_the_unedited_scores(editor, tmp_path, monkeypatch):
    from kedit_core.evaluate import Evaluator

    first = editor.edit(tiny_requests(), baseline_dir=tmp_path)
    [cached] = tmp_path.glob("baseline-*.json")

    def refuse(*_a, **_k):
        raise AssertionError("the unedited model was scored again")

    with monkeypatch.context() as m:
        m.setattr(Evaluator, "evaluate_with_reference", refuse)
        again = editor.edit(tiny_requests(), baseline_dir=tmp_path)
    assert again.pre == first.pre and again.generations["pre"] == first.generations["pre"]
    assert again.post == first.post  # the locality references read back score the same
    editor.edit(tiny_requests()[:1], baseline_dir=tmp_path)  # other requests: another key, computed
    editor.edit(tiny_requests(), baseline_dir=tmp_path, generation=False)  # another protocol
    assert len(list(tmp_path.glob("baseline-*.json"))) == 3 and cached.is_file()


def test_time_per_edit_leaves_out_the_one_time_work(editor, monkeypatch):
    import time

    from kedit_core import progress

    compute = editor.method.compute_patch

    def with_statistics(*args, **kwargs):
        with progress.step("key statistics", one_time=True):
            time.sleep(0.3)
        return compute(*args, **kwargs)

    monkeypatch.setattr(editor.method, "compute_patch", with_statistics)
    result = editor.edit(tiny_requests(), generation=False)
    assert 0.6 <= result.one_time_seconds < sum(result.edit_seconds)
    assert result.time_per_edit_s == pytest.approx((sum(result.edit_seconds) - result.one_time_seconds) / 2)
    assert result.to_report()["one_time_s"] == result.one_time_seconds
