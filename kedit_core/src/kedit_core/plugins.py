"""Plugin loading: a pluggy manager for the ``kedit`` entry-point group, loaded lazily.

Environment switches:

* ``KEDIT_DISABLE_PLUGIN_AUTOLOAD=1`` -- do not load entry points (only kedit-core's built-ins and
  plugins added with :meth:`Registry.add_plugin`); the test suite uses it.
* ``KEDIT_BLOCK_PLUGINS=name,name`` -- skip these entry-point names.

A plugin that fails to import, implements a hook that does not exist (``check_pending``) or raises
while registering is recorded in :attr:`Registry.broken` and skipped; the others keep working.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pluggy

from . import hookspecs
from .errors import PluginError, UnknownMethod

if TYPE_CHECKING:
    from .architecture import ArchitectureSpec
    from .method import EditMethod

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "kedit"
AUTOLOAD_ENV = "KEDIT_DISABLE_PLUGIN_AUTOLOAD"
BLOCK_ENV = "KEDIT_BLOCK_PLUGINS"
BUILTIN_PLUGINS = ("kedit_core.builtin",)


@dataclass
class PluginInfo:
    """One loaded (or failed) plugin, as ``kedit methods`` shows it."""

    name: str
    package: str
    version: str
    error: str | None = None


@dataclass
class MethodInfo:
    cls: type[EditMethod]
    plugin: PluginInfo


@dataclass
class Registry:
    """The plugin manager plus the methods and architectures the plugins registered."""

    autoload: bool = field(default_factory=lambda: os.environ.get(AUTOLOAD_ENV, "") not in ("1", "true", "yes"))
    pm: pluggy.PluginManager = field(init=False)
    plugins: dict[str, PluginInfo] = field(default_factory=dict)
    broken: list[PluginInfo] = field(default_factory=list)
    methods: dict[str, MethodInfo] = field(default_factory=dict)
    architectures: dict[str, ArchitectureSpec] = field(default_factory=dict)
    _loaded: bool = False

    def __post_init__(self) -> None:
        self.pm = pluggy.PluginManager("kedit")
        self.pm.add_hookspecs(hookspecs)

    # -- loading --------------------------------------------------------------------------------
    def load(self) -> Registry:
        """Load built-ins and (unless disabled) entry points; idempotent."""
        if self._loaded:
            return self
        self._loaded = True
        for modname in BUILTIN_PLUGINS:
            module = importlib.import_module(modname)
            self._register(module, PluginInfo(modname, "kedit-core", _version("kedit-core")))
        if self.autoload:
            self._load_entry_points()
        self._collect()
        return self

    def _load_entry_points(self) -> None:
        blocked = {b.strip() for b in os.environ.get(BLOCK_ENV, "").split(",") if b.strip()}
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = getattr(ep, "dist", None)
            info = PluginInfo(ep.name, dist.name if dist else ep.value, dist.version if dist else "?")
            if ep.name in blocked:
                log.info("plugin %s blocked by %s", ep.name, BLOCK_ENV)
                continue
            if ep.name in self.plugins:
                self._fail(info, f"entry point name {ep.name!r} is used by two packages")
                continue
            try:
                module = ep.load()
            except Exception as exc:  # a broken plugin must not take the others down
                self._fail(info, f"import failed: {type(exc).__name__}: {exc}")
                continue
            self._register(module, info)

    def _register(self, plugin: Any, info: PluginInfo) -> bool:
        try:
            self.pm.register(plugin, name=info.name)
            self.pm.check_pending()
        except Exception as exc:
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            self._fail(info, f"invalid hooks: {exc}")
            return False
        self.plugins[info.name] = info
        return True

    def _fail(self, info: PluginInfo, message: str) -> None:
        info.error = message
        self.broken.append(info)
        log.warning("kedit plugin %s (%s) skipped: %s", info.name, info.package, message)

    def add_plugin(self, plugin: Any, name: str | None = None, package: str = "local", version: str = "0") -> None:
        """Register a plugin object or module by hand (tests, notebooks); methods are re-collected."""
        self.load()
        name = name or getattr(plugin, "__name__", repr(plugin))
        if self._register(plugin, PluginInfo(name, package, version)):
            self._collect()

    def remove_plugin(self, name: str) -> None:
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin)
        self.plugins.pop(name, None)
        self._collect()

    # -- collecting -----------------------------------------------------------------------------
    def _collect(self) -> None:
        from .architecture import ArchitectureSpec
        from .method import EditMethod

        self.methods.clear()
        self.architectures.clear()
        for impl in self.pm.hook.register_architectures.get_hookimpls():

            def register_arch(spec: ArchitectureSpec, _plugin=impl.plugin_name) -> None:
                if not isinstance(spec, ArchitectureSpec):
                    raise PluginError(f"plugin {_plugin} registered {spec!r}, not an ArchitectureSpec")
                for arch_name in spec.names:
                    self.architectures[arch_name] = spec

            self._call(impl, register_arch)
        for impl in self.pm.hook.register_methods.get_hookimpls():

            def register_method(cls: type[EditMethod], _plugin=impl.plugin_name) -> None:
                if not (isinstance(cls, type) and issubclass(cls, EditMethod)):
                    raise PluginError(f"plugin {_plugin} registered {cls!r}, not an EditMethod subclass")
                name = cls.name
                if name in self.methods:
                    other = self.methods[name].plugin.name
                    raise PluginError(f"method {name!r} is registered twice (by {other} and by {_plugin})")
                self.methods[name] = MethodInfo(cls, self.plugins.get(_plugin, PluginInfo(_plugin, "?", "?")))

            self._call(impl, register_method)

    def _call(self, impl: Any, register: Any) -> None:
        try:
            impl.function(register)
        except Exception as exc:
            info = self.plugins.get(impl.plugin_name, PluginInfo(impl.plugin_name, "?", "?"))
            self._fail(PluginInfo(info.name, info.package, info.version), f"{impl.function.__name__} raised: {exc}")

    # -- queries --------------------------------------------------------------------------------
    def method_class(self, name: str) -> type[EditMethod]:
        self.load()
        key = name.lower()
        if key not in self.methods:
            known = ", ".join(sorted(self.methods)) or "none"
            hint = ""
            broken = [b for b in self.broken if b.error]
            if broken:
                hint = " (broken plugins: " + "; ".join(f"{b.name}: {b.error}" for b in broken) + ")"
            raise UnknownMethod(f"unknown method {name!r}; installed methods: {known}{hint}")
        return self.methods[key].cls

    def method(self, name: str) -> EditMethod:
        return self.method_class(name)()

    def notify(self, hook: str, **kwargs: Any) -> None:
        """Call an observer hook (``patch_applied`` / ``patch_reverted``); observers' errors are logged."""
        self.load()
        try:
            getattr(self.pm.hook, hook)(**kwargs)
        except Exception:
            log.exception("observer hook %s raised", hook)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, created and loaded on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = Registry()
    return _REGISTRY.load()


def reset_registry(autoload: bool | None = None) -> Registry:
    """Drop the process-wide registry (tests); the next :func:`get_registry` builds a new one."""
    global _REGISTRY
    _REGISTRY = Registry() if autoload is None else Registry(autoload=autoload)
    return _REGISTRY.load()


def get_method(name: str) -> EditMethod:
    return get_registry().method(name)


def core_version() -> str:
    return _version("kedit-core")
