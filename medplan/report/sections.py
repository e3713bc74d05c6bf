"""The report's sections as plain data for the template: Table 3 and the ranking, per-dataset
figures and paired comparisons, runs, cases, data cards, efficiency, provenance.

Each function returns what its part of ``index.html`` shows (None or empty where its data is
absent: the template leaves the section out). Numbers keep full precision in ``value`` (the
sort key, and what the tests compare with ``summary.csv``); ``text`` is what is printed.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from medplan.errors import MedplanError
from medplan.evaluation.aggregate import METRICS, POSTPROCESSED, dice_column
from medplan.evaluation.compare import compare_tables
from medplan.evaluation.report import DASH, best_rows, fewer_folds, is_complete, mean_sd, partial_flag, pct, ranking
from medplan.report.collect import Study, digest
from medplan.report.figures import Figures, bar_data

#: bootstrap resamples of each paired comparison in the report (``medplan_evaluate --compare``: 10000)
REPORT_N_BOOT = 2000


def _value(v: Any) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) or pd.isna(v) else float(v)


def _safe(name: str) -> str:
    return "".join(ch if ch.isascii() and (ch.isalnum() or ch in "-_.") else "_" for ch in str(name))


# ---------------------------------------------------------------------------- Table 3 and the ranking
def table3(study: Study) -> list[dict[str, Any]]:
    """Per dataset: one row per model, mean ± SD per column, best among complete models marked,
    partial models and classes averaged over fewer folds flagged."""
    out = []
    for dataset in study.datasets:
        g = study.summary[study.summary["dataset"] == dataset].reset_index(drop=True)
        names = study.class_names(dataset)
        pp = [POSTPROCESSED] if f"mean_{POSTPROCESSED}" in g and g[f"mean_{POSTPROCESSED}"].notna().any() else []
        metrics = [METRICS[0], *pp, *METRICS[1:]]  # post-processed mDSC beside the raw one, never best
        cols = metrics + ([dice_column(i) for i in range(1, len(names) + 1)] if len(names) >= 2 else [])
        labels = [("mDSC pp" if c == POSTPROCESSED else c) for c in metrics] + \
            [f"C{i}: {n}" for i, n in enumerate(names, start=1)][:len(cols) - len(metrics)]
        best = {c: best_rows(g, c) if c != POSTPROCESSED else set() for c in cols}
        rows = []
        for i, r in g.iterrows():
            cells = []
            for c in cols:
                mean, sd = r.get(f"mean_{c}"), r.get(f"sd_{c}")
                fewer = fewer_folds(r, c)
                cells.append({"text": mean_sd(mean, sd), "value": _value(mean), "sd": _value(sd),
                              "best": i in best[c], "fewer": fewer, "column": c})
            rows.append({"arch": r["arch"], "complete": is_complete(r), "folds": r["folds"],
                         "n_ok": int(r["n_ok"]), "n_expected": int(r["n_expected"]),
                         "missing": [str(f) for f in r["missing"]], "cells": cells})
        out.append({"dataset": dataset, "columns": [{"key": c, "label": lab} for c, lab in zip(cols, labels)],
                    "rows": rows, "id": _safe(dataset)})
    return out


def ranking_section(study: Study) -> dict[str, Any] | None:
    rank = ranking(study.summary)
    if rank.empty or len(study.datasets) < 1:
        return None
    rows = []
    for _, r in rank.iterrows():
        rows.append({"rank": None if pd.isna(r["rank"]) else int(r["rank"]), "arch": r["arch"],
                     "average": _value(r["average_mDSC"]), "complete": bool(r["complete"]),
                     "partial": r["partial"], "n_datasets": int(r["n_datasets"]),
                     "per": [{"value": _value(r[f"mDSC_{d}"]),
                              "text": DASH if pd.isna(r[f"mDSC_{d}"]) else f"{pct(r[f'mDSC_{d}']):.1f}"}
                             for d in study.datasets]})
    return {"datasets": study.datasets, "rows": rows}


# ---------------------------------------------------------------------------- per dataset
def overview_figures(study: Study, figs: Figures) -> dict[str, Any]:
    """mDSC of every model on every dataset (bars from zero, partial hatched)."""
    s = study.summary
    archs = sorted(s["arch"].unique())
    series, partial = {}, {}
    for arch in archs:
        rows = [s[(s["dataset"] == d) & (s["arch"] == arch)] for d in study.datasets]
        series[arch] = ([_value(r["mean_mDSC"].iloc[0]) if len(r) else None for r in rows],
                        [_value(r["sd_mDSC"].iloc[0]) if len(r) else None for r in rows])
        partial[arch] = [partial_flag(r.iloc[0]) if len(r) else "" for r in rows]
    return {"mdsc": figs.add("mdsc_bar", "bars", bar_data("mDSC, mean ± sample SD over folds (hatched: missing "
                                                           "folds)", "mDSC (%)", study.datasets, series, partial))}


def dataset_figures(study: Study, dataset: str, figs: Figures) -> dict[str, Any]:
    """Class-wise Dice with error bars (multi-class datasets) and the per-fold dot plot."""
    g = study.summary[study.summary["dataset"] == dataset]
    names = study.class_names(dataset)
    out: dict[str, Any] = {}
    if len(names) >= 2:
        series, partial = {}, {}
        for _, r in g.iterrows():
            series[str(r["arch"])] = ([_value(r.get(f"mean_{dice_column(i)}")) for i in range(1, len(names) + 1)],
                                      [_value(r.get(f"sd_{dice_column(i)}")) for i in range(1, len(names) + 1)])
            partial[str(r["arch"])] = [partial_flag(r)] * len(names)
        out["classwise"] = figs.add(f"classwise_{_safe(dataset)}", "bars", bar_data(
            f"{dataset}: class-wise Dice, mean ± sample SD", "Dice (%)",
            [f"C{i}: {n}" for i, n in enumerate(names, start=1)], series, partial))
    t = study.table[study.table["dataset"] == dataset]
    models = []
    for arch in study.archs(dataset):
        rows = t[t["arch"] == arch]
        r = g[g["arch"] == arch].iloc[0]
        models.append({"arch": arch, "values": [_value(v) for v in rows.loc[rows["status"] == "ok", "mDSC"]],
                       "partial": partial_flag(r)})
    out["dots"] = figs.add(f"folds_{_safe(dataset)}", "fold_dots",
                           {"title": f"{dataset}: mDSC of each fold (hollow: missing folds)", "models": models})
    return out


def comparisons(study: Study, dataset: str, tables: dict[str, pd.DataFrame | None], cache: dict[str, Any],
                used: dict[str, Any]) -> dict[str, Any] | None:
    """Every pair of models: per-case mDSC difference, bootstrap 95% CI, Wilcoxon p (a matrix).

    ``cache`` (the last build's) maps a hash of the two per-case columns to the result, so a
    rebuild recomputes only the pairs whose cases changed; ``used`` receives this build's."""
    archs = [a for a in study.archs(dataset) if tables.get(a) is not None]
    if len(archs) < 2:
        return None
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    for i, a in enumerate(archs):
        for b in archs[i + 1:]:
            ta, tb = tables[a], tables[b]
            key = digest(["cmp", REPORT_N_BOOT, ta[["fold", "case_id", "mDSC"]].to_numpy().tolist(),
                          tb[["fold", "case_id", "mDSC"]].to_numpy().tolist()])
            res = cache.get(key)
            if res is None:
                try:
                    full = compare_tables(ta, tb, dataset, a, b, n_boot=REPORT_N_BOOT, seed=0)
                    res = {k: full[k] for k in ("mean_difference", "ci95", "wilcoxon_p", "n_cases", "conclusion")}
                except MedplanError as exc:
                    res = {"error": str(exc)}
            used[key] = res
            cells[(a, b)] = res
    rows = []
    for a in archs:
        row = []
        for b in archs:
            if a == b:
                row.append(None)
                continue
            res = cells.get((a, b)) or cells.get((b, a))
            sign = 1 if (a, b) in cells else -1
            if "error" in res:
                row.append({"text": "n/a", "title": res["error"], "kind": "na"})
                continue
            d, (lo, hi), p = sign * res["mean_difference"], res["ci95"], res["wilcoxon_p"]
            lo, hi = (lo, hi) if sign == 1 else (-hi, -lo)
            sig = p < 0.05 and (lo > 0 or hi < 0)
            row.append({"text": f"{100 * d:+.1f}", "ci": f"[{100 * lo:+.1f}, {100 * hi:+.1f}]", "p": f"{p:.2g}",
                        "kind": ("better" if d > 0 else "worse") if sig else "none", "n": res["n_cases"],
                        "title": f"{a} - {b}: {res['conclusion']}"})
        rows.append({"arch": a, "cells": row})
    return {"archs": archs, "rows": rows, "n_boot": REPORT_N_BOOT}


# ---------------------------------------------------------------------------- efficiency
def efficiency_section(study: Study, rows: list[dict[str, Any]], figs: Figures) -> dict[str, Any] | None:
    """The efficiency table and the quality-versus-cost scatter (mean mDSC over datasets)."""
    if not rows:
        return None
    rank = {r["arch"]: r for _, r in ranking(study.summary).iterrows()}
    points, table = [], []
    use_gmacs = any(r.get("gmacs") for r in rows)
    for r in rows:
        q = rank.get(r["arch"])
        quality = _value(q["average_mDSC"]) if q is not None else None
        table.append({**r, "mDSC": quality, "complete": bool(q["complete"]) if q is not None else False})
        x = r.get("gmacs") if use_gmacs else r.get("infer_img_s")
        if quality is not None and x:
            points.append({"arch": r["arch"], "x": float(x), "y": quality,
                           "partial": "" if q["complete"] else "partial"})
    out: dict[str, Any] = {"rows": table}
    if points:
        out["scatter"] = figs.add("quality_vs_cost", "cost", {
            "points": points, "title": "Quality against cost (hollow: missing folds or datasets)",
            "xlabel": "GMACs per image" if use_gmacs else "inference images/s", "log_x": True})
    return out


def fmt(v: Any, spec: str) -> str:
    """A number for a table cell (``–`` when absent)."""
    if v is None or (isinstance(v, float) and (math.isnan(v) or np.isinf(v))):
        return DASH
    try:
        return format(float(v), spec)
    except (TypeError, ValueError):
        return str(v)
