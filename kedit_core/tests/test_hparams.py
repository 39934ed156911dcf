import json
import re

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
    with pytest.raises(ValueError):  # pydantic's ValidationError
        hp.steps = "x"
    assert hp.updated(steps=9).steps == 9 and hp.steps == 3
    with pytest.raises(HparamsError):
        hp.updated(nope=1)


class Typed(Hyperparams):
    steps: int = 3
    lr: float = 0.1
    flag: bool = False
    ratio: tuple[float, float] = (0.5, 0.5)
    pairs: list[tuple[int, int]] = [(1, 2)]


@pytest.mark.parametrize(
    "field,value,expected",
    [
        ("steps", True, "Input should be a valid integer (got True)"),
        ("steps", 2.0, "Input should be a valid integer"),
        ("steps", "3", "Input should be a valid integer"),
        ("lr", "0.05", "Input should be a valid number (got '0.05')"),
        ("lr", True, "Input should be a valid number"),
        ("flag", 1, "Input should be a valid boolean"),
        ("flag", "yes", "Input should be a valid boolean"),
    ],
)
def test_values_are_not_coerced(field, value, expected):
    with pytest.raises(HparamsError, match=rf"^hyperparameters: field '{field}': {re.escape(expected)}"):
        Typed.from_dict({field: value})


def test_yaml_and_json_values_are_accepted_as_they_come(tmp_path):
    p = tmp_path / "h.yaml"
    p.write_text("steps: 7\nlr: 1\nflag: true\nratio: [1, 0.25]\npairs: [[3, 4], [5, 6]]\n")
    hp = Typed.from_file(p)
    assert (hp.steps, hp.lr, hp.flag, hp.ratio, hp.pairs) == (7, 1.0, True, (1.0, 0.25), [(3, 4), (5, 6)])
    assert isinstance(hp.lr, float) and isinstance(hp.ratio, tuple)
    j = tmp_path / "h.json"
    j.write_text(json.dumps(hp.to_dict()))
    assert Typed.from_file(j) == hp and Typed.from_dict({"ratio": (0.1, 0.9)}).ratio == (0.1, 0.9)


def test_yaml_exponent_floats_are_numbers_and_quoted_ones_strings(tmp_path):
    p = tmp_path / "h.yaml"
    p.write_text("lr: 1E3\n")
    assert HP.from_file(p).lr == 1000.0
    p.write_text("lr: '5e-1'\n")
    with pytest.raises(HparamsError, match="field 'lr': Input should be a valid number"):
        HP.from_file(p)
    p.write_text("steps: 1e3\n")  # an exponent makes a float, and a float is no int
    with pytest.raises(HparamsError, match="field 'steps': Input should be a valid integer"):
        HP.from_file(p)


def test_values_that_no_file_can_hold_are_refused_in_one_line():
    with pytest.raises(
        HparamsError, match=r"^hyperparameters: values must be numbers, strings, booleans, lists or mappings"
    ):
        HP.from_dict({"lr": object()})
