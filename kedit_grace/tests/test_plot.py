"""The sequential-editing plot (kedit_core.evaluate.plot) on hand-made results."""

from kedit_core.editor import EditResult
from kedit_core.evaluate.plot import final_scores, plot_sequential, running_curves
from kedit_core.testing import tiny_requests


def fake_result() -> EditResult:
    reqs = tiny_requests()
    result = EditResult("grace", "tiny", reqs, [], sequential=True)
    result.post = [{"reliability": 1.0, "locality": 1.0}, {"reliability": 0.0, "generalization": 0.5, "locality": 0.5}]
    result.post_final = [
        {"reliability": 1.0, "locality": 1.0},
        {"reliability": 1.0, "generalization": 1.0, "locality": 0.0},
    ]
    return result


def test_running_curves_and_final_scores():
    result = fake_result()
    curves = running_curves(result)
    assert curves["reliability"] == [1.0, 0.5]
    assert curves["generalization"] == [None, 0.5]
    assert curves["locality"] == [1.0, 0.75]
    assert final_scores(result) == {"reliability": 1.0, "generalization": 1.0, "locality": 0.5}


def test_report_dicts_give_the_same_curves():
    result = fake_result()
    report = result.to_report()
    assert running_curves(report) == running_curves(result)
    assert final_scores(report) == final_scores(result)


def test_plot_writes_a_png(tmp_path):
    path = plot_sequential([("GRACE", fake_result()), ("MELO", fake_result().to_report())], tmp_path / "seq.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
