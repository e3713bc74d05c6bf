"""Is a gap between two architectures real? Paired per-case statistics, and the worst cases.

:func:`paired_comparison` pairs the per-case mDSC of two models on the same validation cases
(the folds both have) and reports the Wilcoxon signed-rank test (``scipy.stats.wilcoxon``,
two-sided, zero differences dropped as in Wilcoxon's original method) and a percentile
bootstrap 95% confidence interval of the mean difference over cases (seeded, vectorised).
A 0.2-point gap in Table 3 whose interval spans 0 is not evidence of a better model.

Per-case values come from each fold's ``validation/summary.json`` (``per_case``, written by
the trainer with the metric definitions of :mod:`medplan.metrics`) or, with
``recompute=True`` or when a fold has label maps but no per-case block, from the label maps.

:func:`worst_cases` writes ``fold_K/worst_cases.csv``: the N validation cases with the lowest
per-case mDSC (the paper's "50 worst per fold", the input of a Grad-CAM study).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from medplan import paths
from medplan.errors import MedplanError
from medplan.evaluation.aggregate import fold_sort_key, is_model_dir, model_path, model_plan
from medplan.evaluation.evaluate import evaluate_fold
from medplan.io import atomic_write_bytes, atomic_write_json
from medplan.names import check_fold, check_name, inside
from medplan.plan import Plan
from medplan.rundir import FOLD_PREFIX, RunDir, fold_dirs

#: per fold, the n worst validation cases (read by medplan_explain --worst)
WORST_CASES = "worst_cases.csv"


def _per_case_of_fold(run: RunDir, plan: Plan | None, recompute: bool) -> dict[str, dict] | None:
    summary = run.summary(required=False) if not recompute else None
    per_case = summary.get("per_case") if isinstance(summary, dict) else None
    if isinstance(per_case, dict) and per_case:
        return per_case
    if run.has_predictions():
        return evaluate_fold(run.path, plan)["per_case"]
    return None


def per_case_table(dataset: str, arch: str, *, folds: Sequence[int | str] | None = None,
                   results_root: str | Path | None = None, recompute: bool = False) -> pd.DataFrame:
    """One row per validation case of every available fold: fold, case_id, mDSC, mIoU, mRec,
    mPrec and ``dice:<class>`` columns."""
    model_dir = model_path(results_root, dataset, arch)
    if not is_model_dir(model_dir):
        raise MedplanError("no fold_K/ folders: not a trained model folder", model_dir)
    plan = model_plan(model_dir, dataset)
    runs = ([RunDir(model_dir / f"{FOLD_PREFIX}{check_fold(f)}") for f in folds] if folds else
            fold_dirs(model_dir, numbered=True))
    rows = []
    for run in runs:
        per_case = _per_case_of_fold(run, plan, recompute) if run.path.is_dir() else None
        if per_case is None:
            if folds:
                raise MedplanError("fold has no validation results", run.summary_path)
            continue
        for case_id, values in per_case.items():
            row: dict[str, Any] = {"fold": run.fold, "case_id": case_id}
            row.update({m: np.nan if values.get(m) is None else float(values[m]) for m in ("mDSC", "mIoU", "mRec", "mPrec")})
            for name, d in (values.get("dice") or {}).items():
                row[f"dice:{name}"] = np.nan if d is None else float(d)
            rows.append(row)
    if not rows:
        raise MedplanError("no fold with validation results (fold_K/validation/summary.json or label maps)", model_dir)
    return pd.DataFrame(rows)


def bootstrap_ci(diff: np.ndarray, *, n_boot: int = 10000, seed: int = 0, level: float = 0.95,
                 chunk: int = 1000) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``diff`` (cases resampled with replacement)."""
    diff = np.asarray(diff, dtype=np.float64)
    if diff.size == 0:
        raise MedplanError("bootstrap of an empty set of cases")
    if n_boot < 1:
        raise MedplanError(f"n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for start in range(0, n_boot, chunk):  # bounded memory: chunk x n indices at a time
        m = min(chunk, n_boot - start)
        means[start:start + m] = diff[rng.integers(0, diff.size, size=(m, diff.size))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def wilcoxon_test(diff: np.ndarray) -> tuple[float, float | None]:
    """(p-value, statistic) of the two-sided Wilcoxon signed-rank test; p = 1 when every
    difference is zero (nothing distinguishes the models)."""
    from scipy.stats import wilcoxon

    diff = np.asarray(diff, dtype=np.float64)
    if not np.any(diff != 0):
        return 1.0, None
    res = wilcoxon(diff, zero_method="wilcox", alternative="two-sided")
    return float(res.pvalue), float(res.statistic)


def paired_comparison(dataset: str, arch_a: str, arch_b: str, *, n_boot: int = 10000, seed: int = 0,
                      folds: Sequence[int | str] | None = None, metric: str = "mDSC",
                      results_root: str | Path | None = None, recompute: bool = False) -> dict[str, Any]:
    """Per-case ``metric`` of ``arch_a`` minus ``arch_b`` on the cases both evaluated.

    Returns means, the mean and median difference (in the metric's units, fractions), the
    bootstrap 95% CI of the mean difference, the Wilcoxon p-value, win/loss/tie counts and
    the cases that could not be paired; ``"cases"`` holds the per-case DataFrame.
    """
    if arch_a == arch_b:
        raise MedplanError(f"compare two different architectures, got {arch_a!r} twice")
    a = per_case_table(dataset, arch_a, folds=folds, results_root=results_root, recompute=recompute)
    b = per_case_table(dataset, arch_b, folds=folds, results_root=results_root, recompute=recompute)
    return compare_tables(a, b, dataset, arch_a, arch_b, n_boot=n_boot, seed=seed, metric=metric)


def compare_tables(a: pd.DataFrame, b: pd.DataFrame, dataset: str, arch_a: str, arch_b: str, *, n_boot: int = 10000,
                   seed: int = 0, metric: str = "mDSC") -> dict[str, Any]:
    """:func:`paired_comparison` of two :func:`per_case_table` results already in memory (the web
    report compares every pair of a dataset's models and reads each table once)."""
    if metric not in a.columns or metric not in b.columns:
        raise MedplanError(f"unknown per-case metric {metric!r} (mDSC, mIoU, mRec, mPrec)")
    if a["case_id"].duplicated().any() or b["case_id"].duplicated().any():
        raise MedplanError(f"a case appears in more than one fold of {dataset} (check the splits)")
    both = a[["fold", "case_id", metric]].merge(b[["fold", "case_id", metric]], on="case_id", suffixes=("_a", "_b"))
    both = both.dropna(subset=[f"{metric}_a", f"{metric}_b"])
    if both.empty:
        raise MedplanError(f"{arch_a} and {arch_b} share no evaluated case on {dataset}")
    if (both["fold_a"] != both["fold_b"]).any():
        raise MedplanError(f"{arch_a} and {arch_b} were validated on different splits of {dataset}; "
                           "compare models of the same splits")
    both = both.rename(columns={"fold_a": "fold", f"{metric}_a": arch_a, f"{metric}_b": arch_b}).drop(columns="fold_b")
    diff = (both[arch_a] - both[arch_b]).to_numpy()
    both["difference"] = diff
    p, stat = wilcoxon_test(diff)
    lo, hi = bootstrap_ci(diff, n_boot=n_boot, seed=seed)
    ids_a, ids_b = set(a["case_id"]), set(b["case_id"])
    excludes_zero = lo > 0 or hi < 0
    if excludes_zero and p < 0.05:
        verdict = f"{arch_a if diff.mean() > 0 else arch_b} is better on {dataset} (p < 0.05, CI excludes 0)"
    elif excludes_zero or p < 0.05:
        verdict = f"weak evidence of a difference on {dataset} (only one of Wilcoxon p < 0.05 / CI excluding 0)"
    else:
        verdict = f"no evidence of a difference between {arch_a} and {arch_b} on {dataset}"
    return {
        "dataset": dataset, "arch_a": arch_a, "arch_b": arch_b, "metric": f"per-case {metric}",
        "folds": sorted(both["fold"].unique().tolist(), key=fold_sort_key),
        "n_cases": int(len(both)),
        "mean_a": float(both[arch_a].mean()), "mean_b": float(both[arch_b].mean()),
        "mean_difference": float(diff.mean()), "median_difference": float(np.median(diff)),
        "ci95": [lo, hi], "bootstrap": {"n_boot": int(n_boot), "seed": int(seed), "method": "percentile"},
        "wilcoxon_p": p, "wilcoxon_statistic": stat,
        "n_a_better": int((diff > 0).sum()), "n_b_better": int((diff < 0).sum()), "n_ties": int((diff == 0).sum()),
        "n_only_a": len(ids_a - ids_b), "n_only_b": len(ids_b - ids_a),
        "conclusion": verdict,
        "cases": both.sort_values("difference").reset_index(drop=True),
    }


def write_comparison(result: dict[str, Any], results_root: str | Path | None = None) -> list[Path]:
    """``DATASET/compare_A_vs_B.json`` (the statistics) and ``..._cases.csv`` (per-case values)."""
    root = paths.results_root(results_root)
    a, b = check_name(result["arch_a"], "architecture name"), check_name(result["arch_b"], "architecture name")
    base = root / check_name(result["dataset"], "dataset name") / f"compare_{a}_vs_{b}"
    inside(root, base)
    json_path, csv_path = base.with_suffix(".json"), Path(f"{base}_cases.csv")
    atomic_write_bytes(csv_path, result["cases"].to_csv(index=False).encode())
    atomic_write_json(json_path, {k: v for k, v in result.items() if k != "cases"})
    return [json_path, csv_path]


def format_comparison(result: dict[str, Any]) -> str:
    a, b = result["arch_a"], result["arch_b"]
    lo, hi = result["ci95"]
    p = result["wilcoxon_p"]
    return "\n".join([
        f"{result['dataset']}: {a} vs {b}, {result['metric']} on {result['n_cases']} paired cases "
        f"(folds {', '.join(map(str, result['folds']))})",
        f"  mean {a} {100 * result['mean_a']:.2f}%   {b} {100 * result['mean_b']:.2f}%",
        f"  difference ({a} - {b}): mean {100 * result['mean_difference']:+.2f} points, "
        f"95% bootstrap CI [{100 * lo:+.2f}, {100 * hi:+.2f}], median {100 * result['median_difference']:+.2f}",
        f"  Wilcoxon signed-rank p = {p:.3g};  {a} better on {result['n_a_better']}, {b} better on "
        f"{result['n_b_better']}, ties {result['n_ties']}"
        + (f";  unpaired cases: {result['n_only_a']} only {a}, {result['n_only_b']} only {b}"
           if result["n_only_a"] or result["n_only_b"] else ""),
        f"  -> {result['conclusion']}",
    ])


def worst_cases(dataset: str, arch: str, n: int = 50, *, folds: Sequence[int | str] | None = None,
                results_root: str | Path | None = None, recompute: bool = False) -> list[Path]:
    """Write ``fold_K/worst_cases.csv`` (the ``n`` lowest per-case mDSC of each fold, worst first)."""
    if n < 1:
        raise MedplanError(f"--worst must be >= 1, got {n}")
    table = per_case_table(dataset, arch, folds=folds, results_root=results_root, recompute=recompute)
    model_dir = model_path(results_root, dataset, arch)
    outputs: list[tuple[Path, bytes]] = []
    for fold, g in sorted(table.groupby("fold"), key=lambda kv: fold_sort_key(kv[0])):
        worst = g.sort_values(["mDSC", "case_id"], na_position="first").head(n).drop(columns="fold")
        worst.insert(0, "rank", range(1, len(worst) + 1))
        outputs.append((RunDir(model_dir / f"{FOLD_PREFIX}{fold}").file(WORST_CASES), worst.to_csv(index=False).encode()))
    for path, data in outputs:
        atomic_write_bytes(path, data)
    return [p for p, _ in outputs]


def common_worst_cases(dataset: str, archs: Iterable[str], n: int = 50, *, results_root: str | Path | None = None,
                       recompute: bool = False) -> pd.DataFrame:
    """Cases hard for every architecture: per fold, the ``n`` cases with the lowest mean
    per-case mDSC across ``archs`` (the paper picked its Grad-CAM examples among these)."""
    tables = []
    for arch in archs:
        t = per_case_table(dataset, arch, results_root=results_root, recompute=recompute)
        tables.append(t[["fold", "case_id", "mDSC"]].rename(columns={"mDSC": arch}))
    merged = tables[0]
    for t in tables[1:]:
        merged = merged.merge(t, on=["fold", "case_id"])
    archs = [c for c in merged.columns if c not in ("fold", "case_id")]
    merged["mean_mDSC"] = merged[archs].mean(axis=1)
    parts = [g.sort_values(["mean_mDSC", "case_id"]).head(n) for _, g in merged.groupby("fold")]
    return pd.concat(parts, ignore_index=True) if parts else merged
