"""The first half of the pipeline as library calls: raw dataset -> plan + splits -> arrays.

``plan(name)`` fingerprints (reusing an up-to-date fingerprint), plans and splits;
``preprocess(name)`` plans if needed, then writes the arrays. Both are what the
``medplan_plan`` / ``medplan_preprocess`` commands and the demo call.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

from medplan.errors import MedplanError
from medplan.io import atomic_write_json, read_json
from medplan.paths import preprocessed_dir
from medplan.planners import get_planner
from medplan.planners.overrides import apply_overrides
from medplan.planners.schema import finalize_plan
from medplan.splits import check_splits, make_splits

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def raw_signature(raw_dir: Path) -> str:
    """Changes whenever the raw dataset's files change (names, sizes, modification times)."""
    h = hashlib.sha1()
    for name in ("dataset.json", "cases.csv"):
        path = raw_dir / name
        h.update(path.read_bytes() if path.is_file() else b"-")
    for sub in ("images", "labels"):
        folder = raw_dir / sub
        if folder.is_dir():
            for entry in sorted(folder.iterdir()):
                st = entry.stat()
                h.update(f"{sub}/{entry.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _fingerprint(name: str, raw_dir: Path, out_dir: Path, options: dict[str, Any], input_size: list[int] | None,
                 num_workers: int | None, refingerprint: bool, progress: bool, log: Log) -> dict:
    from medplan.fingerprint import fingerprint_dataset

    signature = raw_signature(raw_dir)
    path = out_dir / "fingerprint.json"
    if path.is_file() and not refingerprint:
        old = read_json(path)
        if old.get("raw_signature") == signature and old.get("fingerprint_options") == options:
            log(f"fingerprint: up to date ({path})")
            return old
    log(f"fingerprint: scanning {raw_dir}")
    kwargs = {k: v for k, v in options.items() if v is not None}
    fp = fingerprint_dataset(raw_dir, out_dir, input_size=tuple(input_size) if input_size else None,
                             num_workers=num_workers, progress=progress, **kwargs)
    fp["raw_signature"] = signature
    fp["fingerprint_options"] = options
    atomic_write_json(path, fp)
    return fp


def _cases_and_groups(raw_dir: Path, plan: dict) -> tuple[list[str], list[str] | None]:
    import pandas as pd  # imported here: training processes import this module and never need it

    table = pd.read_csv(raw_dir / "cases.csv", dtype=str, keep_default_na=False)
    excluded = set(plan["excluded_cases"])
    table = table[~table["case_id"].isin(excluded)]
    cases = table["case_id"].tolist()
    column = plan["split"].get("group_column")
    if plan["split"]["strategy"] == "group_kfold":
        if not column or column not in table.columns:
            raise MedplanError(f"split.group_column {column!r} is not a column", raw_dir / "cases.csv")
        return cases, table[column].tolist()
    return cases, None


def _splits(plan: dict, raw_dir: Path, out_dir: Path, log: Log) -> list[dict]:
    """Reuse splits.json when it still fits the kept cases and split settings, else make new ones."""
    cases, groups = _cases_and_groups(raw_dir, plan)
    group_map = dict(zip(cases, groups)) if groups is not None else None
    path = out_dir / "splits.json"
    settings_path = out_dir / "splits_settings.json"
    if path.is_file() and settings_path.is_file() and read_json(settings_path) == plan["split"]:
        existing = read_json(path)
        try:
            check_splits(existing, cases, group_map)
        except MedplanError:
            log("splits: the kept cases changed; making new splits")
        else:
            if len(existing) == plan["split"]["n_folds"]:
                log(f"splits: kept existing {path}")
                return existing
    splits = make_splits(cases, groups, n_folds=plan["split"]["n_folds"], seed=plan["split"]["seed"])
    check_splits(splits, cases, group_map)
    atomic_write_json(path, splits)
    atomic_write_json(settings_path, plan["split"])
    sizes = ", ".join(str(len(f["val"])) for f in splits)
    log(f"splits: {len(splits)} folds ({plan['split']['strategy']}), validation sizes {sizes}")
    return splits


def plan(name: str, *, overrides: dict[str, Any] | None = None, planner: str = "default",
         hash_name: str | None = None, hash_size: int | None = None, threshold: int | None = None,
         num_workers: int | None = None, refingerprint: bool = False, progress: bool = True,
         log: Log = _quiet) -> dict:
    """Fingerprint, plan and split dataset ``name``; write fingerprint/plans/splits; return the plan."""
    from medplan.datasets import resolve_raw_dataset

    raw_dir = resolve_raw_dataset(name, progress=progress)
    out_dir = preprocessed_dir(name)
    out_dir.mkdir(parents=True, exist_ok=True)
    planner_fn = get_planner(planner)
    options = {"hash_name": hash_name, "hash_size": hash_size, "threshold": threshold}
    # The arrays only depend on the input size, so the fingerprint pass writes them for the
    # size the plan will most likely use, and preprocessing later has nothing left to do.
    size = (overrides or {}).get("input_size", [512, 512])
    size = [size, size] if isinstance(size, int) else size
    fp = _fingerprint(name, raw_dir, out_dir, options, size, num_workers, refingerprint, progress, log)
    dataset_json = read_json(raw_dir / "dataset.json")
    new = planner_fn(fp, dataset_json, raw_dir=raw_dir)
    new["dataset"] = name
    new["planner"] = planner
    new = finalize_plan(apply_overrides(new, overrides), source=out_dir / "plans.json")
    plans_path = out_dir / "plans.json"
    if plans_path.is_file():
        old = read_json(plans_path)
        if {k: v for k, v in old.items() if k != "created"} != {k: v for k, v in new.items() if k != "created"}:
            atomic_write_json(out_dir / "plans.previous.json", old)
            log(f"plan: replaced {plans_path} (previous kept as plans.previous.json)")
    atomic_write_json(plans_path, new)
    _splits(new, raw_dir, out_dir, log)
    return new


def load_plan(name: str) -> dict:
    """The dataset's plans.json, validated; a clear error when it was never planned."""
    path = preprocessed_dir(name) / "plans.json"
    if not path.is_file():
        raise MedplanError(f"no plan for dataset {name!r}; run medplan_plan -d {name} or medplan_preprocess -d {name}",
                           path)
    return finalize_plan(read_json(path), source=path)


def load_splits(name: str) -> list[dict]:
    path = preprocessed_dir(name) / "splits.json"
    if not path.is_file():
        raise MedplanError(f"no splits for dataset {name!r}; run medplan_preprocess -d {name}", path)
    splits = read_json(path)
    if not isinstance(splits, list) or not all(isinstance(f, dict) and {"train", "val"} <= f.keys() for f in splits):
        raise MedplanError("expected a list of {\"train\": [...], \"val\": [...]}", path)
    return splits


def raw_dir_of(plan_: dict) -> Path:
    """The raw dataset folder a plan was made from (re-resolved if it moved)."""
    path = Path(plan_.get("raw_dir", ""))
    if path.is_dir() and (path / "dataset.json").is_file():
        return path
    from medplan.datasets import resolve_raw_dataset

    return resolve_raw_dataset(plan_["dataset"])


def preprocess(name: str, *, replan: bool = False, overrides: dict[str, Any] | None = None,
               num_workers: int | None = None, progress: bool = True, log: Log = _quiet,
               **plan_options: Any) -> Path:
    """Plan when needed, then write the arrays; returns the folder of arrays."""
    from medplan.preprocessing import preprocess_dataset

    plans_path = preprocessed_dir(name) / "plans.json"
    if not replan and not overrides and plans_path.is_file():
        plan_ = load_plan(name)
        fp_path = preprocessed_dir(name) / "fingerprint.json"
        stale = not fp_path.is_file() or read_json(fp_path).get("raw_signature") != raw_signature(raw_dir_of(plan_))
        if stale:
            log("plan: the raw dataset changed since it was planned; planning again (user --set values kept)")
            overrides = plan_.get("overrides")
            replan = True
        else:
            log(f"plan: using {plans_path}")
    if replan or overrides or not plans_path.is_file():
        plan_ = plan(name, overrides=overrides, num_workers=num_workers, progress=progress, log=log, **plan_options)
    data = preprocess_dataset(raw_dir_of(plan_), preprocessed_dir(name), plan_, num_workers=num_workers,
                              progress=progress)
    log(f"preprocess: arrays in {data}")
    return data


def plan_summary(plan_: dict) -> str:
    """One line for logs."""
    return json.dumps({k: plan_[k] for k in ("dataset", "modality", "task", "loss", "input_size", "batch_size")})
