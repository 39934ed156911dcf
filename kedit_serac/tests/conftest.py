import pathlib

import pytest

POOL = pathlib.Path(__file__).resolve().parent / "data" / "pool.json"


@pytest.fixture(autouse=True)
def serac_plugin_registered():
    """The suite runs with plugin autoload off; memory patches are applied through the process-wide
    registry (Patch.apply looks the method up there), so register this package's plugin by hand."""
    import kedit_serac.plugin
    from kedit_core.testing import plugin_registered

    with plugin_registered(kedit_serac.plugin, "serac", "kedit-serac"):
        yield


@pytest.fixture(scope="session")
def pool_file():
    """Six CounterFact training records (EasyEdit format), a tiny IKE demonstration pool."""
    return POOL
