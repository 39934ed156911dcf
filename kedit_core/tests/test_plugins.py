import importlib.metadata
import sys
import types

import pytest

from kedit_core import plugins
from kedit_core.errors import PluginError, UnknownMethod
from kedit_core.hookspecs import hookimpl
from kedit_core.method import EditMethod
from kedit_core.plugins import Registry


class Dummy(EditMethod):
    name = "dummy"

    def compute_patch(self, *a, **k):  # pragma: no cover - never called
        raise AssertionError


def make_module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    return mod


def fake_entry_points(monkeypatch, eps):
    monkeypatch.setattr(plugins.importlib.metadata, "entry_points", lambda group=None: [e for e in eps if e.group == group])


def test_autoload_off_loads_only_builtins():
    reg = Registry(autoload=False).load()
    assert list(reg.plugins) == ["kedit_core.builtin"]
    assert "Gemma3ForCausalLM" in reg.architectures and "GPT2LMHeadModel" in reg.architectures
    assert reg.methods == {}


def test_environment_switch_disables_autoload(monkeypatch):
    monkeypatch.setenv("KEDIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert Registry().autoload is False
    monkeypatch.setenv("KEDIT_DISABLE_PLUGIN_AUTOLOAD", "0")
    assert Registry().autoload is True


def test_loading_is_lazy():
    reg = Registry(autoload=False)
    assert reg.plugins == {} and not reg._loaded
    reg.method_class  # attribute access does nothing
    assert reg.plugins == {}


def test_broken_plugin_is_reported_and_skipped(monkeypatch):
    @hookimpl
    def register_methods(register):
        register(Dummy)

    sys.modules["kedit_test_good_plugin"] = make_module("kedit_test_good_plugin", register_methods=register_methods)
    try:
        fake_entry_points(monkeypatch, [
            importlib.metadata.EntryPoint("bad", "kedit_test_no_such_module_xyz", "kedit"),
            importlib.metadata.EntryPoint("good", "kedit_test_good_plugin", "kedit"),
        ])
        reg = Registry(autoload=True).load()
    finally:
        del sys.modules["kedit_test_good_plugin"]
    assert "dummy" in reg.methods
    [broken] = reg.broken
    assert broken.name == "bad" and "import failed" in broken.error and "kedit_test_no_such_module_xyz" in broken.error


def test_misspelled_hook_is_rejected_by_check_pending():
    @hookimpl
    def register_method(register):  # missing "s"
        register(Dummy)

    reg = Registry(autoload=False)
    reg.add_plugin(make_module("typo", register_method=register_method), name="typo")
    assert "dummy" not in reg.methods
    assert reg.broken and "register_method" in reg.broken[0].error
    assert reg.pm.get_plugin("typo") is None


def test_duplicate_method_name_is_an_error_and_the_first_is_kept():
    @hookimpl
    def register_methods(register):
        register(Dummy)

    reg = Registry(autoload=False)
    reg.add_plugin(make_module("one", register_methods=register_methods), name="one")
    reg.add_plugin(make_module("two", register_methods=register_methods), name="two")
    assert reg.methods["dummy"].plugin.name == "one"
    assert any("registered twice" in b.error for b in reg.broken)


def test_registering_a_non_method_is_reported():
    @hookimpl
    def register_methods(register):
        register(object)

    reg = Registry(autoload=False)
    reg.add_plugin(make_module("junk", register_methods=register_methods), name="junk")
    assert any("not an EditMethod subclass" in b.error for b in reg.broken)


def test_block_plugins_env(monkeypatch):
    monkeypatch.setenv("KEDIT_BLOCK_PLUGINS", "bad, other")
    fake_entry_points(monkeypatch, [importlib.metadata.EntryPoint("bad", "kedit_test_no_such_module_xyz", "kedit")])
    reg = Registry(autoload=True).load()
    assert reg.broken == [] and "bad" not in reg.plugins


def test_unknown_method_names_installed_ones():
    reg = Registry(autoload=False).load()
    with pytest.raises(UnknownMethod, match="unknown method 'nope'"):
        reg.method("nope")
    assert issubclass(UnknownMethod, PluginError)


def test_remove_plugin():
    @hookimpl
    def register_methods(register):
        register(Dummy)

    reg = Registry(autoload=False)
    reg.add_plugin(make_module("one", register_methods=register_methods), name="one")
    reg.remove_plugin("one")
    assert "dummy" not in reg.methods
