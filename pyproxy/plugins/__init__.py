"""Plugins: code that runs in a session's access phase and log phase, like Kong's stream plugins.

A plugin is a small class registered under its `name`:

    @register
    class Greeter(Plugin):
        name = "greeter"
        priority = 500                      # higher runs first (Kong's PRIORITY)

        @classmethod
        def check(cls, config):             # at load and `pyproxy -t`: [(key, problem), ...]
            return [] if isinstance(config.get("word", ""), str) else [("word", "expected a string")]

        def access(self, session):          # after routing, before the upstream is chosen:
            return None                     # None lets the session go on; a status (403, 503) refuses it
                                            # (PENDING: the verdict comes later, see resume_access)

        def log(self, session):             # when the session has ended (every session the chain saw)
            ...

The built-ins register when this package is imported. A module that `plugin_modules` names is
imported afresh by each load of the configuration (`load_plugin_module`) and registers into that
configuration's own table (`Config.plugin_types`), not into `REGISTRY`: a reload runs the module's
current code, and loading a configuration changes nothing for the next one.

A plugin configured on a route wins over the same plugin on the route's service, which wins over
a global one (Kong's precedence). Instances live in a worker for one configuration generation;
`context` gives them the error log and the state shared across workers (`pyproxy.shared`).
See docs/plugins.md for the whole guide.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyproxy.config.model import Config, Route
    from pyproxy.session import Session
    from pyproxy.shared import SharedState

# The plugins registered by modules imported the usual way: the built-ins (and what a program that
# embeds pyproxy imports itself). Every configuration may name them.
REGISTRY: dict[str, type[Plugin]] = {}
# Where `register` puts a class while load_plugin_module imports a module; None: into REGISTRY.
_loading: ContextVar[dict[str, type[Plugin]] | None] = ContextVar("_loading", default=None)
# What `access` returns when it has asked something it will be answered later (Redis): the session
# waits, in no phase that reads, until the plugin calls `session.resume_access(plugin, status)`.
PENDING = -1
# A plugin's `config`: the plain data (dicts, lists, strings, numbers) its entry holds; each plugin
# says in `check` what it takes.
PluginConfig = dict[str, Any]


class Plugin:
    """Base class of every plugin; subclasses override what they need."""

    name = ""
    priority = 0
    scope = ""            # set by PluginChains: "route:NAME", "service:NAME" or "global"

    @classmethod
    def check(cls, config: PluginConfig) -> list[tuple[str, str]]:
        """Problems with `config` as (key path inside `config`, message); empty when it is fine."""
        return []

    def __init__(self, config: PluginConfig, context: PluginContext):
        self.config = config
        self.context = context

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Keep plugins written for the hook's first name working. It was `preread`, although it
        runs in nginx's access phase (after routing and, for TLS, after the handshake), not in the
        preread phase that reads the ClientHello. Whichever name a class defines, the other is the
        same function, so the session calls `access` and `super().preread(...)` still reaches a
        parent's `access`. Settled when the class is made: nothing is added per session."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__
        if "preread" in own and "access" not in own:
            warnings.warn(f"plugin class {cls.__qualname__}: preread() is deprecated, name it access()",
                          DeprecationWarning, stacklevel=2)
            # A method replaced on purpose: the function written under the old name is the hook.
            cls.access = own["preread"]     # type: ignore[method-assign]
        elif "access" in own and "preread" not in own:
            cls.preread = own["access"]

    def access(self, session: Session) -> int | None:
        """The access phase, after routing: None lets the session go on, a status refuses it."""
        return None

    preread = access                        # deprecated name of access (see __init_subclass__)

    def log(self, session: Session) -> None:
        return None

    def reopen(self) -> None:
        """USR1: reopen files the plugin writes (logrotate)."""
        return None

    def close(self) -> None:
        """The worker is done with this instance (shutdown, or a drained generation)."""
        return None


def unknown_keys(config: PluginConfig, allowed: tuple[str, ...]) -> list[tuple[str, str]]:
    """The problem list entries for keys a plugin does not take (a helper for `check`)."""
    return [(key, f"unknown key; expected one of {', '.join(allowed)}")
            for key in config if key not in allowed]


def register(cls: type[Plugin]) -> type[Plugin]:
    """Class decorator: make a plugin class known by its `name`. In a module that `plugin_modules`
    names, for the configuration being loaded; in a module imported the usual way, for all of them."""
    loading = _loading.get()
    (REGISTRY if loading is None else loading)[cls.name] = cls
    return cls


def load_plugin_module(name: str, folder: str) -> dict[str, type[Plugin]]:
    """Import the module `name` afresh and return the plugins it registers.

    `folder` (the configuration's) is on the import path, after its own entries, while the module is
    imported. Then sys.path is as it was, and the module is forgotten again, with every module it
    imported from `folder`: the next load reads their files again, so a reload runs the code they
    hold then. Modules from elsewhere that it imported (installed libraries) stay imported. No
    bytecode is written beside the configuration (a cached one could outlive an edit made within
    the same second). Raises whatever importing the module raises.
    """
    registered: dict[str, type[Plugin]] = {}
    path, modules, dont_write_bytecode = list(sys.path), dict(sys.modules), sys.dont_write_bytecode
    loading = _loading.set(registered)
    try:
        sys.path.append(folder)
        sys.dont_write_bytecode = True
        sys.modules.pop(name, None)
        importlib.invalidate_caches()
        importlib.import_module(name)
    finally:
        _loading.reset(loading)
        sys.path[:] = path
        sys.dont_write_bytecode = dont_write_bytecode
        for key in set(sys.modules) - set(modules):
            if key == name or _inside(getattr(sys.modules[key], "__file__", None), folder):
                del sys.modules[key]
        if name in modules:
            sys.modules[name] = modules[name]
    return registered


def _inside(path: str | None, folder: str) -> bool:
    return path is not None and os.path.abspath(path).startswith(os.path.join(folder, ""))


@dataclass
class PluginContext:
    """What a plugin may use: the worker's error log (`log(level, message)`), the state shared by
    all workers (`pyproxy.shared.SharedState`) and the config file's folder (for relative paths)."""

    log: Callable[[str, str], None]
    shared: SharedState
    base: str = ""


def plain(value: object) -> Any:
    """The loader stores plugin config as sorted (key, value) tuples; give plugins dicts and lists."""
    if isinstance(value, tuple) and all(isinstance(i, tuple) and len(i) == 2 and isinstance(i[0], str)
                                        for i in value) and value:
        return {k: plain(v) for k, v in value}
    if isinstance(value, tuple):
        return [plain(v) for v in value]
    return value


class PluginChains:
    """For each route, the plugin instances that apply to it, highest priority first."""

    def __init__(self, config: Config, context: PluginContext):
        self.instances: list[Plugin] = []
        global_: dict[str, Plugin] = {}
        by_service: dict[str, dict[str, Plugin]] = {}
        by_route: dict[str, dict[str, Plugin]] = {}
        for entry in config.plugins:
            cls = config.plugin_types[entry.name]
            instance = cls(plain(entry.config) or {}, context)
            # Where the entry applies: shared counters are keyed by it, so two limit-conn entries
            # on two routes keep two budgets, and a reload that keeps the entry keeps its counts.
            instance.scope = (f"route:{entry.route}" if entry.route is not None else
                              f"service:{entry.service}" if entry.service is not None else "global")
            self.instances.append(instance)
            if entry.route is not None:
                by_route.setdefault(entry.route, {})[entry.name] = instance
            elif entry.service is not None:
                by_service.setdefault(entry.service, {})[entry.name] = instance
            else:
                global_[entry.name] = instance
        self.global_chain = _ordered(global_)
        self.chains: dict[str, tuple[Plugin, ...]] = {}
        for route in config.routes:
            merged = dict(global_)
            merged.update(by_service.get(route.service, {}))
            merged.update(by_route.get(route.name, {}))
            self.chains[route.name] = _ordered(merged)

    def for_route(self, route: Route | None) -> tuple[Plugin, ...]:
        """The chain of a route, or the global chain for a session that matched no route."""
        if route is None:
            return self.global_chain
        return self.chains.get(route.name, ())

    def reopen(self) -> None:
        for instance in self.instances:
            instance.reopen()

    def close(self) -> None:
        for instance in self.instances:
            instance.close()


def _ordered(by_name: dict[str, Plugin]) -> tuple[Plugin, ...]:
    return tuple(sorted(by_name.values(), key=lambda p: (-p.priority, p.name)))


# Built-in plugins register themselves on import.
from pyproxy.plugins import file_log, ip_restriction, limits  # noqa: E402,F401
