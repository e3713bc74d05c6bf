"""Where medplan keeps its data.

Three folders, as in nnU-Net, each settable by an environment variable. When unset they
default to ``~/medplan_data/{raw,preprocessed,results}`` so a first try needs no setup.
"""
from __future__ import annotations

import os
from pathlib import Path

from medplan.names import check_fold, check_name, inside

DEFAULT_ROOT = Path.home() / "medplan_data"

_ENV = {
    "raw": "MEDPLAN_RAW",
    "preprocessed": "MEDPLAN_PREPROCESSED",
    "results": "MEDPLAN_RESULTS",
}


def _folder(kind: str) -> Path:
    value = os.environ.get(_ENV[kind])
    return Path(value).expanduser() if value else DEFAULT_ROOT / kind


def raw_root() -> Path:
    """Root of converted datasets (``$MEDPLAN_RAW``)."""
    return _folder("raw")


def preprocessed_root() -> Path:
    """Root of fingerprints, plans, splits and arrays (``$MEDPLAN_PREPROCESSED``)."""
    return _folder("preprocessed")


def results_root(override: str | Path | None = None) -> Path:
    """Root of training runs and reports (``$MEDPLAN_RESULTS``; ``override`` instead when given,
    for the functions that take a ``results_root`` argument)."""
    return Path(override) if override is not None else _folder("results")


def raw_dir(dataset: str) -> Path:
    """``$MEDPLAN_RAW/DATASET``; the name follows :mod:`medplan.names` (never leaves the root)."""
    return _under(raw_root(), dataset)


def preprocessed_dir(dataset: str) -> Path:
    """``$MEDPLAN_PREPROCESSED/DATASET`` (checked like :func:`raw_dir`)."""
    return _under(preprocessed_root(), dataset)


def results_dir(dataset: str, arch: str | None = None, fold: int | str | None = None) -> Path:
    """``$MEDPLAN_RESULTS/DATASET[/ARCH[/fold_K]]``; every part is a checked name."""
    root = results_root()
    path = _under(root, dataset)
    if arch is not None:
        path = path / check_name(arch, "architecture name")
    if fold is not None:
        path = path / f"fold_{check_fold(fold)}"
    inside(root, path)
    return path


def _under(root: Path, dataset: str) -> Path:
    path = root / check_name(dataset, "dataset name")
    inside(root, path)
    return path
