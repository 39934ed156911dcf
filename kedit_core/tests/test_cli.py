"""The CLI on a tiny model saved to disk: every bad input is one clear line, exit code != 0, files untouched."""

import json

import pytest

from kedit_core.cli import main
from kedit_core.testing import state_fingerprint, tiny_model

EDIT = ["--prompt", "The Eiffel Tower is located in the city of", "--subject", "The Eiffel Tower", "--target", "Rome"]


pytestmark = pytest.mark.usefixtures("ft_plugin")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    model, tok = tiny_model("llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-other")
    model, tok = tiny_model("llama", seed=7)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def patch_file(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("patches") / "p.kedit.safetensors"
    hp = tmp_path_factory.mktemp("hp") / "ft.yaml"
    hp.write_text("layers: [1, 2]\nlr: 0.05\nnum_steps: 15\n")
    assert (
        main(["edit", "--method", "ft-m", "--model", str(model_dir), *EDIT, "--hparams", str(hp), "--out", str(out)])
        == 0
    )
    return out


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_methods_lists_ft(capsys):
    assert main(["methods", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    names = {m["method"]: m for m in data["methods"]}
    assert names["ft-m"]["package"] == "kedit-ft" and names["ft-m"]["batch"] is True


def test_edit_prints_before_after_and_writes_patch(patch_file, model_dir, capsys):
    assert patch_file.is_file()
    assert main(["patch", "show", str(patch_file), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["method"] == "ft-m" and shown["requests"][0]["target_new"] == "Rome"


def test_edit_human_output(model_dir, tmp_path, capsys):
    assert (
        main(
            [
                "edit",
                "--method",
                "ft-m",
                "--model",
                str(model_dir),
                *EDIT,
                "--out",
                str(tmp_path / "x.kedit.safetensors"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "before:" in out and "after:" in out and "reliability" in out and "written to" in out


def test_unknown_method(model_dir, capsys):
    assert main(["edit", "--method", "rome2000", "--model", str(model_dir), *EDIT]) == 1
    assert "unknown method 'rome2000'" in one_error_line(capsys)


def test_subject_not_in_prompt(model_dir, tmp_path, capsys):
    args = [
        "edit",
        "--method",
        "ft-m",
        "--model",
        str(model_dir),
        "--prompt",
        "The tower is in",
        "--subject",
        "Louvre",
        "--target",
        "Rome",
        "--out",
        str(tmp_path / "p.kedit.safetensors"),
    ]
    assert main(args) == 1
    assert "does not occur in prompt" in one_error_line(capsys)
    assert not (tmp_path / "p.kedit.safetensors").exists()


def test_wrong_hparams_field(model_dir, tmp_path, capsys):
    hp = tmp_path / "bad.yaml"
    hp.write_text("layers: [1]\nlearning_rate: 0.1\n")
    assert main(["edit", "--method", "ft-m", "--model", str(model_dir), *EDIT, "--hparams", str(hp)]) == 1
    assert "unknown field 'learning_rate'" in one_error_line(capsys)


def test_wrong_data_field(model_dir, tmp_path, capsys):
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"prompt": "Paris is in", "subject": "Paris", "target": "Italy"}]))
    assert main(["eval", "--method", "ft-m", "--model", str(model_dir), "--data", str(data)]) == 1
    line = one_error_line(capsys)
    assert "record 0" in line and "target_new" in line


def test_patch_for_another_model_refused(patch_file, other_model_dir, capsys):
    before = state_fingerprint(tiny_model("llama", seed=7)[0])
    assert (
        main(
            [
                "patch",
                "apply",
                str(patch_file),
                "--model",
                str(other_model_dir),
                "--save-to",
                str(other_model_dir / "edited"),
            ]
        )
        == 1
    )
    assert "computed on other weights" in one_error_line(capsys)
    assert not (other_model_dir / "edited").exists()
    from transformers import AutoModelForCausalLM

    assert state_fingerprint(AutoModelForCausalLM.from_pretrained(other_model_dir)) == before


def test_truncated_patch_file(patch_file, model_dir, tmp_path, capsys):
    bad = tmp_path / "trunc.kedit.safetensors"
    bad.write_bytes(patch_file.read_bytes()[:100])
    assert main(["patch", "apply", str(bad), "--model", str(model_dir)]) == 1
    assert "corrupt or truncated" in one_error_line(capsys)
    assert main(["patch", "show", str(bad)]) == 1
    assert "corrupt or truncated" in one_error_line(capsys)


def test_missing_model(capsys, tmp_path):
    assert main(["edit", "--method", "ft-m", "--model", str(tmp_path / "nothing" / "here.gguf"), *EDIT]) == 1
    assert "cannot load model" in one_error_line(capsys)


def test_apply_save_and_revert_from_file(patch_file, model_dir, tmp_path, capsys):
    edited = tmp_path / "edited"
    assert main(["patch", "apply", str(patch_file), "--model", str(model_dir), "--save-to", str(edited)]) == 0
    assert "edited model saved" in capsys.readouterr().out
    reverted = tmp_path / "reverted"
    assert main(["patch", "revert", str(patch_file), "--model", str(edited), "--save-to", str(reverted), "--json"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[: out.rindex("}") + 1])
    assert "reverted model saved" in out
    assert all("exact" in r for r in report.values())
    from transformers import AutoModelForCausalLM

    restored = AutoModelForCausalLM.from_pretrained(reverted)
    original = AutoModelForCausalLM.from_pretrained(model_dir)
    import torch

    for (n, a), (_, b) in zip(restored.state_dict().items(), original.state_dict().items(), strict=False):
        assert torch.allclose(a, b, atol=1e-6), n


def test_revert_refuses_a_model_that_never_had_the_patch(patch_file, model_dir, capsys):
    assert main(["patch", "revert", str(patch_file), "--model", str(model_dir), "--json"]) == 1
    line = one_error_line(capsys)
    assert "does not hold patch" in line and "nothing reverted" in line
    assert capsys.readouterr().out == ""


def test_revert_json_and_text_report_the_same_words_and_numbers(patch_file, model_dir, tmp_path, capsys):
    edited = tmp_path / "edited"
    assert main(["patch", "apply", str(patch_file), "--model", str(model_dir), "--save-to", str(edited)]) == 0
    capsys.readouterr()
    assert main(["patch", "revert", str(patch_file), "--model", str(edited), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert main(["patch", "revert", str(patch_file), "--model", str(edited)]) == 0
    text = capsys.readouterr().out.splitlines()
    assert report and sorted(text) == sorted(f"reverted {name}: {r['summary']}" for name, r in report.items())
    for r in report.values():
        assert (r["max_abs_error_bound"] == 0.0) == r["exact"]
        assert r["exact"] or repr(r["max_abs_error_bound"]) in r["summary"]


def test_eval_json_report(model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "r.json"
    monkeypatch.chdir(tmp_path)  # the shipped data set is found by name from any directory
    assert (
        main(
            [
                "eval",
                "--method",
                "ft-m",
                "--model",
                str(model_dir),
                "--data",
                "zsre",
                "--limit",
                "3",
                "--sequential",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert report["n"] == 3 and report["sequential"] and len(report["per_request"]) == 3
    assert set(report["metrics"]) >= {"reliability", "generalization", "locality", "portability"}
    assert "final" in capsys.readouterr().out


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-chat")
    model, tok = tiny_model("llama")
    tok.chat_template = (
        "{% for m in messages %}[{{ m['content'] }}]{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    )
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_edit_in_chat_form_edits_the_templated_prompt(chat_model_dir, tmp_path, capsys):
    out = tmp_path / "c.kedit.safetensors"
    args = ["edit", "--method", "ft-m", "--model", str(chat_model_dir), *EDIT, "--rephrase", "Where is it? In"]
    assert main([*args, "--prompt-form", "chat", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["prompt_form"] == "chat"
    assert [c["prompt"] for c in report["completions"]] == [f"[{EDIT[1]}]>", "[Where is it? In]>"]
    assert main(["patch", "show", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["requests"][0]["prompt"] == f"[{EDIT[1]}]>"
    assert main([*args, "--prompt-form", "chat", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "asked through the chat template" in text and f"  {EDIT[1]}\n" in text


def test_chat_form_without_a_template_is_one_line_and_writes_nothing(model_dir, tmp_path, capsys):
    out = tmp_path / "c.kedit.safetensors"
    args = ["edit", "--method", "ft-m", "--model", str(model_dir), *EDIT, "--prompt-form", "chat", "--out", str(out)]
    assert main(args) == 1
    assert "no chat template" in one_error_line(capsys) and not out.exists()
