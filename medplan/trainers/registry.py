"""Trainers found by name: ``medplan_train DATASET ARCH FOLD`` runs the trainer registered for
ARCH, or the base trainer when the architecture needs nothing special.

A trainer exists only for a real change of the training recipe (nnU-Net's deep-supervision
loss, SyncSAM's prompts and loss, Swin-UMamba's frozen warm-up, SegNeXt in fp32); model facts
(weights, internal size, parameter groups) live in the model card. A trainer is registered for
an architecture name, which must be a registered architecture; asking for the trainer of an
unknown architecture is an error that suggests close names, never a silent base trainer.

Third-party packages register trainers through the entry-point group ``medplan.trainers``::

    [project.entry-points."medplan.trainers"]
    my_arch = "my_package.trainer:MyArchTrainer"

The entry-point name is the architecture name; the object is a Trainer subclass. The rules of
:class:`medplan.registry.Registry` apply (one registration per name, plug-ins never replace
built-ins, a broken plug-in is a warning).
"""
from __future__ import annotations

from typing import Any, Callable, TypeVar

from medplan.architectures import MODELS
from medplan.errors import MedplanError
from medplan.registry import Registry
from medplan.trainers.base import Trainer

ENTRY_POINT_GROUP = "medplan.trainers"
#: the per-architecture trainers of medplan (imported on the first lookup)
BUILTIN_MODULES = ("medplan.trainers.nnunet", "medplan.trainers.nnunetv2", "medplan.trainers.segnext",
                   "medplan.trainers.swin_umamba", "medplan.trainers.syncsam")

T = TypeVar("T", bound=type)


def _check(name: str, cls: Any) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Trainer)):
        raise TypeError(f"register_trainer({name!r}) expects a Trainer subclass, got {cls!r}")
    if name not in MODELS:
        raise MedplanError(f"trainer {cls.__qualname__} is registered for {name!r}, which is not a registered "
                           f"architecture{MODELS.suggest(name)}")


#: architecture name -> its Trainer subclass
TRAINERS: Registry[type] = Registry("trainer", group=ENTRY_POINT_GROUP, builtins=BUILTIN_MODULES, check=_check)


def register_trainer(name: str) -> Callable[[T], T]:
    """Class decorator: ``@register_trainer("swin_umamba")`` makes the class the trainer for that architecture."""
    return TRAINERS.register(name)


def list_trainers() -> dict[str, str]:
    """Registered trainer names -> class names (the base trainer serves every other architecture)."""
    return {name: TRAINERS[name].__qualname__ for name in TRAINERS.names()}


def get_trainer(arch: str) -> type[Trainer]:
    """The trainer class registered for ``arch``, else the base :class:`Trainer`; an unknown
    architecture is a MedplanError suggesting close names."""
    if arch in TRAINERS:
        return TRAINERS[arch]
    MODELS.entry(arch)  # unknown architecture: the registry's error ("did you mean ...?")
    return Trainer
