"""Trainers found by name: ``medplan_train DATASET ARCH FOLD`` runs the trainer registered for
ARCH, or the base trainer when the architecture needs nothing special.

Third-party packages register trainers through the entry-point group ``medplan.trainers``::

    [project.entry-points."medplan.trainers"]
    my_arch = "my_package.trainer:MyArchTrainer"

The entry-point name is the architecture (or trainer) name; the object is a Trainer subclass.
"""
from __future__ import annotations

from importlib.metadata import entry_points
from typing import Callable, TypeVar

from medplan.errors import MedplanError

ENTRY_POINT_GROUP = "medplan.trainers"

_TRAINERS: dict[str, type] = {}
_entry_points_loaded = False

T = TypeVar("T", bound=type)


def register_trainer(name: str) -> Callable[[T], T]:
    """Class decorator: ``@register_trainer("hiformer")`` makes the class the trainer for that name."""

    def wrap(cls: T) -> T:
        from medplan.trainers.base import Trainer

        if not (isinstance(cls, type) and issubclass(cls, Trainer)):
            raise TypeError(f"register_trainer({name!r}) expects a Trainer subclass, got {cls!r}")
        existing = _TRAINERS.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"a trainer is already registered for {name!r}: {existing.__qualname__}")
        _TRAINERS[name] = cls
        return cls

    return wrap


def _load_entry_points() -> None:
    """Import the built-in per-architecture trainer modules of this package, then plug-ins."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    import importlib
    import pkgutil

    import medplan.trainers as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            try:
                importlib.import_module(f"medplan.trainers.{info.name}")
            except Exception as exc:  # an optional dependency missing must not hide the other trainers
                import warnings

                warnings.warn(f"trainer module medplan.trainers.{info.name} failed to import: {exc}",
                              RuntimeWarning, stacklevel=2)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _TRAINERS:
            continue
        try:
            cls = ep.load()
        except Exception as exc:
            raise MedplanError(f"cannot load trainer entry point {ep.name!r} ({ep.value}): {exc}") from None
        register_trainer(ep.name)(cls)


def list_trainers() -> dict[str, str]:
    """Registered trainer names -> class names (the base trainer serves every other architecture)."""
    _load_entry_points()
    return {name: cls.__qualname__ for name, cls in sorted(_TRAINERS.items())}


def get_trainer(arch: str) -> type:
    """The trainer class registered for ``arch``, else the base :class:`Trainer`."""
    _load_entry_points()
    if arch in _TRAINERS:
        return _TRAINERS[arch]
    from medplan.trainers.base import Trainer

    return Trainer
