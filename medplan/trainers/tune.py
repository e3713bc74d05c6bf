"""LR search, as in the paper: each LR of the plan's grid trains on fold 0 for the LR-search
budget; the one with the best validation mIoU becomes the LR of the cross-validation folds.

Runs go to ``ARCH/lr_search/lr_1e-04/fold_0/`` (never clashing with ``ARCH/fold_K``); the
decision goes to ``ARCH/lr_search.json``. A rerun skips finished LR runs and resumes
unfinished ones, so an interrupted search costs at most one epoch.
"""
from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import Any, Sequence

from medplan.errors import MedplanError
from medplan.io import atomic_write_json
from medplan.paths import results_dir
from medplan.rundir import LR_SEARCH, LR_SEARCH_SUMMARY, RunDir, lr_tag
from medplan.stagefiles import load_plan
from medplan.trainers.api import train


def best_val_miou(fold_dir: Path) -> float:
    """Best per-epoch validation mIoU of a finished run (from its metrics.jsonl)."""
    run = RunDir(fold_dir)
    best = run.best_metric("val_mIoU")
    if best is None:
        raise MedplanError("no validation mIoU recorded", run.metrics_path)
    return best


def tune(dataset: str, arch: str, *, lrs: Sequence[float] | None = None, epochs: int | None = None,
         fold: int = 0, overrides: dict[str, Any] | None = None, model_options: dict[str, Any] | None = None,
         force: bool = False) -> dict:
    """Train every LR of the grid on ``fold``; write and return ``ARCH/lr_search.json``."""
    plan = load_plan(dataset)
    grid = [float(x) for x in (lrs if lrs else plan.lr_grid)]
    if any(x <= 0 for x in grid):
        raise MedplanError(f"learning rates must be positive, got {grid}")
    budget = int(epochs or plan.epochs.lr_search)
    overrides = {k: v for k, v in (overrides or {}).items() if k not in ("lr", "epochs", "stage", "force")}
    if fold == "all" or str(fold) == "all":
        raise MedplanError("the LR search needs a validation fold, not 'all'")
    results: dict[str, float] = {}
    runs: dict[str, str] = {}
    for lr in grid:
        run = RunDir.of(dataset, arch, fold, stage=LR_SEARCH, lr=lr)
        out = run.path
        recorded = run.config().get("epochs") if not force else None
        if recorded not in (None, budget):
            raise MedplanError(f"holds an LR-search run of {recorded} epochs, not {budget}; "
                               "use --force to redo it", out)
        train(dataset, arch, fold, continue_training=True, model_options=model_options, output_dir=out,
              overrides={**overrides, "lr": lr, "epochs": budget, "stage": "lr_search", "force": force})
        results[lr_tag(lr)] = best_val_miou(out)
        runs[lr_tag(lr)] = str(out)
    best_key = max(results, key=lambda k: results[k])  # ties: the first in grid order
    summary = {
        "dataset": dataset, "arch": arch, "grid": grid, "epochs": budget, "fold": fold,
        "monitor": "val_mIoU", "results": results, "runs": runs,
        "best_lr": grid[list(results).index(best_key)], "best_val_mIoU": results[best_key],
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    path = results_dir(dataset, arch) / LR_SEARCH_SUMMARY
    if int(os.environ.get("RANK", "0")) == 0:
        atomic_write_json(path, summary)
    return summary
