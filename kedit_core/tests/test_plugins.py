import importlib.metadata
import sys
import types

import pytest

from kedit_core import plugins
from kedit_core.errors import PluginError, UnknownMethod
from kedit_core.hookspecs import MethodSpec, hookimpl
from kedit_core.method import EditMethod
from kedit_core.plugins import Registry


class Dummy(EditMethod):
    name = "dummy"

    def compute_edit(self, *a, **k):  # pragma: no cover - never called
        raise AssertionError


def make_module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    return mod


def fake_entry_points(monkeypatch, eps):
    monkeypatch.setattr(
        plugins.importlib.metadata, "entry_points", lambda group=None: [e for e in eps if e.group == group]
    )


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
    _ = reg.method_class  # attribute access does nothing
    assert reg.plugins == {}


def test_broken_plugin_is_reported_and_skipped(monkeypatch):
    @hookimpl
    def register_methods(register):
        register(Dummy)

    sys.modules["kedit_test_good_plugin"] = make_module("kedit_test_good_plugin", register_methods=register_methods)
    try:
        fake_entry_points(
            monkeypatch,
            [
                importlib.metadata.EntryPoint("bad", "kedit_test_no_such_module_xyz", "kedit"),
                importlib.metadata.EntryPoint("good", "kedit_test_good_plugin", "kedit"),
            ],
        )
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


def test_same_name_from_two_plugins_is_a_clash_that_hides_nothing():
    @hookimpl
    def register_methods(register):
        register(Dummy)

    reg = Registry(autoload=False)
    reg.add_plugin(make_module("one", register_methods=register_methods), name="one", package="pkg-one")
    reg.add_plugin(make_module("two", register_methods=register_methods), name="two", package="pkg-two")
    assert "dummy" not in reg.methods and [m.plugin.name for m in reg.clashes["dummy"]] == ["one", "two"]
    with pytest.raises(
        PluginError, match=r"'dummy' is registered by pkg-one \(plugin one\) and pkg-two \(plugin two\)"
    ):
        reg.method_class("dummy")
    assert reg.lookup("pkg-two:dummy").plugin.name == "two" and reg.lookup("dummy", package="one").plugin.name == "one"
    with pytest.raises(UnknownMethod, match="provided by pkg-one:dummy, pkg-two:dummy"):
        reg.lookup("pkg-three:dummy")
    # a patch names the package that made it: that claimant attaches it; a patch of neither is refused
    assert isinstance(reg.method_for_patch("dummy", "pkg-two"), Dummy)
    with pytest.raises(PluginError, match="registered by pkg-one"):
        reg.method_for_patch("dummy", "pkg-three")


class Impostor(EditMethod):
    name = "rome"

    def compute_edit(self, *a, **k):  # pragma: no cover - never called
        raise AssertionError


def _dist_entry_point(name: str, module: str, package: str) -> importlib.metadata.EntryPoint:
    ep = importlib.metadata.EntryPoint(name, module, "kedit")
    return ep._for(types.SimpleNamespace(name=package, version="1.0"))


@pytest.fixture()
def hijack(monkeypatch):
    """A newly installed package registering ``rome`` beside the real kedit-rome (listed first, so that
    first-come-first-served would let it win)."""

    @hookimpl
    def register_methods(register):
        register(Impostor)

    sys.modules["kedit_test_impostor"] = make_module("kedit_test_impostor", register_methods=register_methods)
    fake_entry_points(
        monkeypatch,
        [
            _dist_entry_point("evil", "kedit_test_impostor", "evil-pkg"),
            _dist_entry_point("rome", "kedit_rome.plugin", "kedit-rome"),
        ],
    )
    yield
    del sys.modules["kedit_test_impostor"]


def test_a_plugin_claiming_a_taken_name_does_not_hijack_it(hijack):
    reg = Registry(autoload=True).load()
    assert {"memit", "pmet", "kn"} <= set(reg.methods) and reg.broken == []
    assert reg.method_class("memit").__name__ == "MEMIT"
    with pytest.raises(
        PluginError,
        match=r"kedit-rome \(plugin rome\) and evil-pkg \(plugin evil\)|evil-pkg \(plugin evil\) and kedit-rome",
    ):
        reg.method_class("rome")
    assert reg.method_class("kedit-rome:rome").__name__ == "ROME"
    assert reg.method_class("evil-pkg:rome") is Impostor


def test_blocking_the_impostor_by_package_or_plugin_name(hijack, monkeypatch):
    for blocked in ("evil-pkg", "evil"):
        monkeypatch.setenv("KEDIT_BLOCK_PLUGINS", blocked)
        reg = Registry(autoload=True).load()
        assert reg.method_class("rome").__name__ == "ROME" and reg.clashes == {}


def test_kedit_methods_lists_both_claimants(hijack, monkeypatch, capsys):
    from kedit_core.cli import main

    monkeypatch.setattr(plugins, "_REGISTRY", Registry(autoload=True))
    assert main(["methods"]) == 0
    out, err = capsys.readouterr()
    assert "kedit-rome:rome" in out and "evil-pkg:rome" in out and "memit" in out
    assert "'rome' is registered by" in err
    assert main(["edit", "--method", "rome", "--prompt", "a b", "--subject", "a", "--target", "c"]) == 1
    assert "name one as" in capsys.readouterr().err


def test_two_packages_with_one_entry_point_name_both_load(monkeypatch):
    @hookimpl
    def register_methods(register):
        register(Dummy)

    sys.modules["kedit_test_twin"] = make_module("kedit_test_twin", register_methods=register_methods)
    try:
        fake_entry_points(
            monkeypatch,
            [
                _dist_entry_point("twin", "kedit_test_twin", "pkg-a"),
                _dist_entry_point("twin", "kedit_rome.plugin", "pkg-b"),
            ],
        )
        reg = Registry(autoload=True).load()
    finally:
        del sys.modules["kedit_test_twin"]
    assert set(reg.plugins) >= {"twin", "twin@pkg-b"} and "memit" in reg.methods and "dummy" in reg.methods


def test_a_plugin_command_cannot_replace_a_taken_one():
    import click

    @click.command("edit")
    def fake_edit():  # pragma: no cover - must never be installed
        raise AssertionError

    @hookimpl
    def register_commands(cli):
        cli.add_command(fake_edit)

    group = click.Group(commands={"edit": click.Command("edit")})
    original = group.commands["edit"]
    reg = Registry(autoload=False)
    reg.add_plugin(make_module("cmds", register_commands=register_commands), name="cmds", package="pkg-cmds")
    reg.add_commands(group)
    assert group.commands["edit"] is original
    assert any(b.name == "cmds" and "command name 'edit' is already used" in b.error for b in reg.broken)


def test_method_spec_is_imported_on_first_use_and_checked(monkeypatch):
    imported = []

    class Lazy(EditMethod):
        name = "lazy"
        supports_batch = True
        preset_package = "kedit_test_lazy_mod"

        def compute_edit(self, *a, **k):  # pragma: no cover - never called
            raise AssertionError

    def fake_import(name):
        imported.append(name)
        return make_module(name, Lazy=Lazy)

    @hookimpl
    def register_methods(register):
        register(MethodSpec("lazy", "kedit_test_lazy_mod:Lazy", batch=True))
        register(MethodSpec("liar", "kedit_test_lazy_mod:Lazy"))

    reg = Registry(autoload=False).load()
    monkeypatch.setattr(plugins.importlib, "import_module", fake_import)
    reg.add_plugin(make_module("lazyplug", register_methods=register_methods), name="lazyplug", package="pkg-lazy")
    assert reg.methods["lazy"].capabilities()["batch"] is True and imported == []
    assert reg.method_class("lazy") is Lazy and imported == ["kedit_test_lazy_mod"]
    with pytest.raises(PluginError, match="is named 'lazy'"):
        reg.method_class("liar")


def test_method_spec_capabilities_must_match_the_class(monkeypatch):
    class Batchy(EditMethod):
        name = "batchy"
        supports_batch = True
        preset_package = "kedit_test_batchy"

        def compute_edit(self, *a, **k):  # pragma: no cover - never called
            raise AssertionError

    @hookimpl
    def register_methods(register):
        register(MethodSpec("batchy", "kedit_test_batchy:Batchy"))  # declares batch=False

    reg = Registry(autoload=False).load()
    monkeypatch.setattr(plugins.importlib, "import_module", lambda name: make_module(name, Batchy=Batchy))
    reg.add_plugin(make_module("b", register_methods=register_methods), name="b", package="pkg-b")
    with pytest.raises(PluginError, match="declares batch=False, kedit_test_batchy:Batchy has True"):
        reg.method_class("batchy")


def test_registering_a_non_method_is_reported():
    @hookimpl
    def register_methods(register):
        register(object)

    reg = Registry(autoload=False)
    reg.add_plugin(make_module("junk", register_methods=register_methods), name="junk")
    assert any("not an EditMethod subclass or a MethodSpec" in b.error for b in reg.broken)


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
