"""Gather every fold of every dataset x architecture: per-fold metrics and mean ± SD over folds.

Where the numbers come from (column ``source``):

* ``summary.json``: the trainer's ``fold_K/validation/summary.json``, computed with the same
  metric code from the same saved label maps against the same raw labels, so it equals a
  recomputation at original size and costs nothing (the default when the file exists);
  with ``at_input_size`` its ``at_input_size`` block (network output at the planned size
  against the resized labels, which is what the paper reported).
* ``recomputed``: the label maps in ``fold_K/validation/`` evaluated again against the raw
  labels (:func:`medplan.evaluation.evaluate.evaluate_fold`): with ``recompute=True``, or
  when a fold has label maps but no summary.json.

A fold without validation results is a row with ``status = "missing"``, never dropped: the
expected folds are ``range(plan.split.n_folds)`` (5 when no plan can be found).
SD is the sample standard deviation over the available folds (ddof = 1).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from medplan import paths, rundir
from medplan.errors import MedplanError
from medplan.evaluation.evaluate import evaluate_fold
from medplan.interop.postprocessing import read_postprocessing
from medplan.io import atomic_write_json
from medplan.names import check_name, check_names, inside, is_valid_name
from medplan.plan import Plan
from medplan.rundir import FOLD_PREFIX, SUMMARY, RunDir, fold_dirs, fold_of
from medplan.stagefiles import load_plan

METRICS = ("mDSC", "mIoU", "mRec", "mPrec")
#: mDSC after the post-processing the folds chose (postprocessing.json), beside the raw mDSC
POSTPROCESSED = "mDSC_pp"
DEFAULT_N_FOLDS = 5
ID_COLUMNS = ("dataset", "arch", "fold", "status", "n_folds", "n_cases", "source", "evaluated_at", "class_names")


def dice_column(index: int) -> str:
    """Column of class index ``index``'s Dice (C_1, C_2, ... as in Table 3)."""
    return f"dice_C{index}"


def model_path(results_root: str | Path | None, dataset: str, arch: str) -> Path:
    """``RESULTS/DATASET/ARCH`` with both names checked (:mod:`medplan.names`): never outside the root."""
    root = paths.results_root(results_root)
    path = root / check_name(dataset, "dataset name") / check_name(arch, "architecture name")
    inside(root, path)
    return path


def is_model_dir(path: Path) -> bool:
    return rundir.is_model_dir(path)


def model_dirs(results_root: str | Path | None = None, datasets: Iterable[str] | None = None,
               archs: Iterable[str] | None = None) -> list[tuple[str, str, Path]]:
    """(dataset, arch, folder) of every ``RESULTS/DATASET/ARCH/`` that holds ``fold_K/`` folders."""
    root = paths.results_root(results_root)
    want_d = set(check_names(datasets, "dataset name")) if datasets else None
    want_a = set(check_names(archs, "architecture name")) if archs else None
    if not root.is_dir():
        raise MedplanError("results folder not found (set MEDPLAN_RESULTS)", root)
    found = []
    # folders whose names break the name rule (hidden, spaces, ...) are not medplan's: skipped
    for ddir in sorted(p for p in root.iterdir() if p.is_dir() and is_valid_name(p.name)):
        if want_d is not None and ddir.name not in want_d:
            continue
        for adir in sorted(p for p in ddir.iterdir() if p.is_dir() and is_valid_name(p.name)):
            if (want_a is None or adir.name in want_a) and is_model_dir(adir):
                found.append((ddir.name, adir.name, adir))
    for name in sorted(want_d or ()):
        if not (root / name).is_dir():
            raise MedplanError(f"no results for dataset {name!r}", root / name)
    if not found:
        what = " for " + ", ".join(filter(None, [", ".join(sorted(want_d or [])), ", ".join(sorted(want_a or []))])) \
            if (want_d or want_a) else ""
        raise MedplanError(f"no trained models (DATASET/ARCH/fold_K/){what}", root)
    return found


def model_plan(model_dir: Path, dataset: str) -> Plan | None:
    """The plan a model was trained with: any fold's config.json, else the dataset's plans.json."""
    for run in fold_dirs(model_dir):
        plan = run.plan()
        if plan is not None:
            return Plan.from_json(plan, source=run.config_path)
    try:
        return load_plan(dataset)
    except MedplanError:
        return None


def _class_names(plan: Plan | None, summaries: Sequence[dict]) -> list[str]:
    """All class names, background first."""
    if plan is not None:
        return plan.class_names
    for s in summaries:
        if isinstance(s.get("class_names"), list):
            return list(s["class_names"])
        if isinstance(s.get("per_class"), dict):
            return ["background", *s["per_class"]]
    return ["background"]


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)


def fold_sort_key(fold: Any) -> tuple[int, Any]:
    """Folds in order: 0, 1, ..., 10, then named ones (``all``)."""
    s = str(fold)
    return (0, int(s)) if s.isdigit() else (1, s)


def _summary_metrics(summary: dict, at_input_size: bool) -> dict | None:
    if not at_input_size:
        return summary
    block = summary.get("at_input_size")
    if not isinstance(block, dict):
        return None
    return {**block, "n_cases": block.get("n_cases", summary.get("n_cases"))}


def model_table(dataset: str, arch: str, *, results_root: str | Path | None = None, recompute: bool = False,
                at_input_size: bool = False, progress: bool = False) -> pd.DataFrame:
    """One row per expected fold of one model (missing folds included, status ``missing``)."""
    model_dir = model_path(results_root, dataset, arch)
    if not is_model_dir(model_dir):
        raise MedplanError("no fold_K/ folders: not a trained model folder", model_dir)
    plan = model_plan(model_dir, dataset)
    n_folds = plan.split.n_folds if plan is not None else DEFAULT_N_FOLDS
    expected: list[Any] = list(range(n_folds))
    extra = sorted({int(r.fold) for r in fold_dirs(model_dir, numbered=True)} - set(expected))
    expected += extra  # a fold beyond the plan's count is shown rather than ignored
    results: dict[Any, tuple[dict, str, str]] = {}
    for fold in expected:
        run = RunDir(model_dir / f"{FOLD_PREFIX}{fold}")
        metrics = None
        if run.summary_path.is_file() and not recompute:
            metrics = _summary_metrics(run.summary(), at_input_size)
            if metrics is not None:
                where = "original_size"
                if at_input_size:
                    size = plan.input_size if plan is not None else None
                    where = f"input_size {size[0]}x{size[1]}" if size else "input_size"
                results[fold] = (metrics, SUMMARY, where)
        if metrics is None and (run.has_predictions() if run.path.is_dir() else False):
            metrics = evaluate_fold(run.path, plan, at_input_size=at_input_size, progress=progress)
            results[fold] = (metrics, "recomputed", metrics["evaluated_at"])
    names = _class_names(plan, [r[0] for r in results.values()])
    rows = []
    for fold in expected:
        row: dict[str, Any] = {"dataset": dataset, "arch": arch, "fold": fold, "n_folds": n_folds,
                               "class_names": "|".join(names[1:])}
        if fold not in results:
            row.update(status="missing", n_cases=np.nan, source="", evaluated_at="")
            row.update({m: np.nan for m in METRICS})
            row.update({dice_column(i): np.nan for i in range(1, len(names))})
        else:
            metrics, source, where = results[fold]
            row.update(status="ok", n_cases=_num(metrics.get("n_cases")), source=source, evaluated_at=where)
            row.update({m: _num(metrics.get(m)) for m in METRICS})
            per_class = metrics.get("per_class") or {}
            for i, name in enumerate(names[1:], start=1):
                row[dice_column(i)] = _num((per_class.get(name) or {}).get("dice"))
        rows.append(row)
    decision = None if at_input_size else read_postprocessing(model_dir)
    if decision is not None:  # raw and post-processed side by side, fold by fold
        for row in rows:
            pp = (decision.get("per_fold") or {}).get(str(row["fold"]))
            row[POSTPROCESSED] = _num(pp["postprocessed"]["mDSC"]) if pp and row["status"] == "ok" else np.nan
    return pd.DataFrame(rows)


def metric_columns(df: pd.DataFrame) -> list[str]:
    dice = sorted((c for c in df.columns if c.startswith("dice_C")), key=lambda c: int(c[len("dice_C"):]))
    return [*METRICS, *([POSTPROCESSED] if POSTPROCESSED in df.columns else []), *dice]


def fold_status(n_ok: int, n_expected: int, missing: Sequence[Any]) -> str:
    """``5/5 folds`` or ``3/5 folds; missing: 3, 4``."""
    text = f"{n_ok}/{n_expected} folds"
    return text + (f"; missing: {', '.join(map(str, missing))}" if missing else "")


def model_summary(df: pd.DataFrame) -> pd.DataFrame:
    """One row per dataset x arch: ``mean_<metric>``, ``sd_<metric>`` and ``n_<metric>`` (the folds
    with a value: a class absent from a fold's validation cases has none there) over the available
    folds, ``n_ok``, ``n_expected``, ``missing`` (fold list), ``complete`` (every expected fold
    evaluated) and ``folds`` (the status line)."""
    cols = metric_columns(df)
    rows = []
    for (dataset, arch), g in df.groupby(["dataset", "arch"], sort=True):
        ok = g[g["status"] == "ok"]
        missing = [f for f in g.loc[g["status"] != "ok", "fold"].tolist()]
        n_expected = int(g["n_folds"].max()) if g["n_folds"].notna().any() else len(g)
        row: dict[str, Any] = {"dataset": dataset, "arch": arch, "n_ok": len(ok), "n_expected": max(n_expected, len(g)),
                               "missing": sorted(missing, key=fold_sort_key), "class_names": g["class_names"].iloc[0]}
        row["folds"] = fold_status(row["n_ok"], row["n_expected"], row["missing"])
        row["complete"] = row["n_ok"] >= row["n_expected"]
        for c in cols:
            values = ok[c].astype(float)
            row[f"mean_{c}"] = float(values.mean()) if values.notna().any() else np.nan
            row[f"sd_{c}"] = float(values.std(ddof=1)) if values.notna().sum() > 1 else np.nan
            row[f"n_{c}"] = int(values.notna().sum())
        rows.append(row)
    return pd.DataFrame(rows)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (np.floating, np.integer)):
        return _clean(value.item())
    return value


def cv_summary(table: pd.DataFrame) -> dict[str, Any]:
    """The ``ARCH/cv_summary.json`` of one model's fold table."""
    if table.empty or table[["dataset", "arch"]].drop_duplicates().shape[0] != 1:
        raise MedplanError("cv_summary needs the fold rows of exactly one dataset x architecture")
    summary = model_summary(table).iloc[0]
    cols = metric_columns(table)
    names = [n for n in str(summary["class_names"]).split("|") if n]

    def block(get) -> dict[str, Any]:
        out = {m: _clean(get(m)) for m in METRICS}
        out["dice"] = {names[int(c[len("dice_C"):]) - 1]: _clean(get(c)) for c in cols if c.startswith("dice_C")
                       and int(c[len("dice_C"):]) - 1 < len(names)}
        return out

    folds = {}
    for _, r in table.iterrows():
        if r["status"] == "ok":
            folds[str(r["fold"])] = {"n_cases": _clean(r["n_cases"]), "source": r["source"],
                                     "evaluated_at": r["evaluated_at"], **block(lambda c, r=r: r[c])}
    return {
        "dataset": summary["dataset"], "arch": summary["arch"],
        "n_folds": int(summary["n_expected"]), "n_available": int(summary["n_ok"]),
        "missing_folds": [_clean(f) for f in summary["missing"]], "status": summary["folds"],
        "class_names": names, "sd": "sample standard deviation over the available folds (ddof=1)",
        "evaluated_at": sorted({r for r in table["evaluated_at"] if r}),
        "folds": folds,
        "mean": block(lambda c: summary[f"mean_{c}"]),
        "std": block(lambda c: summary[f"sd_{c}"]),
    }


def cv_summary_name(at_input_size: bool) -> str:
    return "cv_summary_at_input_size.json" if at_input_size else "cv_summary.json"


def write_cv_summaries(df: pd.DataFrame, results_root: str | Path | None = None, *,
                       at_input_size: bool = False) -> list[Path]:
    """``RESULTS/DATASET/ARCH/cv_summary.json`` (``cv_summary_at_input_size.json``) per model."""
    root = paths.results_root(results_root)
    written = []
    for (dataset, arch), g in df.groupby(["dataset", "arch"], sort=True):
        path = model_path(root, dataset, arch) / cv_summary_name(at_input_size)
        atomic_write_json(path, cv_summary(g))
        written.append(path)
    return written


def evaluate_model(dataset: str, arch: str, *, at_input_size: bool = False, recompute: bool = False,
                   results_root: str | Path | None = None, write: bool = True, progress: bool = False) -> dict[str, Any]:
    """Per-fold metrics and mean ± SD of one dataset x architecture (the cv_summary dict, also
    written to ``ARCH/cv_summary.json`` unless ``write=False``)."""
    table = model_table(dataset, arch, results_root=results_root, recompute=recompute, at_input_size=at_input_size,
                        progress=progress)
    if write:
        write_cv_summaries(table, results_root, at_input_size=at_input_size)
    out = cv_summary(table)
    out["table"] = table
    return out


def gather_all_folds(results_root: str | Path | None = None, *, recompute: bool = False, at_input_size: bool = False,
                     datasets: Iterable[str] | None = None, archs: Iterable[str] | None = None,
                     progress: bool = False) -> pd.DataFrame:
    """Every fold of every dataset x architecture under the results folder, one row per fold
    (columns: dataset, arch, fold, status, n_folds, n_cases, source, evaluated_at, class_names,
    mDSC, mIoU, mRec, mPrec, dice_C1, ...; metric values as fractions, NaN where missing)."""
    tables = [model_table(d, a, results_root=results_root, recompute=recompute, at_input_size=at_input_size,
                          progress=progress)
              for d, a, _ in model_dirs(results_root, datasets, archs)]
    df = pd.concat(tables, ignore_index=True, sort=False)
    cols = [c for c in ID_COLUMNS if c in df.columns] + metric_columns(df)
    return df[cols]


# ---------------------------------------------------------------------------- pointing game (medplan_explain)
#: per-case Grad-CAM energy inside the GT, written by medplan.explain
POINTING_GAME_FILES = (f"{FOLD_PREFIX}*/explain/pointing_game.csv", "explain_mean/pointing_game.csv")


def gather_pointing_game(results_root: str | Path | None = None, *, datasets: Iterable[str] | None = None,
                         archs: Iterable[str] | None = None) -> pd.DataFrame:
    """Every per-case, per-class pointing-game row of ``medplan_explain`` (empty when none)."""
    root = paths.results_root(results_root)
    want_d, want_a = (set(datasets) if datasets else None), (set(archs) if archs else None)
    frames = []
    if root.is_dir():
        for ddir in sorted(p for p in root.iterdir() if p.is_dir() and (want_d is None or p.name in want_d)):
            for adir in sorted(p for p in ddir.iterdir() if p.is_dir() and (want_a is None or p.name in want_a)):
                for pattern in POINTING_GAME_FILES:
                    for path in sorted(adir.glob(pattern)):
                        try:
                            df = pd.read_csv(path)
                        except Exception as exc:
                            raise MedplanError(f"cannot read pointing-game table ({type(exc).__name__})",
                                               path) from None
                        if not df.empty:
                            frames.append(df.assign(dataset=ddir.name, arch=adir.name))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def pointing_game_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per dataset x architecture x maps (each fold's own model, or the mean over folds) x target x
    class: the mean, SD and median share of CAM energy inside the GT over the explained cases of
    all folds, beside the mean GT area share (what an evenly spread map would score)."""
    cols = ["dataset", "arch", "maps", "target", "class_index", "class", "folds", "n_cases", "mean_energy_in_gt",
            "sd_energy_in_gt", "median_energy_in_gt", "mean_gt_fraction"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    df = df.assign(fold=df["maps"].astype(str), maps=df["maps"].astype(str).map(
        lambda m: "fold" if fold_of(m) is not None else m))
    rows = []
    for key, g in df.groupby(["dataset", "arch", "maps", "target", "class_index", "class"], sort=True):
        e = pd.to_numeric(g["energy_in_gt"], errors="coerce").dropna()
        folds = sorted({fold_of(f) for f in g["fold"] if fold_of(f) is not None}, key=fold_sort_key)
        rows.append({**dict(zip(cols[:6], key)), "folds": " ".join(folds), "n_cases": int(len(e)),
                     "mean_energy_in_gt": float(e.mean()) if len(e) else np.nan,
                     "sd_energy_in_gt": float(e.std(ddof=1)) if len(e) > 1 else np.nan,
                     "median_energy_in_gt": float(e.median()) if len(e) else np.nan,
                     "mean_gt_fraction": float(pd.to_numeric(g["gt_fraction"], errors="coerce").mean())})
    return pd.DataFrame(rows, columns=cols)
