"""One registry for everything medplan finds by name: models, trainers, planners, importers.

A :class:`Registry` maps names to values under one set of rules:

* **names** follow :func:`medplan.names.check_name` (they become folder names and CLI words);
* **built-ins** are the modules listed for the registry, imported on the first lookup (so
  ``import medplan`` stays cheap), whose decorators register their values;
* **plug-ins** come from one entry-point group per registry, loaded once after the built-ins;
  a plug-in that fails to load (import error, bad object, refused name) is a warning naming
  it, and the rest of the registry keeps working;
* **one duplicate rule**: registering a name a second time is an error unless it is the very
  same object again (a module imported twice); in particular a plug-in can never replace a
  built-in;
* **unknown names** are a :class:`UnknownNameError` (a MedplanError and a KeyError) that
  lists the known names and suggests close ones ("did you mean ...?").

A registry is a read-only mapping (iteration in registration order), so a table such as the
importers' ``FORMATS`` can be one::

    PLANNERS = Registry("planner", group="medplan.planners", builtins=["medplan.planners.default"])

    @PLANNERS.register("default")
    def plan_default(fingerprint, **options): ...

    PLANNERS["default"]            # loads built-ins and plug-ins on first use
"""
from __future__ import annotations

import contextlib
import contextvars
import difflib
import fnmatch
import importlib
import importlib.metadata
import types
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterable, Iterator, TypeVar

from medplan.errors import MedplanError
from medplan.names import check_name

#: the source of everything medplan itself registers (plug-ins: their distribution's name)
BUILTIN = "medplan"

T = TypeVar("T")

# the plug-in being imported, if any: what it registers is attributed to it (shared by all
# registries, since one plug-in package may add, say, a model and its trainer)
_loading_source: contextvars.ContextVar[str | None] = contextvars.ContextVar("medplan_plugin_source", default=None)


class RegistryError(MedplanError):
    """A refused registration: a name registered twice, or a plug-in replacing a built-in."""


class UnknownNameError(MedplanError, KeyError):
    """A name no registry entry has; the message lists the known names and close ones."""

    __str__ = MedplanError.__str__  # not KeyError's repr() of the message


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered name: its value and where it came from (``medplan`` or a plug-in)."""

    name: str
    value: T
    source: str = BUILTIN

    @property
    def builtin(self) -> bool:
        return self.source == BUILTIN


def _identity(value: Any) -> Any:
    return value


class Registry(Mapping[str, T]):
    """Names -> values of one kind, with lazy built-ins, entry-point plug-ins and one duplicate rule.

    ``kind`` names the values in messages ("architecture", "trainer"); ``group`` is the
    entry-point group of the plug-ins; ``builtins`` are module names (or a function returning
    them) imported on the first lookup. ``identity`` says what "the very same object" means
    (e.g. the builder function of a model entry). ``from_plugin(name, obj)`` turns what an
    entry point loads into a value (raise TypeError for a wrong object); an entry point that
    names a module registers by importing it. ``check(name, value)`` may refuse a
    registration (raise MedplanError or TypeError); ``hint()`` adds a note to unknown-name
    errors.
    """

    def __init__(self, kind: str, *, group: str | None = None,
                 builtins: Iterable[str] | Callable[[], Iterable[str]] = (),
                 identity: Callable[[T], Any] = _identity,
                 from_plugin: Callable[[str, Any], T] | None = None,
                 check: Callable[[str, T], None] | None = None,
                 hint: Callable[[], str] | None = None):
        self.kind, self.group = kind, group
        self._builtins = builtins if callable(builtins) else tuple(builtins)
        self._identity, self._from_plugin, self._check, self._hint = identity, from_plugin, check, hint
        self._entries: dict[str, Entry[T]] = {}
        self._builtins_loaded = False
        self._plugins_loaded = False
        #: built-in modules that failed to import -> the reason (shown in unknown-name errors)
        self.failures: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, group={self.group!r}, {len(self._entries)} entries)"

    # ------------------------------------------------------------------ registering
    def add(self, name: str, value: T) -> bool:
        """Register ``value`` under ``name``; False if that very object is already registered there.

        Raises :class:`RegistryError` for a second, different registration of a name (a
        plug-in's attempt to replace a built-in included) and whatever ``check`` raises."""
        check_name(name, f"{self.kind} name")
        if self._check is not None:
            self._check(name, value)
        module = getattr(self._identity(value), "__module__", None) or ""
        # medplan's own objects are built-ins even when a plug-in's import is what imported them
        source = BUILTIN if module.split(".")[0] == BUILTIN else (_loading_source.get() or BUILTIN)
        old = self._entries.get(name)
        if old is not None:
            if self._identity(old.value) is self._identity(value):
                return False
            if old.builtin and source != BUILTIN:
                raise RegistryError(f"plug-in {source!r} tries to register {self.kind} {name!r}, which is a built-in "
                                    f"medplan {self.kind}; a plug-in cannot replace a built-in")
            raise RegistryError(f"{self.kind} {name!r} is already registered (from {old.source}); a second "
                                f"registration of the same name is an error (pick another name)")
        self._entries[name] = Entry(name, value, source)
        return True

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator registering the decorated object under ``name`` (default: its ``__name__``)."""

        def wrap(obj: T) -> T:
            self.add(name or getattr(obj, "__name__", ""), obj)
            return obj

        return wrap

    # ------------------------------------------------------------------ loading
    def _import_builtins(self) -> None:
        if self._builtins_loaded:
            return
        self._builtins_loaded = True  # first: the modules register while we iterate
        modules = self._builtins() if callable(self._builtins) else self._builtins
        for module in modules:
            try:
                importlib.import_module(module)
            except Exception as exc:  # an optional dependency missing must not hide the other entries
                self.failures[module] = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"{self.kind} module {module} failed to import: {exc}", RuntimeWarning, stacklevel=3)

    def _entry_points(self) -> list[importlib.metadata.EntryPoint]:
        if self.group is None:
            return []
        return list(importlib.metadata.entry_points(group=self.group))

    def _load_plugin(self, ep: importlib.metadata.EntryPoint) -> None:
        dist = getattr(ep, "dist", None)
        source = dist.name if dist is not None and getattr(dist, "name", None) else f"entry point {ep.name}"
        token = _loading_source.set(source)
        before = set(self._entries)
        try:
            obj = ep.load()
            if isinstance(obj, types.ModuleType):
                return  # registered itself on import
            value = obj if self._from_plugin is None else self._from_plugin(ep.name, obj)
            new = [e for n, e in self._entries.items() if n not in before]
            if any(self._identity(e.value) is self._identity(value) for e in new):
                return  # a decorated object that registered itself on import (perhaps under another name)
            self.add(ep.name, value)
        finally:
            _loading_source.reset(token)

    def load_plugins(self, reload: bool = False) -> list[str]:
        """Import the built-ins, then load the entry points (once); returns the names plug-ins added."""
        self._import_builtins()
        if self._plugins_loaded and not reload:
            return []
        self._plugins_loaded = True
        before = set(self._entries)
        try:
            eps = self._entry_points()
        except Exception as exc:  # a broken environment must not break the built-ins
            warnings.warn(f"cannot list the {self.group} entry points: {exc}", RuntimeWarning, stacklevel=2)
            return []
        for ep in eps:
            try:
                self._load_plugin(ep)
            except Exception as exc:  # one bad plug-in must not break medplan
                warnings.warn(f"{self.kind} plug-in {ep.name!r} ({ep.value}) failed to load and is skipped: "
                              f"{type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=2)
        return [n for n in self._entries if n not in before]

    def _ensure_loaded(self) -> None:
        self._import_builtins()
        if not self._plugins_loaded:
            self.load_plugins()

    @contextlib.contextmanager
    def sandbox(self) -> Iterator["Registry[T]"]:
        """For tests: built-ins loaded, plug-ins not yet (the next lookup loads the entry points, e.g.
        faked ones); every registration made inside is undone on exit."""
        self._import_builtins()
        saved = (dict(self._entries), self._plugins_loaded, dict(self.failures))
        self._plugins_loaded = False
        try:
            yield self
        finally:
            self._entries, self._plugins_loaded, self.failures = saved[0], saved[1], saved[2]

    # ------------------------------------------------------------------ looking up
    def suggest(self, name: object) -> str:
        """`` (did you mean a, b?)`` for names close to ``name``, else ``""``."""
        self._ensure_loaded()
        close = difflib.get_close_matches(str(name), list(self._entries), n=3)
        return f" (did you mean {', '.join(close)}?)" if close else ""

    def unknown(self, name: object) -> UnknownNameError:
        """The error for a name this registry does not hold."""
        known = ", ".join(sorted(self._entries)) or "none"
        failed = ("; modules that failed to import: " + ", ".join(f"{m} ({r})" for m, r in sorted(self.failures.items()))
                  if self.failures else "")
        extra = self._hint() if self._hint is not None else ""
        return UnknownNameError(f"unknown {self.kind} {name!r}{self.suggest(name)}; known: {known}{failed}{extra}")

    def entry(self, name: str) -> Entry[T]:
        """The entry for ``name`` (value and source); an unknown name is an :class:`UnknownNameError`."""
        self._ensure_loaded()
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise self.unknown(name) from None

    def __getitem__(self, name: str) -> T:
        return self.entry(name).value

    def __contains__(self, name: object) -> bool:
        self._ensure_loaded()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        self._ensure_loaded()
        return iter(list(self._entries))

    def __len__(self) -> int:
        self._ensure_loaded()
        return len(self._entries)

    def names(self, pattern: str | None = None) -> list[str]:
        """Sorted names, optionally filtered by a glob pattern."""
        names = sorted(self)
        return [n for n in names if fnmatch.fnmatchcase(n, pattern)] if pattern else names

    def entries(self) -> list[Entry[T]]:
        """Every entry, in registration order."""
        self._ensure_loaded()
        return list(self._entries.values())


__all__ = ["BUILTIN", "Entry", "Registry", "RegistryError", "UnknownNameError"]
