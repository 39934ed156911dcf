import pathlib

import pytest

POOL = pathlib.Path(__file__).resolve().parent / "data" / "pool.json"


@pytest.fixture(autouse=True)
def serac_plugin_registered():
    """The suite runs with plugin autoload off; memory patches are applied through the process-wide
    registry (Patch.apply looks the method up there), so register this package's plugin by hand."""
    import kedit_serac.plugin
    from kedit_core.plugins import get_registry

    registry = get_registry()
    added = "serac" not in registry.plugins
    if added:
        registry.add_plugin(kedit_serac.plugin, name="serac", package="kedit-serac")
    yield
    if added:
        registry.remove_plugin("serac")


@pytest.fixture(scope="session")
def pool_file():
    """Six CounterFact training records (EasyEdit format), a tiny IKE demonstration pool."""
    return POOL
