"""Plugin loading: a pluggy manager for the ``kedit`` entry-point group, loaded lazily.

Environment switches:

* ``KEDIT_DISABLE_PLUGIN_AUTOLOAD=1`` -- do not load entry points (only kedit-core's built-ins and
  plugins added with :meth:`Registry.add_plugin`); the test suite uses it.
* ``KEDIT_BLOCK_PLUGINS=name,name`` -- skip these plugins (entry-point names or package names).

A plugin that fails to import, implements a hook that does not exist (``check_pending``), raises while
registering, or takes a command name that is already used is recorded in :attr:`Registry.broken`; the
others keep working.

Method names: a name registered by one plugin is used as it is. A name registered by two or more
plugins is a *clash*: no claimant wins silently. The bare name is refused with a message naming every
claimant and its package; ``package:name`` (``kedit-rome:rome``) picks one, ``KEDIT_BLOCK_PLUGINS``
removes one, and every other method of the same packages keeps working.

Nothing here imports torch: methods registered as :class:`~kedit_core.hookspecs.MethodSpec` are
imported on first use, and architectures are collected when first asked for.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pluggy

from . import hookspecs
from .errors import PluginError, UnknownMethod
from .hookspecs import MethodSpec

if TYPE_CHECKING:
    from .architecture import ArchitectureSpec
    from .evaluate.metrics import Metric
    from .method import EditMethod

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "kedit"
AUTOLOAD_ENV = "KEDIT_DISABLE_PLUGIN_AUTOLOAD"
BLOCK_ENV = "KEDIT_BLOCK_PLUGINS"
BUILTIN_PLUGINS = ("kedit_core.builtin",)


def _norm(name: str) -> str:
    """Package and plugin names compare as pip does: case-insensitive, ``-`` ``_`` ``.`` alike."""
    return name.lower().replace("_", "-").replace(".", "-")


@dataclass
class PluginInfo:
    """One loaded (or failed) plugin, as ``kedit methods`` shows it."""

    name: str
    package: str
    version: str
    error: str | None = None


@dataclass
class MethodInfo:
    """One method as a plugin registered it; the class is imported on first use of :attr:`cls`."""

    name: str
    plugin: PluginInfo
    spec: MethodSpec | None = None
    _cls: type[EditMethod] | None = field(default=None, repr=False)

    @property
    def qualified(self) -> str:
        return f"{self.plugin.package}:{self.name}"

    @property
    def cls(self) -> type[EditMethod]:
        if self._cls is None:
            assert self.spec is not None
            self._cls = _import_method(self.spec, self.plugin)
        return self._cls

    def capabilities(self) -> dict[str, Any]:
        return self.spec.capabilities() if self.spec is not None else self.cls.capabilities()

    def presets(self) -> dict[str, Any]:
        if self.spec is None:
            return self.cls.presets()
        from .hparams import preset_files

        return preset_files(_spec_package(self.spec), self.name)


def _spec_package(spec: MethodSpec) -> str:
    return spec.target.split(":")[0].split(".")[0]


def _import_method(spec: MethodSpec, plugin: PluginInfo) -> type[EditMethod]:
    """Import a spec's class and check that it is the method the plugin declared."""
    from .method import EditMethod

    where = f"method {spec.name!r} of {plugin.package}"
    module_name, _, attr = spec.target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except Exception as exc:  # a broken plugin must not take the others down
        raise PluginError(f"{where}: cannot import {spec.target}: {type(exc).__name__}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, EditMethod)):
        raise PluginError(f"{where}: {spec.target} is not an EditMethod subclass")
    if cls.name != spec.name:
        raise PluginError(f"{where}: {spec.target} is named {cls.name!r}")
    actual = cls.capabilities()
    for key, declared in spec.capabilities().items():
        if actual[key] != declared:
            raise PluginError(f"{where}: the plugin declares {key}={declared!r}, {spec.target} has {actual[key]!r}")
    if (cls.preset_package or cls.__module__.split(".")[0]) != _spec_package(spec):
        raise PluginError(f"{where}: presets are read from {cls.preset_package!r}, not {_spec_package(spec)!r}")
    return cls


@dataclass
class Registry:
    """The plugin manager plus the methods and architectures the plugins registered."""

    autoload: bool = field(default_factory=lambda: os.environ.get(AUTOLOAD_ENV, "") not in ("1", "true", "yes"))
    pm: pluggy.PluginManager = field(init=False)
    plugins: dict[str, PluginInfo] = field(default_factory=dict)
    _broken: list[PluginInfo] = field(default_factory=list, repr=False)
    _claims: dict[str, list[MethodInfo]] | None = field(default=None, repr=False)
    _architectures: dict[str, ArchitectureSpec] | None = field(default=None, repr=False)
    _metrics: list[Metric] | None = field(default=None, repr=False)
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
        self._invalidate()
        return self

    def _load_entry_points(self) -> None:
        blocked = {_norm(b) for b in os.environ.get(BLOCK_ENV, "").split(",") if b.strip()}
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = getattr(ep, "dist", None)
            package = dist.name if dist else ep.value
            if _norm(ep.name) in blocked or _norm(package) in blocked:
                log.info("plugin %s (%s) blocked by %s", ep.name, package, BLOCK_ENV)
                continue
            # two packages may use one entry-point name: both load, the second under "name@package"
            name = ep.name if ep.name not in self.plugins else f"{ep.name}@{package}"
            info = PluginInfo(name, package, dist.version if dist else "?")
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
        self._broken.append(info)
        log.warning("kedit plugin %s (%s) skipped: %s", info.name, info.package, message)

    def _invalidate(self) -> None:
        self._claims = None
        self._architectures = None
        self._metrics = None

    def add_plugin(self, plugin: Any, name: str | None = None, package: str = "local", version: str = "0") -> None:
        """Register a plugin object or module by hand (tests, notebooks); methods are re-collected."""
        self.load()
        name = name or getattr(plugin, "__name__", repr(plugin))
        if self._register(plugin, PluginInfo(name, package, version)):
            self._invalidate()

    def remove_plugin(self, name: str) -> None:
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin)
        self.plugins.pop(name, None)
        self._invalidate()

    # -- collecting -----------------------------------------------------------------------------
    @property
    def broken(self) -> list[PluginInfo]:
        """Plugins that failed to load or to register (methods are collected first, to report theirs)."""
        self.claims  # noqa: B018 - collecting records the registrations that fail
        return self._broken

    @property
    def claims(self) -> dict[str, list[MethodInfo]]:
        """Every registration of every method name (more than one: a clash)."""
        self.load()
        if self._claims is None:
            self._claims = self._collect_methods()
        return self._claims

    @property
    def methods(self) -> dict[str, MethodInfo]:
        """The usable methods by bare name: every name registered by exactly one plugin."""
        return {name: infos[0] for name, infos in self.claims.items() if len(infos) == 1}

    @property
    def clashes(self) -> dict[str, list[MethodInfo]]:
        """Names registered by several plugins: usable only as ``package:name``."""
        return {name: infos for name, infos in self.claims.items() if len(infos) > 1}

    def _collect_methods(self) -> dict[str, list[MethodInfo]]:
        claims: dict[str, list[MethodInfo]] = {}
        for impl in self.pm.hook.register_methods.get_hookimpls():
            info = self.plugins.get(impl.plugin_name, PluginInfo(impl.plugin_name, "?", "?"))
            problems: list[str] = []

            def register(item: Any, _info: PluginInfo = info, _problems: list[str] = problems) -> None:
                method = _method_info(item, _info)
                if isinstance(method, str):
                    _problems.append(method)
                    return
                if any(m.plugin is _info for m in claims.get(method.name, [])):
                    _problems.append(f"registers method {method.name!r} twice")
                    return
                claims.setdefault(method.name, []).append(method)

            self._call(impl, register)
            if problems:
                self._fail(PluginInfo(info.name, info.package, info.version), "; ".join(problems))
        for name, infos in claims.items():
            if len(infos) > 1:
                who = ", ".join(f"{m.plugin.package} (plugin {m.plugin.name})" for m in infos)
                log.warning("method %r is registered by %d plugins: %s; use package:%s", name, len(infos), who, name)
        return claims

    @property
    def architectures(self) -> dict[str, ArchitectureSpec]:
        self.load()
        if self._architectures is None:
            self._architectures = self._collect_architectures()
        return self._architectures

    def _collect_architectures(self) -> dict[str, ArchitectureSpec]:
        from .architecture import ArchitectureSpec

        found: dict[str, ArchitectureSpec] = {}
        for impl in self.pm.hook.register_architectures.get_hookimpls():

            def register_arch(spec: ArchitectureSpec, _plugin: str = impl.plugin_name) -> None:
                if not isinstance(spec, ArchitectureSpec):
                    raise PluginError(f"plugin {_plugin} registered {spec!r}, not an ArchitectureSpec")
                for arch_name in spec.names:
                    found[arch_name] = spec

            self._call(impl, register_arch)
        return found

    @property
    def metrics(self) -> list[Metric]:
        """Metrics plugins registered (after the built-ins, in registration order)."""
        self.load()
        if self._metrics is None:
            self._metrics = self._collect_metrics()
        return self._metrics

    def _collect_metrics(self) -> list[Metric]:
        from .evaluate.metrics import BUILTIN_METRICS, Metric

        found: list[Metric] = []
        taken = {m.name for m in BUILTIN_METRICS}
        for impl in self.pm.hook.register_metrics.get_hookimpls():

            def register(metric: Metric, _plugin: str = impl.plugin_name) -> None:
                if not isinstance(metric, Metric) or metric.compute is None:
                    raise PluginError(f"plugin {_plugin} registered {metric!r}, not a Metric with a compute function")
                if metric.name in taken:
                    raise PluginError(f"metric name {metric.name!r} is already taken")
                taken.add(metric.name)
                found.append(metric)

            self._call(impl, register)
        return found

    def add_commands(self, cli: Any) -> None:
        """Call every plugin's ``register_commands``; a plugin that takes a name already in use is
        reported as broken and the command that had the name is kept."""
        self.load()
        for impl in self.pm.hook.register_commands.get_hookimpls():
            before = dict(cli.commands)
            self._call(impl, cli)
            taken = sorted(name for name, command in before.items() if cli.commands.get(name) is not command)
            if taken:
                cli.commands.update({name: before[name] for name in taken})
                info = self.plugins.get(impl.plugin_name, PluginInfo(impl.plugin_name, "?", "?"))
                self._fail(
                    PluginInfo(info.name, info.package, info.version),
                    f"command name {', '.join(map(repr, taken))} is already used; kept the existing one",
                )

    def _call(self, impl: Any, arg: Any) -> None:
        try:
            impl.function(arg)
        except Exception as exc:
            info = self.plugins.get(impl.plugin_name, PluginInfo(impl.plugin_name, "?", "?"))
            self._fail(PluginInfo(info.name, info.package, info.version), f"{impl.function.__name__} raised: {exc}")

    # -- queries --------------------------------------------------------------------------------
    def lookup(self, name: str, package: str | None = None) -> MethodInfo:
        """The method called ``name`` (``package:name`` or ``package=`` picks among clashing claimants)."""
        if ":" in name:
            package, _, name = name.rpartition(":")
        key = name.lower()
        infos = self.claims.get(key, [])
        if package:
            picked = [m for m in infos if _norm(package) in (_norm(m.plugin.package), _norm(m.plugin.name))]
            if not picked:
                who = ", ".join(m.qualified for m in infos) or "no package"
                raise UnknownMethod(f"no method {key!r} from package {package!r}; it is provided by {who}")
            return picked[0]
        if len(infos) > 1:
            who = " and ".join(f"{m.plugin.package} (plugin {m.plugin.name})" for m in infos)
            raise PluginError(
                f"method {key!r} is registered by {who}; name one as {infos[0].qualified}, or block a plugin "
                f"with {BLOCK_ENV}={infos[-1].plugin.name}"
            )
        if not infos:
            known = ", ".join(sorted(self.claims)) or "none"
            hint = ""
            broken = [b for b in self.broken if b.error]
            if broken:
                hint = " (broken plugins: " + "; ".join(f"{b.name}: {b.error}" for b in broken) + ")"
            raise UnknownMethod(f"unknown method {name!r}; installed methods: {known}{hint}")
        return infos[0]

    def method_for_patch(self, name: str, package: str | None) -> EditMethod:
        """The method that attaches a patch made by ``name`` of ``package``: that package's claimant when
        it is installed, else the single claimant of the name (a clash without it is refused)."""
        infos = self.claims.get(name.lower(), [])
        picked = [m for m in infos if package and _norm(package) == _norm(m.plugin.package)]
        return (picked[0] if picked else self.lookup(name)).cls()

    def method_class(self, name: str, package: str | None = None) -> type[EditMethod]:
        return self.lookup(name, package).cls

    def method(self, name: str, package: str | None = None) -> EditMethod:
        return self.method_class(name, package)()

    def notify(self, hook: str, **kwargs: Any) -> None:
        """Call an observer hook (``patch_applied`` / ``patch_reverted``); observers' errors are logged."""
        self.load()
        try:
            getattr(self.pm.hook, hook)(**kwargs)
        except Exception:
            log.exception("observer hook %s raised", hook)


def _method_info(item: Any, plugin: PluginInfo) -> MethodInfo | str:
    """A registration as a :class:`MethodInfo`, or what is wrong with it."""
    if isinstance(item, MethodSpec):
        if ":" not in item.target or not item.name:
            return f"method spec {item!r} needs a name and a 'module:Class' target"
        return MethodInfo(item.name.lower(), plugin, spec=item)
    from .method import EditMethod

    if isinstance(item, type) and issubclass(item, EditMethod) and getattr(item, "name", None):
        return MethodInfo(item.name.lower(), plugin, _cls=item)
    return f"registered {item!r}, not an EditMethod subclass or a MethodSpec"


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


def plugin_of(cls: type) -> PluginInfo:
    """The plugin that provides method class ``cls``, as the process-wide registry knows it; for a class no
    plugin registered (a notebook, a test), the distribution its module belongs to."""
    target = f"{cls.__module__}:{cls.__qualname__}"
    for infos in get_registry().claims.values():
        for info in infos:
            if info._cls is cls or (info.spec is not None and info.spec.target == target):
                return info.plugin
    return _distribution_of(cls.__module__.split(".")[0])


@functools.cache
def _distribution_of(top_module: str) -> PluginInfo:
    dists = importlib.metadata.packages_distributions().get(top_module, [])
    if dists:
        return PluginInfo(top_module, dists[0], _version(dists[0]))
    return PluginInfo(top_module, top_module, "0")


def get_method(name: str) -> EditMethod:
    return get_registry().method(name)


def core_version() -> str:
    return _version("kedit-core")
