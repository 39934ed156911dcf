"""Every plugin distribution in this repository is discovered through the `kedit` entry-point group."""

import pathlib

import tomllib

from kedit_core.plugins import Registry

ROOT = pathlib.Path(__file__).resolve().parent.parent


def repo_plugins() -> dict[str, str]:
    found = {}
    for pyproject in [*ROOT.glob("*/pyproject.toml"), *ROOT.glob("plugins/*/pyproject.toml")]:
        if pyproject.parent.name == "template":  # rendered and installed by tests/test_template.py
            continue
        data = tomllib.loads(pyproject.read_text())
        for name in data.get("project", {}).get("entry-points", {}).get("kedit", {}):
            found[name] = data["project"]["name"]
    return found


def test_every_repository_plugin_loads_without_errors():
    expected = repo_plugins()
    assert {"ft", "rome", "grace", "serac"} <= set(expected)
    reg = Registry(autoload=True).load()
    assert reg.broken == [], [(b.name, b.error) for b in reg.broken]
    for name, dist in expected.items():
        assert reg.plugins[name].package == dist


def test_every_method_names_its_package():
    reg = Registry(autoload=True).load()
    assert {"ft-l", "ft-m", "rome", "memit", "pmet", "kn", "grace", "melo", "serac", "ike"} <= set(reg.methods)
    for name, info in reg.methods.items():
        assert info.cls.name == name and info.plugin.package.startswith("kedit-")
