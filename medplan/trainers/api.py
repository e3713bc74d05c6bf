"""The library calls of training: :func:`prepare` checks everything a run needs and builds its
trainer, :func:`train` runs it (both re-exported by :mod:`medplan.trainers`).

The plan and splits are read through :mod:`medplan.stagefiles` (checked against each other and
cases.csv before any folder exists).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from medplan.architectures import get_entry, is_model
from medplan.errors import MedplanError
from medplan.io import read_json
from medplan.names import check_name
from medplan.paths import results_dir
from medplan.plan import Plan
from medplan.rundir import LR_SEARCH_SUMMARY, RunDir
from medplan.stagefiles import load_plan, load_splits
from medplan.trainers.base import Trainer, TrainSettings
from medplan.trainers.registry import get_trainer

__all__ = ["default_model_options", "prepare", "resolve_fold", "resolve_lr", "run_dir", "train"]


def resolve_fold(fold: int | str, splits: list[dict]) -> int | str:
    """``0``..``n-1`` or ``"all"`` (train on every kept case, no validation)."""
    if isinstance(fold, str) and fold.strip().lower() == "all":
        return "all"
    try:
        k = int(fold)
    except (TypeError, ValueError):
        raise MedplanError(f"fold must be an integer 0..{len(splits) - 1} or 'all', got {fold!r}") from None
    if not 0 <= k < len(splits):
        raise MedplanError(f"fold {k} is out of range: splits.json has {len(splits)} folds (0..{len(splits) - 1})")
    return k


def run_dir(dataset: str, arch: str, fold: int | str, *, stage: str = "cv", lr: float | None = None) -> Path:
    """``ARCH/fold_K`` for cross-validation, ``ARCH/lr_search/lr_1e-04/fold_K`` for the LR search
    (:meth:`medplan.rundir.RunDir.of`)."""
    return RunDir.of(dataset, arch, fold, stage=stage, lr=lr).path


def resolve_lr(dataset: str, arch: str, plan: Plan, lr: float | None) -> tuple[float, str]:
    """``--lr`` > ``ARCH/lr_search.json["best_lr"]`` > ``plan.lr``, with where it came from."""
    if lr is not None:
        return float(lr), "command line"
    search = results_dir(dataset, arch) / LR_SEARCH_SUMMARY
    if search.is_file():
        data = read_json(search)
        best = data.get("best_lr") if isinstance(data, dict) else None
        if best is not None:
            if isinstance(best, bool) or not isinstance(best, (int, float)) or not 0 < best < float("inf"):
                raise MedplanError(f"'best_lr' must be a positive number, got {best!r}", search)
            return float(best), str(search)
    return float(plan.lr), "plan"


def default_model_options(arch: str, model_options: dict[str, Any] | None) -> dict[str, Any]:
    """ImageNet weights for every model that has them unless the run says otherwise: the
    paper fine-tunes pretrained encoders (``--no-pretrained`` is an explicit, recorded choice)."""
    options = dict(model_options or {})
    if "pretrained" not in options and is_model(arch) and get_entry(arch).pretrained:
        options["pretrained"] = True
    return options


def prepare(dataset: str, arch: str, fold: int | str, *, overrides: dict[str, Any] | None = None,
            model_options: dict[str, Any] | None = None, output_dir: Path | None = None) -> Trainer:
    """Check everything a run needs (plan, splits, fold, architecture, settings) and build its
    trainer, without touching the results folder; bad input is a MedplanError naming it."""
    check_name(dataset, "dataset name")
    check_name(arch, "architecture name")
    settings = TrainSettings.from_overrides(overrides)
    plan = load_plan(dataset)
    splits = load_splits(dataset, plan)  # checked against the plan and cases.csv before any folder exists
    fold = resolve_fold(fold, splits)
    trainer_cls = get_trainer(arch)
    trainer_cls.check_architecture(arch)
    if settings.stage == "lr_search" and settings.lr is None:
        raise MedplanError("--stage lr_search needs --lr (or use medplan_tune)")
    lr, source = resolve_lr(dataset, arch, plan, settings.lr)
    model_options = default_model_options(arch, model_options)
    out = Path(output_dir) if output_dir is not None else run_dir(dataset, arch, fold, stage=settings.stage, lr=lr)
    return trainer_cls(dataset, arch, fold, plan=plan, splits=splits, output_dir=out, settings=settings,
                       model_options=model_options, lr=lr, lr_source=source)


def train(dataset: str, arch: str, fold: int | str, *, continue_training: bool = False,
          overrides: dict[str, Any] | None = None, model_options: dict[str, Any] | None = None,
          output_dir: Path | None = None) -> Path:
    """Train one fold of one architecture on a preprocessed dataset; returns the fold folder.

    ``overrides`` holds :class:`TrainSettings` fields (lr, epochs, batch_size, device, amp,
    seed, deterministic, num_workers, stage, force, ...); ``model_options`` go to the model builder.
    """
    trainer = prepare(dataset, arch, fold, overrides=overrides, model_options=model_options, output_dir=output_dir)
    return trainer.run(continue_training)
