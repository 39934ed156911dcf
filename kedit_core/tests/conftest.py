"""Fixtures shared by kedit-core's tests."""

import pytest

from kedit_core.plugins import reset_registry


@pytest.fixture(scope="module")
def ft_plugin():
    """The global registry holding only the FT plugin (as version 9.9): kedit-core's tests need one real
    method and none of the others; the registry is rebuilt afterwards."""
    import kedit_ft.plugin

    reg = reset_registry(autoload=False)
    reg.add_plugin(kedit_ft.plugin, name="ft", package="kedit-ft", version="9.9")
    yield reg
    reset_registry()
