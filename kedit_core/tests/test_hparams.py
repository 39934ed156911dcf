import json

import pytest
from pydantic import Field

from kedit_core.errors import HparamsError
from kedit_core.hparams import Hyperparams


class HP(Hyperparams):
    layers: list[int] = Field(default=[5], min_length=1)
    lr: float = 0.1
    steps: int = 3


def test_unknown_key_rejected_with_its_name():
    with pytest.raises(HparamsError, match="unknown field 'lerning_rate'"):
        HP.from_dict({"lerning_rate": 1.0})


def test_wrong_type_names_field():
    with pytest.raises(HparamsError, match="field 'steps'"):
        HP.from_dict({"steps": "many"})


def test_yaml_scientific_notation_parses_as_float(tmp_path):
    p = tmp_path / "h.yaml"
    p.write_text("lr: 5e-1\nlayers: [1, 2]\n")
    hp = HP.from_file(p)
    assert hp.lr == 0.5 and isinstance(hp.lr, float) and hp.layers == [1, 2]


def test_json_file(tmp_path):
    p = tmp_path / "h.json"
    p.write_text(json.dumps({"steps": 7, "method": "x"}))
    assert HP.from_file(p).steps == 7


def test_bad_files(tmp_path):
    with pytest.raises(HparamsError, match="not found"):
        HP.from_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1, 2\n")
    with pytest.raises(HparamsError, match="not valid YAML"):
        HP.from_file(bad)
    notmap = tmp_path / "list.yaml"
    notmap.write_text("- 1\n- 2\n")
    with pytest.raises(HparamsError, match="expected a mapping"):
        HP.from_file(notmap)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00lr")
    with pytest.raises(HparamsError, match="cannot read"):
        HP.from_file(binary)


def test_constraints_validated():
    with pytest.raises(HparamsError, match="layers"):
        HP.from_dict({"layers": []})


def test_assignment_is_validated_and_updated_copy():
    hp = HP()
    with pytest.raises(Exception):
        hp.steps = "x"
    assert hp.updated(steps=9).steps == 9 and hp.steps == 3
    with pytest.raises(HparamsError):
        hp.updated(nope=1)
