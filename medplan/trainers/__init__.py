"""Training: the paper's shared protocol (:class:`Trainer`) and per-architecture trainers.

Library API (the CLI is a thin layer over it)::

    from medplan.trainers import train, tune
    fold_dir = train("CAMUS", "unet", 0, overrides={"epochs": 5, "device": "cpu"})
    search = tune("CAMUS", "unet")          # LR grid on fold 0 -> ARCH/lr_search.json

A per-architecture trainer subclasses :class:`Trainer`, overrides a hook and registers with
``@register_trainer("arch_name")`` (or the ``medplan.trainers`` entry-point group).
"""
from __future__ import annotations

from medplan.trainers.api import default_model_options, prepare, resolve_fold, resolve_lr, run_dir, train
from medplan.trainers.base import DEFAULT_SEED, EarlyStopping, Trainer, TrainSettings, lr_tag
from medplan.trainers.registry import get_trainer, list_trainers, register_trainer

__all__ = ["train", "tune", "prepare", "Trainer", "TrainSettings", "EarlyStopping", "get_trainer", "register_trainer",
           "list_trainers", "resolve_fold", "resolve_lr", "run_dir", "lr_tag", "DEFAULT_SEED", "default_model_options"]

# binding the name after the submodule import keeps ``medplan.trainers.tune`` the function, not
# the module
from medplan.trainers.tune import tune  # noqa: E402
