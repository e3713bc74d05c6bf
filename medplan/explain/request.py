"""An explain request and its jobs: which model (one fold, or folds averaged) explains which
cases, and where each writes; every input is checked here, before anything is computed."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from medplan.errors import MedplanError
from medplan.evaluation.aggregate import model_path
from medplan.evaluation.compare import common_worst_cases, worst_cases
from medplan.explain.cases import validated_cases, validation_cases
from medplan.explain.outputs import safe_name
from medplan.inference import resolve_fold_dirs
from medplan.rundir import RunDir, fold_of

#: where a model's maps go: ``fold_K/explain/``, or ``ARCH/explain_mean/`` for folds averaged
EXPLAIN_DIR, EXPLAIN_MEAN_DIR = "explain", "explain_mean"
MEAN_OVER_FOLDS = "mean_over_folds"


@dataclass
class ExplainRequest:
    dataset: str
    archs: list[str]
    folds: list[Any] | None = None          # None: auto; ["all"]: every trained fold
    worst: int | None = None
    cases: list[str] | None = None
    images: str | Path | None = None
    target: str = "pred"
    layer: str = "auto"
    mean_over_folds: bool = False
    checkpoint: str = "best"
    device: str = "auto"
    output: str | Path | None = None
    progress: bool = True
    results_root: str | Path | None = None


@dataclass
class Job:
    """One model (one fold, or folds averaged) on a list of cases, written to ``out_dir``."""

    arch: str
    fold_dirs: list[Path]
    cases: list[str]
    out_dir: Path
    maps: str
    source: str
    per_case: dict[str, dict]


def model_dir(root: Path, dataset: str, arch: str) -> Path:
    """``RESULTS/DATASET/ARCH`` (names checked); an error when the model has no results."""
    path = model_path(root, dataset, arch)
    if not path.is_dir():
        raise MedplanError(f"no results for {dataset}/{arch}", path)
    return path


def trained_folds(model_dir: Path, checkpoint: str) -> list[Path]:
    return resolve_fold_dirs(model_dir, None, checkpoint)


def chosen_folds(model_dir: Path, folds: Sequence[Any] | None, checkpoint: str) -> list[Path]:
    """The requested folds (``None`` or ``["all"]``: every trained fold)."""
    if not folds or list(folds) == ["all"]:
        return trained_folds(model_dir, checkpoint)
    if "all" in folds:
        raise MedplanError("-f all cannot be combined with fold numbers")
    return resolve_fold_dirs(model_dir, list(folds), checkpoint)


def worst_of_fold(dataset: str, arch: str, fold_dir: Path, n: int, root: Path) -> list[str]:
    """The fold's ``n`` worst validation cases (``fold_K/worst_cases.csv``, written by compare)."""
    validation_cases(fold_dir)
    (path,) = worst_cases(dataset, arch, n, folds=[fold_of(fold_dir)], results_root=root)
    return [str(c) for c in pd.read_csv(path, dtype={"case_id": str})["case_id"]]


def common_worst(req: ExplainRequest, root: Path) -> list[str]:
    """Several architectures: per fold the ``worst`` cases hardest for all of them (lowest mean
    per-case mDSC), as the paper picked its Fig. 1 examples."""
    table = common_worst_cases(req.dataset, req.archs, int(req.worst), results_root=root)
    if req.folds and list(req.folds) != ["all"]:
        table = table[table["fold"].astype(str).isin([str(f) for f in req.folds])]
    if table.empty:
        raise MedplanError(f"{', '.join(req.archs)} share no validation case on the requested folds",
                           root / req.dataset)
    return [str(c) for c in table["case_id"]]


def _units(req: ExplainRequest, arch: str, model: Path, all_cases: dict[str, tuple[Path, dict]],
           chosen: list[Path], root: Path) -> list[tuple[list[Path], list[str]]]:
    """(fold folders, cases) of each job of one architecture."""
    if req.cases and not req.folds and not req.mean_over_folds:  # each case by the fold that validated it
        groups: dict[Path, list[str]] = {}
        for case in req.cases:
            if case not in all_cases:
                raise MedplanError(f"case {case!r} is not a validation case of any trained fold of {arch}", model)
            groups.setdefault(all_cases[case][0], []).append(case)
        return [([d], cs) for d, cs in groups.items()]
    if req.mean_over_folds:
        if req.worst:
            cases: list[str] = []
            for d in chosen:
                cases += [c for c in worst_of_fold(req.dataset, arch, d, req.worst, root) if c not in cases]
        else:
            cases = list(req.cases or [])
            for c in cases:
                if c not in all_cases:
                    raise MedplanError(f"case {c!r} is not a validation case of any trained fold of {arch}", model)
        return [(chosen, cases)]
    units = []
    for d in chosen:
        if req.worst:
            units.append(([d], worst_of_fold(req.dataset, arch, d, req.worst, root)))
        elif req.cases:
            valid = validation_cases(d)
            for c in req.cases:
                if c not in valid:
                    raise MedplanError(f"case {c!r} is not a validation case of {d.name}", RunDir(d).summary_path)
            units.append(([d], list(req.cases)))
        else:
            units.append(([d], []))
    return units


def plan_jobs(req: ExplainRequest, root: Path) -> list[Job]:
    """Check every input and decide what runs where, before anything is computed or written."""
    jobs: list[Job] = []
    modes = [m for m in ("worst", "cases", "images") if getattr(req, m)]
    if len(modes) != 1:
        raise MedplanError("choose the cases with exactly one of --worst N, --case NAME, --images DIR")
    if req.worst is not None and req.worst < 1:
        raise MedplanError(f"--worst must be >= 1, got {req.worst}")
    worst_common = bool(req.worst) and len(req.archs) > 1
    if worst_common:  # one set of cases for the grid; each explained by the fold that validated it
        for arch in req.archs:
            trained_folds(model_dir(root, req.dataset, arch), req.checkpoint)
        cases = common_worst(req, root)
        req = ExplainRequest(**{**req.__dict__, "worst": None, "cases": cases,
                                "folds": req.folds if req.mean_over_folds else None})
    if req.images and req.target == "gt":
        raise MedplanError("--target gt needs ground truth; new images (--images) have none")
    if req.images and len(req.archs) > 1 and req.output:
        raise MedplanError("-o with several architectures would mix their maps; leave it out")
    for arch in req.archs:
        model = model_dir(root, req.dataset, arch)
        all_cases = validated_cases(trained_folds(model, req.checkpoint))
        chosen = chosen_folds(model, req.folds, req.checkpoint)
        for dirs, cases in _units(req, arch, model, all_cases, chosen, root):
            maps = MEAN_OVER_FOLDS if len(dirs) > 1 or req.mean_over_folds else dirs[0].name
            base = model / EXPLAIN_MEAN_DIR if maps == MEAN_OVER_FOLDS else dirs[0] / EXPLAIN_DIR
            if req.images:
                base = base / safe_name(Path(req.images).name)
            out = Path(req.output) if req.output else base
            source = "worst" if req.worst or worst_common else "images" if req.images else "named"
            values = {c: all_cases[c][1] for c in cases if c in all_cases}
            jobs.append(Job(arch, dirs, cases, out, maps, source, values))
    return jobs
