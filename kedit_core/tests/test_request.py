import json

import pytest

from kedit_core.errors import RequestError
from kedit_core.request import EditRequest, detect_format, load_requests, requests_from_records


def test_counterfact_real_file(shipped_data):
    reqs = load_requests(shipped_data / "counterfact.json")
    raw = json.loads((shipped_data / "counterfact.json").read_text())
    assert len(reqs) == len(raw) == 299
    r, rec = reqs[0], raw[0]["requested_rewrite"]
    assert r.prompt == rec["prompt"].format(rec["subject"]) and r.subject == rec["subject"]
    assert r.target_new == rec["target_new"]["str"] and r.ground_truth == rec["target_true"]["str"]
    assert list(r.rephrase_prompts) == raw[0]["paraphrase_prompts"]
    assert len(r.neighborhood_prompts) == 10 and all(p.target == r.ground_truth for p in r.locality)
    assert r.case_id == str(raw[0]["case_id"])


def test_zsre_real_file_with_portability(shipped_data):
    reqs = load_requests(shipped_data / "zsre.json")
    raw = json.loads((shipped_data / "zsre.json").read_text())
    assert len(reqs) == 837
    r, rec = reqs[3], raw[3]
    assert (r.prompt, r.subject, r.target_new, r.ground_truth) == (
        rec["src"],
        rec["subject"],
        rec["alt"],
        rec["answers"][0],
    )
    assert r.rephrase_prompts == (rec["rephrase"],)
    assert r.locality[0].prompt == rec["loc"] and r.locality[0].target == rec["loc_ans"]
    assert r.portability[0].prompt == rec["portability"]["New Question"]


def test_zsre_train_reports_empty_target(shipped_data):
    with pytest.raises(RequestError, match=r"record \d+: target_new: .*at least 1 character"):
        load_requests(shipped_data / "zsre_train.json")


def test_easyedit_flat_file(shipped_data):
    reqs = load_requests(shipped_data / "counterfact_easyedit_train.json", limit=50)
    assert len(reqs) == 50 and all(r.locality for r in reqs) and all(r.rephrase_prompts for r in reqs)


def test_shipped_data_sets_by_name(shipped_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_requests("counterfact", limit=5) == load_requests(shipped_data / "counterfact.json", limit=5)
    assert load_requests("ZsRE", limit=2)[1].prompt == json.loads((shipped_data / "zsre.json").read_text())[1]["src"]
    assert len(load_requests("counterfact-train", limit=3)) == 3
    (tmp_path / "zsre").write_text(json.dumps([{"prompt": "Rome is in", "subject": "Rome", "target_new": "Spain"}]))
    assert load_requests("zsre")[0].target_new == "Spain"  # an existing file of that name wins
    with pytest.raises(RequestError, match="shipped data sets by name: counterfact, zsre"):
        load_requests("zsre-eval")


def test_shipped_data_carries_its_license(shipped_data):
    assert "MIT" in (shipped_data / "LICENSE").read_text()
    sources = (shipped_data / "SOURCES.md").read_text()
    assert all(name in sources for name in ("counterfact.json", "zsre.json", "zsre_train.json"))


def test_kedit_jsonl(tmp_path):
    p = tmp_path / "e.jsonl"
    lines = [
        {"prompt": "Paris is the capital of", "subject": "Paris", "target_new": "Italy"},
        {
            "prompt": "Rome is in",
            "subject": "Rome",
            "target_new": "Spain",
            "rephrase_prompts": ["Rome lies in"],
            "locality": [{"prompt": "Berlin is in", "target": "Germany"}],
        },
    ]
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    reqs = load_requests(p)
    assert [r.target_new for r in reqs] == ["Italy", "Spain"] and reqs[1].locality[0].target == "Germany"


def test_record_fitting_no_format_names_index():
    with pytest.raises(RequestError, match=r"record 1: fits no known format"):
        requests_from_records([{"prompt": "a b", "subject": "a", "target_new": "c"}, {"foo": 1}])


def test_missing_field_names_index_and_field():
    with pytest.raises(RequestError, match=r"record 0 \(ZsRE format\): missing field 'answers'"):
        requests_from_records([{"src": "x y", "subject": "x", "alt": "z"}])
    with pytest.raises(RequestError, match="record 0: missing field 'target_new'"):
        requests_from_records([{"prompt": "x y", "subject": "x"}])


def test_wrong_field_name_in_kedit_format():
    with pytest.raises(RequestError, match="unknown field 'targte_new'|fits no known format"):
        requests_from_records([{"prompt": "x y", "subject": "x", "target_new": "a", "targte_new": "b"}], fmt="kedit")


def test_subject_not_in_prompt():
    with pytest.raises(RequestError, match="subject 'Louvre' does not occur in prompt"):
        EditRequest.create(prompt="The Eiffel Tower is in", subject="Louvre", target_new="Rome")


@pytest.mark.parametrize("field", ["prompt", "subject", "target_new"])
def test_blank_strings_rejected(field):
    fields = {"prompt": "The Eiffel Tower is in", "subject": "Eiffel", "target_new": "Rome", field: "  "}
    with pytest.raises(RequestError):
        EditRequest.create(**fields)


def test_wrong_types():
    with pytest.raises(RequestError, match="must be a string"):
        requests_from_records([{"src": 3, "subject": "x", "alt": "z", "answers": ["a"]}])
    with pytest.raises(RequestError, match="expected a JSON object"):
        requests_from_records([[1, 2]])


def test_file_errors(tmp_path):
    with pytest.raises(RequestError, match="not found"):
        load_requests(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'[{"prompt": "caf\xe9"}]')
    with pytest.raises(RequestError, match="not UTF-8"):
        load_requests(bad)
    broken = tmp_path / "broken.json"
    broken.write_text('[{"prompt": ')
    with pytest.raises(RequestError, match="not JSON or JSONL"):
        load_requests(broken)
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(RequestError, match="no records"):
        load_requests(empty)


def test_detect_format():
    assert detect_format({"requested_rewrite": {}}) == "counterfact"
    assert detect_format({"src": "", "alt": ""}) == "zsre"
    assert detect_format({"prompt": "", "subject": "", "target_new": ""}) == "kedit"
    assert detect_format({"prompt": "", "subject": "", "target_new": "", "locality_prompt": ""}) == "easyedit"
