"""kedit_grace tests: the local ``helpers`` module is importable (pytest runs in importlib mode), and
this package's plugin is registered in the process-wide registry (the suite turns entry-point
autoload off, and ``Patch.apply`` looks module-state methods up there)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def grace_plugin_registered():
    import kedit_grace.plugin
    from kedit_core.testing import plugin_registered

    with plugin_registered(kedit_grace.plugin, "grace", "kedit-grace"):
        yield
