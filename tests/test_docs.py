"""The 'Writing an editor' guide states every hookspec with the code's exact signature."""

import inspect
import re
from pathlib import Path

from kedit_core import hookspecs

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "writing-an-editor.md"


def code_hookspecs() -> dict[str, str]:
    out = {}
    for name, fn in vars(hookspecs).items():
        if callable(fn) and hasattr(fn, "kedit_spec"):
            out[name] = f"def {name}{inspect.signature(fn)}:"
    return out


def test_every_hookspec_is_in_the_guide_with_its_signature():
    text = GUIDE.read_text()
    documented = {name: line for line, name in re.findall(r"^(def (\w+)\(.*\):)$", text, flags=re.M)}
    specs = code_hookspecs()
    assert specs, "no hookspecs found"
    assert documented == specs
