"""A training run's folder: its layout, its state and its record, in one place.

A run lives in ``RESULTS/DATASET/ARCH/fold_K/`` (cross-validation) or
``RESULTS/DATASET/ARCH/lr_search/lr_1e-04/fold_K/`` (LR search)::

    config.json  training.log  metrics.jsonl  progress.png
    checkpoint_latest.pt  checkpoint_best.pt  checkpoint_final.pt
    validation/CASE.png  validation/summary.json
    .lock                                   (while a process trains it, :mod:`medplan.locks`)

Train, predict, evaluate, study and explain name these files through :class:`RunDir` only.
This module sits low (errors, io, locks, names, paths; no torch), so every stage can use it.
A run is *complete* when ``checkpoint_final.pt`` and ``validation/summary.json`` both exist
(a run without validation cases, fold ``all``, needs only the former); it is *interrupted*
when it got somewhere (:data:`STARTED_FILES`) without being complete.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from medplan.errors import MedplanError
from medplan.io import atomic_write_json, atomic_write_text, read_json, remove_stale_temporaries
from medplan.locks import LOCK_NAME, FileLock
from medplan.names import check_fold
from medplan.paths import results_dir

LATEST, BEST, FINAL = "checkpoint_latest.pt", "checkpoint_best.pt", "checkpoint_final.pt"
#: ``--checkpoint`` choices and their files
CHECKPOINTS = {"best": BEST, "final": FINAL, "latest": LATEST}
CONFIG, METRICS, PROGRESS, LOG = "config.json", "metrics.jsonl", "progress.png", "training.log"
VALIDATION, SUMMARY, LOCK = "validation", "summary.json", LOCK_NAME
FOLD_PREFIX = "fold_"
LR_SEARCH, LR_SEARCH_SUMMARY = "lr_search", "lr_search.json"
#: the files a run writes beside ``validation/``
RUN_FILES = (LATEST, BEST, FINAL, METRICS, PROGRESS, LOG, CONFIG)
#: files whose presence means a run was started and got somewhere (never deleted without --force)
STARTED_FILES = (LATEST, BEST, FINAL, METRICS, CONFIG)
#: what --continue keeps of a run killed before its first checkpoint (restarted with these settings)
RECORDED_SETTINGS = ("lr", "epochs", "batch_size", "seed", "model_options")


# ----------------------------------------------------------------------------- names
def lr_tag(lr: float) -> str:
    """``1e-04``, ``5e-05``, ``2.5e-05``: a folder/key name that keeps every digit of the LR."""
    mantissa, exponent = f"{float(lr):.6e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{exponent}"


def fold_of(path: str | os.PathLike) -> str | None:
    """``"3"`` for ``.../fold_3``, ``"all"`` for ``fold_all``; None for a folder of another name."""
    name = Path(path).name
    return name[len(FOLD_PREFIX):] if name.startswith(FOLD_PREFIX) else None


def fold_sort_key(name: str) -> tuple[int, Any]:
    """Numbered folds in numeric order, then the others (``fold_all``) by name."""
    tail = fold_of(name) or name
    return (0, int(tail)) if tail.isdigit() else (1, tail)


def checkpoint_name(checkpoint: str) -> str:
    """``best``/``final``/``latest`` (or the file name itself) -> the checkpoint file name."""
    if checkpoint in CHECKPOINTS:
        return CHECKPOINTS[checkpoint]
    if checkpoint in CHECKPOINTS.values():
        return checkpoint
    raise MedplanError(f"--checkpoint must be one of {', '.join(CHECKPOINTS)}, got {checkpoint!r}")


# ----------------------------------------------------------------------------- metrics.jsonl
def _plain(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy and torch scalars
        return obj.item()
    raise TypeError(type(obj).__name__)


def write_metrics(history: list[dict], path: Path) -> None:
    """Rewrite metrics.jsonl from the full history (atomic, so it always matches a checkpoint
    or is one epoch ahead of it, never half a line)."""
    text = "".join(json.dumps(r, default=_plain) + "\n" for r in history)
    atomic_write_text(path, text)


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ----------------------------------------------------------------------------- the record
@dataclass(frozen=True)
class Provenance:
    """What config.json records of how a run was made (None / empty where it does not say)."""

    trainer: str | None = None
    created: str | None = None
    command_line: list[str] = field(default_factory=list)
    versions: dict[str, Any] = field(default_factory=dict)
    git_commit: str | None = None
    hostname: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] | None = None
    resumes: list[dict] = field(default_factory=list)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_SETTING_CHECKS = {
    "lr": lambda v: _is_number(v) and 0 < v < float("inf"),
    "epochs": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
    "batch_size": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
    "seed": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "model_options": lambda v: isinstance(v, dict),
}


# ----------------------------------------------------------------------------- the folder
@dataclass(frozen=True)
class RunDir:
    """One run's folder. Path-like (``os.fspath(run)``); names every file of the layout."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @classmethod
    def of(cls, dataset: str, arch: str, fold: int | str, *, stage: str = "cv", lr: float | None = None) -> "RunDir":
        """``ARCH/fold_K`` for cross-validation, ``ARCH/lr_search/lr_1e-04/fold_K`` for the LR search."""
        fold = check_fold(fold)
        if stage == LR_SEARCH:
            if lr is None:
                raise MedplanError("an LR-search run needs an explicit --lr")
            return cls(results_dir(dataset, arch) / LR_SEARCH / f"lr_{lr_tag(lr)}" / f"{FOLD_PREFIX}{fold}")
        return cls(results_dir(dataset, arch, fold))

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    # -- names
    @property
    def name(self) -> str:
        return self.path.name

    @property
    def fold(self) -> str | None:
        """The fold of a ``fold_K`` folder (``"0"``, ``"all"``), else None."""
        return fold_of(self.path)

    def file(self, name: str) -> Path:
        return self.path / name

    def checkpoint(self, which: str = "best") -> Path:
        """``best``/``final``/``latest`` (or a checkpoint file name) -> its path."""
        return self.path / checkpoint_name(which)

    latest = property(lambda self: self.path / LATEST)
    best = property(lambda self: self.path / BEST)
    final = property(lambda self: self.path / FINAL)
    config_path = property(lambda self: self.path / CONFIG)
    metrics_path = property(lambda self: self.path / METRICS)
    progress_path = property(lambda self: self.path / PROGRESS)
    log_path = property(lambda self: self.path / LOG)
    validation = property(lambda self: self.path / VALIDATION)
    summary_path = property(lambda self: self.path / VALIDATION / SUMMARY)
    lock_path = property(lambda self: self.path / LOCK)

    # -- state
    def validates(self) -> bool:
        """Whether the run has validation cases: not for fold ``all`` (or a config.json with ``n_val`` 0)."""
        if self.fold == "all":
            return False
        with contextlib.suppress(MedplanError, OSError):
            return self.config().get("n_val") != 0
        return True

    def is_complete(self, validates: bool | None = None) -> bool:
        """``checkpoint_final.pt`` and, for a run with validation cases, ``validation/summary.json``."""
        if not self.final.is_file():
            return False
        if validates is None:
            validates = self.validates()
        return not validates or self.summary_path.is_file()

    def is_started(self) -> bool:
        """A run got somewhere here (a checkpoint, metrics or config.json)."""
        return any(self.file(n).exists() for n in STARTED_FILES)

    def is_interrupted(self, validates: bool | None = None) -> bool:
        return self.is_started() and not self.is_complete(validates)

    def has_checkpoint(self, which: str = "best") -> bool:
        return self.checkpoint(which).is_file()

    def has_predictions(self) -> bool:
        """``validation/`` holds label maps (evaluation can recompute the metrics from them)."""
        return self.validation.is_dir() and any(p.suffix == ".png" for p in self.validation.iterdir())

    def present(self) -> set[str]:
        """The run's files (and ``validation``) that exist now."""
        return {n for n in (*RUN_FILES, VALIDATION) if self.file(n).exists()}

    # -- the record
    def config(self, required: bool = False) -> dict[str, Any]:
        """config.json; ``{}`` when there is none (an error if ``required``). Not an object: an error."""
        if not self.config_path.is_file():
            if required:
                raise MedplanError("no config.json (the run never started, or it was removed)", self.config_path)
            return {}
        cfg = read_json(self.config_path)
        if not isinstance(cfg, dict):
            raise MedplanError("not a run's config.json (expected a JSON object)", self.config_path)
        return cfg

    def plan(self) -> dict | None:
        """The plan the run was trained with (config.json), or None."""
        plan = self.config().get("plan")
        return plan if isinstance(plan, dict) else None

    def provenance(self) -> Provenance:
        cfg = self.config()
        plan = cfg.get("plan")
        return Provenance(trainer=cfg.get("trainer"), created=cfg.get("created"),
                          command_line=list(cfg.get("command_line") or []), versions=dict(cfg.get("versions") or {}),
                          git_commit=cfg.get("git_commit"), hostname=cfg.get("hostname"),
                          settings=dict(cfg.get("settings") or {}), plan=plan if isinstance(plan, dict) else None,
                          resumes=list(cfg.get("resumes") or []))

    def recorded_settings(self, dataset: str, arch: str, fold: int | str) -> dict[str, Any]:
        """The settings config.json recorded when the run started (checked: anyone may edit it),
        plus ``lr_source``; an error naming the file if it belongs to another run or is invalid."""
        again = "; start over with --force"
        cfg = read_json(self.config_path)
        if not isinstance(cfg, dict):
            raise MedplanError(f"not a run's config.json (expected a JSON object){again}", self.config_path)
        for key, mine in (("dataset", dataset), ("arch", arch), ("fold", fold)):
            if key in cfg and str(cfg[key]) != str(mine):
                raise MedplanError(f"records {key} {cfg[key]!r}, not {mine!r}{again}", self.config_path)
        recorded = {}
        for key in RECORDED_SETTINGS:
            if key not in cfg or not _SETTING_CHECKS[key](cfg[key]):
                raise MedplanError(f"{key} is {cfg.get(key)!r}, not a valid setting{again}", self.config_path)
            recorded[key] = cfg[key]
        recorded["lr_source"] = str(cfg.get("lr_source", CONFIG))
        return recorded

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_json(self.config_path, config)

    def record_resume(self, entry: dict[str, Any], fallback: Callable[[], dict[str, Any]]) -> None:
        """Append ``entry`` to config.json's ``resumes`` (``fallback()`` makes the config when there is none)."""
        cfg = read_json(self.config_path) if self.config_path.is_file() else fallback()
        cfg.setdefault("resumes", []).append(entry)
        atomic_write_json(self.config_path, cfg)

    def metrics(self) -> list[dict]:
        """metrics.jsonl, one dict per epoch (``[]`` when there is none)."""
        return read_metrics(self.metrics_path)

    def write_metrics(self, history: list[dict]) -> None:
        write_metrics(history, self.metrics_path)

    def best_metric(self, key: str = "val_mIoU") -> float | None:
        """The best (largest) per-epoch ``key`` in metrics.jsonl, None when none is recorded."""
        values = [r[key] for r in self.metrics() if r.get(key) is not None]
        return float(max(values)) if values else None

    def summary(self, required: bool = True) -> dict[str, Any] | None:
        """validation/summary.json (the best weights at original size); None or an error when absent."""
        if not self.summary_path.is_file():
            if required:
                raise MedplanError("fold has no validation results (train it to completion first)", self.summary_path)
            return None
        return read_json(self.summary_path)

    # -- writing and clearing
    def acquire(self, purpose: str) -> tuple[FileLock, list[Path]]:
        """Take the run's lock (creating the folder), then remove the temporaries a killed run
        left in it; returns the held lock and what was removed."""
        lock = FileLock(self.lock_path, purpose).acquire()
        try:
            removed = remove_stale_temporaries(self.path, recursive=True)
        except OSError as exc:
            lock.release()
            raise MedplanError(f"cannot remove the temporary files of an interrupted run "
                               f"({exc.strerror or exc})", exc.filename or self.path) from None
        return lock, removed

    def clear(self, keep: Iterable[str] = ()) -> None:
        """Delete the run's files (except ``keep``) and ``validation/``; the lock stays."""
        keep = set(keep)
        for name in RUN_FILES:
            if name not in keep and self.file(name).exists():
                self.file(name).unlink()
        shutil.rmtree(self.validation, ignore_errors=True)

    def remove_new(self, before: set[str]) -> None:
        """Delete the run's files (and ``validation/``) that were not there ``before``; errors
        are ignored (this undoes a failed start and must never hide the error that ended it)."""
        for name in RUN_FILES:
            if name not in before:
                with contextlib.suppress(OSError):
                    self.file(name).unlink()
        if VALIDATION not in before:
            shutil.rmtree(self.validation, ignore_errors=True)


# ----------------------------------------------------------------------------- a model's runs
def is_model_dir(path: str | os.PathLike) -> bool:
    """``path`` holds ``fold_K/`` folders."""
    path = Path(path)
    return path.is_dir() and any(p.is_dir() and p.name.startswith(FOLD_PREFIX) for p in path.iterdir())


def fold_dirs(model_dir: str | os.PathLike, *, numbered: bool = False) -> list[RunDir]:
    """The ``fold_K`` folders of ``RESULTS/DATASET/ARCH`` (numbered first, in order; only
    those with ``numbered``)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    found = [p for p in model_dir.iterdir() if p.is_dir() and p.name.startswith(FOLD_PREFIX)]
    if numbered:
        found = [p for p in found if (fold_of(p) or "").isdigit()]
    return [RunDir(p) for p in sorted(found, key=lambda p: fold_sort_key(p.name))]


def lr_search_runs(model_dir: str | os.PathLike) -> list[RunDir]:
    """The LR-search runs of a model (``lr_search/lr_X/fold_K``), sorted by path."""
    base = Path(model_dir) / LR_SEARCH
    return [RunDir(p) for p in sorted(base.glob(f"lr_*/{FOLD_PREFIX}*"))] if base.is_dir() else []
