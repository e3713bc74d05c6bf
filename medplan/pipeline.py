"""The first half of the pipeline as library calls: raw dataset -> plan + splits -> arrays.

``plan(name)`` fingerprints (reusing an up-to-date fingerprint), plans and splits;
``preprocess(name)`` plans if needed, then writes the arrays. Both are what the
``medplan_plan`` / ``medplan_preprocess`` commands and the demo call.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any, Callable

from medplan.datasets import resolve_raw_dataset
from medplan.errors import MedplanError
from medplan.casescan import ConvertScan
from medplan.fingerprint import DUPLICATE_POLICY, duplicates_line, fingerprint_dataset
from medplan.io import atomic_write_json, read_json
from medplan.locks import locked_dataset_stage
from medplan.paths import preprocessed_dir
from medplan.planners import get_planner
from medplan.planners.overrides import apply_overrides
from medplan.plan import Plan, check_overrides, thaw
from medplan.names import check_name
from medplan.preprocessing import CaseArrays, preprocess_dataset
from medplan.splits import check_splits, make_splits, validate_splits
# plans.json and splits.json are read back by medplan.stagefiles (every later stage reads them
# there); imported from here too
from medplan.stagefiles import cases_and_groups, load_plan, load_splits, raw_dir_of  # noqa: F401

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


def _fingerprint(name: str, raw_dir: Path, out_dir: Path, options: dict[str, Any], arrays: CaseArrays | None,
                 num_workers: int | None, refingerprint: bool, progress: bool, log: Log,
                 fused: ConvertScan | None = None) -> dict:
    signature = raw_signature(raw_dir)
    path = out_dir / "fingerprint.json"
    if path.is_file() and not refingerprint:
        old = read_json(path)
        if old.get("raw_signature") == signature and old.get("fingerprint_options") == options \
                and (old.get("duplicates") or {}).get("policy") == DUPLICATE_POLICY:
            log(f"fingerprint: up to date ({path})")
            log(duplicates_line(old))
            return old
    log(f"fingerprint: scanning {raw_dir}")
    kwargs = {k: v for k, v in options.items() if v is not None}
    # fingerprint_dataset uses the convert's records only for the dataset it wrote, same options
    fp = fingerprint_dataset(raw_dir, out_dir, arrays=arrays, num_workers=num_workers, progress=progress,
                             precomputed=fused, **kwargs)
    fp["raw_signature"] = signature
    fp["fingerprint_options"] = options
    atomic_write_json(path, fp)
    log(duplicates_line(fp))
    return fp


def _splits(plan: Plan, raw_dir: Path, out_dir: Path, log: Log) -> tuple[list[dict], bool]:
    """``(splits, new)``: splits.json when it still fits the kept cases and split settings, else
    new splits; nothing is written here (the caller writes new ones with :func:`_write_splits`)."""
    cases, groups = cases_and_groups(raw_dir, plan)
    group_map = dict(zip(cases, groups)) if groups is not None else None
    path = out_dir / "splits.json"
    settings_path = out_dir / "splits_settings.json"
    if path.is_file() and settings_path.is_file():
        try:
            same = read_json(settings_path) == plan.split.to_json()
            existing = validate_splits(read_json(path), cases, group_map, n_folds=plan.split.n_folds,
                                       excluded=plan.excluded_cases, source=path) if same else None
            if existing is not None:
                check_splits(existing, cases, group_map)
        except MedplanError as exc:
            log(f"splits: {exc}; making new splits")
        else:
            if existing is not None:
                log(f"splits: kept existing {path}")
                return existing, False
    try:
        splits = make_splits(cases, groups, n_folds=plan.split.n_folds, seed=plan.split.seed)
    except MedplanError as exc:
        raise MedplanError(f"cannot split {plan.dataset}: {exc} (medplan_plan -d {plan.dataset} "
                           "--set split.n_folds=K)", out_dir / "splits.json") from None
    check_splits(splits, cases, group_map)
    sizes = ", ".join(str(len(f["val"])) for f in splits)
    log(f"splits: {len(splits)} folds ({plan.split.strategy}), validation sizes {sizes}")
    return splits, True


def _write_splits(out_dir: Path, plan: Plan, splits: list[dict]) -> None:
    atomic_write_json(out_dir / "splits.json", splits)
    atomic_write_json(out_dir / "splits_settings.json", plan.split.to_json())


def _plan_command(name: str, plan_: Plan) -> str:
    """The medplan_plan command that makes this plan again (with the user's --set values)."""
    sets = "".join(f" --set {k}={json.dumps(thaw(v), separators=(',', ':'))}" for k, v in plan_.overrides.items())
    return f"medplan_plan -d {name}{sets}"


@locked_dataset_stage("plan")
def plan(name: str, *, overrides: dict[str, Any] | None = None, planner: str = "default",
         hash_name: str | None = None, hash_size: int | None = None, threshold: int | None = None,
         num_workers: int | None = None, refingerprint: bool = False, progress: bool = True,
         log: Log = _quiet) -> Plan:
    """Fingerprint, plan and split dataset ``name``; write fingerprint/plans/splits; return the plan."""
    check_name(name, "dataset name")
    check_overrides(overrides)  # a bad --set fails now, not after the fingerprint pass
    out_dir = preprocessed_dir(name)
    options = {"hash_name": hash_name, "hash_size": hash_size, "threshold": threshold}
    # The arrays only depend on the input size, so the fingerprint pass writes them for the
    # size the plan will most likely use, and preprocessing later has nothing left to do.
    size = (overrides or {}).get("input_size", [512, 512])
    size = [size, size] if isinstance(size, int) else size
    # An official download imported now is fingerprinted while it is converted: the converter
    # hands the pixels it decodes to the fingerprint records (fingerprint_dataset scans the rest).
    arrays = CaseArrays.at(out_dir, size) if size else None
    with contextlib.closing(ConvertScan(out_dir, arrays=arrays,
                                        **{k: v for k, v in options.items() if v is not None})) as fused:
        try:
            raw_dir = resolve_raw_dataset(name, progress=progress, scan=fused)
        except BaseException:
            if arrays is not None:  # arrays of convert workers stopped mid-write
                arrays.discard_partial()
            raise
        out_dir.mkdir(parents=True, exist_ok=True)
        planner_fn = get_planner(planner)
        fp = _fingerprint(name, raw_dir, out_dir, options, arrays, num_workers, refingerprint, progress, log, fused)
    dataset_path = raw_dir / "dataset.json"
    dataset_json = read_json(dataset_path)
    if not isinstance(dataset_json, dict):
        raise MedplanError("expected a JSON object", dataset_path)
    if dataset_json.get("name") is not None:
        check_name(dataset_json["name"], "dataset name", dataset_path)
    new = planner_fn(fp, dataset_json, raw_dir=raw_dir)
    new["dataset"] = name
    new["planner"] = planner
    plans_path = out_dir / "plans.json"
    source = f"{plans_path} with --set {', '.join(overrides)}" if overrides else plans_path
    new = Plan.from_json(apply_overrides(new, overrides), source=source)
    new = _drop_within_group_pairs_if_split_ignores_groups(new, fp, log)
    # plan and splits are one step: the splits are made (or a failure raised) before anything is
    # written, and written before the plan, so a plan on disk always has its splits beside it
    splits, fresh = _splits(new, raw_dir, out_dir, log)
    if fresh:
        _write_splits(out_dir, new, splits)
    if plans_path.is_file():
        try:
            old = read_json(plans_path)
        except MedplanError:
            old = None
        if isinstance(old, dict) and ({k: v for k, v in old.items() if k != "created"}
                                      != {k: v for k, v in new.to_json().items() if k != "created"}):
            atomic_write_json(out_dir / "plans.previous.json", old)
            log(f"plan: replaced {plans_path} (previous kept as plans.previous.json)")
    atomic_write_json(plans_path, new.to_json())
    return new


def _drop_within_group_pairs_if_split_ignores_groups(plan_: Plan, fp: dict, log: Log) -> Plan:
    """Near-duplicates within one patient are kept because a patient-aware split puts them in
    one fold; a split that ignores patients (``--set split.strategy=kfold``) could put them on
    both sides, so there the second case of each pair is dropped too, and the plan says so."""
    pairs = (fp.get("duplicates") or {}).get("kept_within_group") or []
    if plan_.split.strategy == "group_kfold" or not pairs:
        return plan_
    extra = sorted({str(pair[1]) for pair in pairs} - set(plan_.excluded_cases))
    if not extra:
        return plan_
    note = (f"{len(extra)} near-duplicate(s) within a patient also dropped: the split "
            f"({plan_.split.strategy}) does not keep a patient's cases in one fold")
    log(f"duplicates: {note}")
    return plan_.updated(excluded_cases=sorted(set(plan_.excluded_cases) | set(extra)),
                         reasons={**plan_.reasons,
                                  "excluded_cases": "; ".join(filter(None, [plan_.reason("excluded_cases"), note]))})


def _ensure_splits(name: str, plan_: Plan, log: Log) -> None:
    """A missing splits.json is made from the plan; a present one must pass :func:`load_splits`
    (a bad one is never replaced silently: the error says what to run)."""
    out_dir = preprocessed_dir(name)
    if not (out_dir / "splits.json").is_file():
        splits, _ = _splits(plan_, raw_dir_of(plan_), out_dir, log)
        _write_splits(out_dir, plan_, splits)
        log(f"splits: {out_dir / 'splits.json'} was missing; made it from the plan")
        return
    try:
        load_splits(name, plan_)
    except MedplanError as exc:
        raise MedplanError(f"{exc}; fix or delete it, or make new splits with {_plan_command(name, plan_)}") from None


@locked_dataset_stage("preprocess")
def preprocess(name: str, *, replan: bool = False, overrides: dict[str, Any] | None = None,
               num_workers: int | None = None, progress: bool = True, log: Log = _quiet,
               **plan_options: Any) -> Path:
    """Plan when needed, then write the arrays; returns the folder of arrays."""
    plans_path = preprocessed_dir(name) / "plans.json"
    if not replan and not overrides and plans_path.is_file():
        plan_ = load_plan(name)
        fp_path = preprocessed_dir(name) / "fingerprint.json"
        stale = not fp_path.is_file() or read_json(fp_path).get("raw_signature") != raw_signature(raw_dir_of(plan_))
        if stale:
            log("plan: the raw dataset changed since it was planned; planning again (user --set values kept)")
            overrides = thaw(plan_.overrides)
            replan = True
        else:
            log(f"plan: using {plans_path}")
            log(duplicates_line(read_json(fp_path)))
    if replan or overrides or not plans_path.is_file():
        plan_ = plan(name, overrides=overrides, num_workers=num_workers, progress=progress, log=log, **plan_options)
    _ensure_splits(name, plan_, log)
    data = preprocess_dataset(raw_dir_of(plan_), preprocessed_dir(name), plan_, num_workers=num_workers,
                              progress=progress)
    log(f"preprocess: arrays in {data}")
    return data


def plan_summary(plan_: Plan) -> str:
    """One line for logs."""
    data = plan_.to_json()
    return json.dumps({k: data[k] for k in ("dataset", "modality", "task", "loss", "input_size", "batch_size")})
