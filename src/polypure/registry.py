"""Name-to-implementation registries, extensible through Python entry points.

A registry maps the names used in configs (``kmeans``, ``clip``, ``efficientnet_lite0``) to the code
behind them. Built-ins register with a decorator; installed packages add entries through the entry-point
group of the registry (for example ``polypure.clusterers``), which is read the first time a name is looked
up that is not built in.

Example
-------
>>> from polypure.registry import Registry
>>> SHAPES = Registry("shape")
>>> @SHAPES.register("square")
... def square(side):
...     return side * side
>>> SHAPES.get("square")(3)
9
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterator
from importlib import import_module
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from polypure.config.paths import require_file
from polypure.errors import ConfigError


class Registry:
    """A mapping from names to objects, filled by decorators and entry points.

    Parameters
    ----------
    kind : str
        What the registry holds, used in error messages ("clusterer", "evaluator", ...).
    group : str, optional
        Entry-point group scanned for plugins, e.g. ``"polypure.clusterers"``.
    """

    def __init__(self, kind: str, group: str | None = None):
        self.kind = kind
        self.group = group
        self._entries: dict[str, Any] = {}
        self._plugins_loaded = group is None

    def register(self, name: str, obj: Any = None) -> Callable[[Any], Any] | Any:
        """Register ``obj`` under ``name``; without ``obj``, return a decorator that does so.

        Parameters
        ----------
        name : str
            The name configs use.
        obj : object, optional
            The implementation. When omitted, ``register`` works as a decorator.

        Returns
        -------
        object or callable
            ``obj`` itself, or the decorator.
        """
        if obj is None:
            def decorator(target):
                self._entries[name] = target
                return target
            return decorator
        self._entries[name] = obj
        return obj

    def register_lazy(self, name: str, target: str) -> None:
        """Register ``"module:attribute"``, imported on first use (keeps start-up light)."""
        self._entries[name] = _Lazy(target)

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for entry in entry_points(group=self.group):
            # built-ins win over plugins of the same name, so a plugin cannot silently replace them
            if entry.name in self._entries:
                continue
            try:
                self._entries[entry.name] = entry.load()
            except Exception as exc:  # a broken plugin must not take the built-ins down with it
                self._entries[entry.name] = _BrokenPlugin(self.kind, entry.name, entry.value, exc)

    def get(self, name: str) -> Any:
        """Return the object registered under ``name``.

        Raises
        ------
        ConfigError
            If no built-in or plugin of that name exists, listing the names that do.
        """
        if name not in self._entries:
            self._load_plugins()
        if name not in self._entries:
            known = ", ".join(sorted(self.names())) or "none"
            raise ConfigError(f"unknown {self.kind} {name!r}; known: {known}")
        obj = self._entries[name]
        if isinstance(obj, _Lazy):
            obj = self._entries[name] = obj.load()
        if isinstance(obj, _BrokenPlugin):
            obj.fail()
        return obj

    def names(self) -> list[str]:
        """All registered names, plugins included (broken ones too: see :meth:`broken`)."""
        self._load_plugins()
        return sorted(self._entries)

    def broken(self) -> dict[str, str]:
        """Plugins whose entry point failed to import, by name, with why.

        Such a name fails with that message only when it is used; every other name works all the same.

        Returns
        -------
        dict of str to str
            Name to one-line message (``clusterer plugin 'x' (module:attr) failed to load: ...``).
        """
        self._load_plugins()
        return {name: obj.message for name, obj in self._entries.items() if isinstance(obj, _BrokenPlugin)}

    def __contains__(self, name: str) -> bool:
        if name not in self._entries:
            self._load_plugins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def import_factory(spec: str, key: str) -> Callable[..., Any]:
    """Import ``MODULE:FACTORY`` where MODULE is a dotted module name or a ``.py`` file path."""
    module_name, _, attr = spec.rpartition(":")
    if module_name.endswith(".py"):
        # a folder named x.py, /dev/null or a FIFO is refused before Python is asked to run it
        require_file(module_name, f"{key}: file")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).resolve()
            name = f"polypure_user_{path.stem}_{abs(hash(str(path)))}"
            if name in sys.modules:
                module = sys.modules[name]
            else:
                loader_spec = importlib.util.spec_from_file_location(name, path)
                if loader_spec is None or loader_spec.loader is None:
                    raise ImportError(f"cannot load {path}")
                module = importlib.util.module_from_spec(loader_spec)
                sys.modules[name] = module
                loader_spec.loader.exec_module(module)
        else:
            module = import_module(module_name)
    except FileNotFoundError:
        raise ConfigError(f"{key}: file {module_name!r} does not exist") from None
    except ImportError as exc:
        raise ConfigError(f"{key}: cannot import {module_name!r}: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"{key}: {module_name!r} has no class or function {attr!r}")
    return factory


class _BrokenPlugin:
    """Stands in for an entry point that failed to import, and reports it when used."""

    def __init__(self, kind: str, name: str, target: str, exc: Exception):
        # one line: an import error's text can run to several (a SyntaxError's caret, a chained cause)
        first = str(exc).splitlines()[0] if str(exc) else ""
        self.message = f"{kind} plugin {name!r} ({target}) failed to load: {type(exc).__name__}: {first}"

    def fail(self):
        raise ConfigError(self.message)


class _Lazy:
    """A registry entry imported on first use."""

    def __init__(self, target: str):
        self.target = target

    def load(self):
        module, _, attr = self.target.partition(":")
        return getattr(import_module(module), attr)
