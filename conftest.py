"""Test-suite wide settings: no stray installed plugins unless a test asks (see kedit_core.plugins)."""

import os

# The distribution directories (kedit_core/, kedit_rome/, ...) carry their package's name; import the
# installed packages before collection so pytest's importlib mode does not mistake a directory for them.
import importlib  # noqa: E402
import pathlib  # noqa: E402

for _init in sorted(pathlib.Path(__file__).resolve().parent.glob("*/src/*/__init__.py")):
    try:
        importlib.import_module(_init.parent.name)
    except ImportError:  # a family not installed in this environment
        pass

os.environ.setdefault("KEDIT_DISABLE_PLUGIN_AUTOLOAD", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

DATA = pathlib.Path(__file__).resolve().parent.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data():
    """The real CounterFact/ZsRE files in ../shared/data."""
    if not DATA.is_dir():
        pytest.fail(f"shared data not found at {DATA}")
    return DATA


@pytest.fixture(scope="session")
def gemma():
    """The real Gemma 3 270M (model, tokenizer, info), loaded once per test session."""
    from kedit_core.models import load_model

    return load_model("gemma3-270m")

# the editor template is tested by rendering and installing it (tests/test_template.py), not in place
collect_ignore = ["plugins/template", "benchmarks"]
