"""The files the plan stage leaves in ``$MEDPLAN_PREPROCESSED/NAME``, read back and checked:
``plans.json`` (:func:`load_plan`) and ``splits.json`` (:func:`load_splits`, against the plan
and ``cases.csv``), and the raw folder a plan was made from (:func:`raw_dir_of`).

Every later stage (train, tune, evaluate, the study) reads them through here; writing them
is :mod:`medplan.pipeline`'s job.
"""
from __future__ import annotations

from pathlib import Path

from medplan.datasets import resolve_raw_dataset
from medplan.errors import MedplanError
from medplan.io import read_cases_csv, read_json
from medplan.paths import preprocessed_dir
from medplan.plan import Plan
from medplan.splits import validate_splits


def cases_and_groups(raw_dir: Path, plan: Plan) -> tuple[list[str], list[str] | None]:
    """The kept cases of ``cases.csv`` (minus the plan's ``excluded_cases``) and, when the
    split is patient-aware, their groups; every case id is a checked name."""
    path = raw_dir / "cases.csv"
    column = plan.split.group_column
    grouped = plan.split.strategy == "group_kfold"
    if grouped and not column:
        raise MedplanError(f"split.group_column {column!r} is not a column", path)
    case_ids, group_of, _ = read_cases_csv(path, column if grouped else None)
    excluded = set(plan.excluded_cases)
    cases = [c for c in case_ids if c not in excluded]
    return cases, ([group_of[c] for c in cases] if grouped else None)


def load_plan(name: str) -> Plan:
    """The dataset's plans.json, checked (:meth:`Plan.from_json`); a clear error when it was never planned."""
    path = preprocessed_dir(name) / "plans.json"
    if not path.is_file():
        raise MedplanError(f"no plan for dataset {name!r}; run medplan_plan -d {name} or medplan_preprocess -d {name}",
                           path)
    return Plan.from_json(read_json(path), source=path)


def load_splits(name: str, plan: Plan | None = None) -> list[dict]:
    """The dataset's splits.json, checked against its plan and cases.csv before anything uses it
    (:func:`medplan.splits.validate_splits`); a one-line MedplanError names the first problem."""
    path = preprocessed_dir(name) / "splits.json"
    if not path.is_file():
        raise MedplanError(f"no splits for dataset {name!r}; run medplan_preprocess -d {name} "
                           "(it makes them from the plan)", path)
    plan_ = plan if plan is not None else load_plan(name)
    splits = read_json(path)
    cases, groups = cases_and_groups(raw_dir_of(plan_), plan_)
    group_map = dict(zip(cases, groups)) if groups is not None else None
    return validate_splits(splits, cases, group_map, n_folds=plan_.split.n_folds,
                           excluded=plan_.excluded_cases, source=path)


def raw_dir_of(plan_: Plan) -> Path:
    """The raw dataset folder a plan was made from (re-resolved if it moved; the one resolver,
    :func:`medplan.datasets.resolve_raw_dataset`)."""
    return resolve_raw_dataset(plan_.dataset, recorded=plan_.raw_dir)
