"""benchmarks/conformance.py and benchmarks/prompt_format.py on the tiny random LLaMA: a method that runs
gives a row of scores with the model restored, one that cannot is a row with its error; the prompt-format
scores are shares of matching answers."""

import importlib.util
import sys
from pathlib import Path

import pytest

from kedit_core.models import ModelInfo
from kedit_core.request import EditRequest
from kedit_core.testing import tiny_model

ROOT = Path(__file__).resolve().parent.parent


def _script(name: str, file: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def conformance():
    import kedit_ft.plugin
    from kedit_core.plugins import reset_registry

    reg = reset_registry(autoload=False)
    reg.add_plugin(kedit_ft.plugin, name="ft", package="kedit-ft")
    yield _script("conformance_benchmark", "conformance.py")
    sys.modules.pop("conformance_benchmark", None)
    reset_registry()


def test_conformance_rows(conformance, monkeypatch, tmp_path):
    monkeypatch.setenv("KEDIT_CACHE", str(tmp_path))
    model, tok = tiny_model("llama")
    loaded = (model, tok, ModelInfo(id="tiny", key="tiny", source="in-memory"))
    req = EditRequest(prompt="The Eiffel Tower is located in", subject="The Eiffel Tower", target_new="Rome")
    ok = conformance.run_method("ft-l", loaded, [req], generation=False)
    assert ok["runs"] and ok["restored"] and ok["metrics"]["reliability"] >= ok["metrics_pre"]["reliability"]
    assert ok["hparams"]["method"] == "ft-l" and ok["time_per_edit_s"] > 0
    bad = conformance.run_method("no-such-method", loaded, [req], generation=False)
    assert not bad["runs"] and bad["error"].startswith("UnknownMethod")
    table = conformance.table([ok, bad]).splitlines()
    assert table[0].startswith("| method | runs | ES |") and len(table) == 5
    assert (
        table[2]
        == "| unedited model | - | "
        + " | ".join(f"{ok['metrics_pre'][k]:.2f}" if k in ok["metrics_pre"] else "-" for _, k in conformance.COLUMNS)
        + " | - |"
    )
    assert table[3].startswith("| ft-l | yes |") and table[4].startswith("| no-such-method | no: UnknownMethod")


def test_prompt_format_scores():
    pf = _script("prompt_format_benchmark", "prompt_format.py")
    try:
        scores = pf.score([" Paris, France.", " the city of Paris", " Rome"], ["Paris", "Paris", "Paris"])
        assert scores == {"exact": 1 / 3, "starts": 1 / 3, "contains": 2 / 3}
    finally:
        sys.modules.pop("prompt_format_benchmark", None)


def test_chat_edits_scores_each_edit_in_both_forms(monkeypatch, tmp_path):
    import kedit_ft.plugin
    from kedit_core.chat import PROMPT_FORMS, present
    from kedit_core.editor import Editor
    from kedit_core.evaluate import Evaluator
    from kedit_core.plugins import reset_registry
    from kedit_core.testing import state_fingerprint, tiny_requests

    monkeypatch.setenv("KEDIT_CACHE", str(tmp_path))
    ce = _script("chat_edits_benchmark", "chat_edits.py")
    reg = reset_registry(autoload=False)
    reg.add_plugin(kedit_ft.plugin, name="ft", package="kedit-ft")
    try:
        model, tok = tiny_model("llama")
        tok.chat_template = (
            "{% for m in messages %}[{{ m['content'] }}]{% endfor %}{% if add_generation_prompt %}>{% endif %}"
        )
        forms = {f: present(tiny_requests(), tok, f) for f in PROMPT_FORMS}
        ev = Evaluator(model, tok)
        pre, refs = {}, {}
        for f in PROMPT_FORMS:
            rows, refs[f] = ev.evaluate_with_reference(forms[f])
            pre[f] = ce.averaged(rows)
        before = state_fingerprint(model)
        info = ModelInfo(id="tiny", key="tiny", source="in-memory")
        editor = Editor("ft-l", model, tok, hparams={"method": "ft-l", "lr": 0.05, "num_steps": 40}, model_info=info)
        out = ce.run_method(editor, ev, forms, refs, 2)
        assert state_fingerprint(model) == before
        assert set(out) == set(PROMPT_FORMS) and all(set(r["scores"]) == set(PROMPT_FORMS) for r in out.values())
        for f in PROMPT_FORMS:  # the edit teaches its own form most target tokens (unedited: none)
            assert pre[f]["reliability"] == 0.0 and out[f]["scores"][f]["reliability"] >= 0.5
        table = ce.table({"unedited": pre, "methods": {"ft-l": out}}).splitlines()
        assert len(table) == 2 + 2 + 4 and table[4].startswith("| ft-l | completion | completion |")
    finally:
        sys.modules.pop("chat_edits_benchmark", None)
        reset_registry()
