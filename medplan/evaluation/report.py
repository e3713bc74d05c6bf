"""Reports of a whole benchmark, laid out like the paper's Table 3.

Under the results folder: ``summary.csv`` (one row per dataset x architecture x fold, missing
folds included), ``summary.md`` and ``summary.tex`` (per dataset, one row per architecture:
mDSC, mIoU, mRec, mPrec and class-wise Dice as mean±SD in percent with one decimal, the best
value of each column in bold, the folds used), the cross-dataset average mDSC ranking of the
paper's section 3.1 (``ranking.csv`` and in the Markdown), and plots: ``mdsc_bar.png`` (mDSC ±
SD per architecture per dataset) and ``classwise_dice_DATASET.png``.

"Best" compares the values as printed (one decimal), so ties are all marked, and only among the
complete models (every expected fold evaluated): a model with missing folds is shown with its
folds, never marked best and never ranked beside the complete ones. A class averaged over fewer
folds than its model (absent from a fold's validation cases) carries a dagger and a note. Bars
start at zero. Class-wise
columns appear for datasets with more than one foreground class (for a binary task the one
class's Dice is the mDSC, as the paper's "–").
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from medplan import paths
from medplan.evaluation.aggregate import (METRICS, POSTPROCESSED, dice_column, gather_pointing_game, metric_columns,
                                         model_summary, pointing_game_summary)
from medplan.io import atomic_write_bytes

DASH = "–"


def pct(value: float) -> float:
    return round(float(value) * 100.0, 1)


def mean_sd(mean: float, sd: float, sep: str = "±") -> str:
    """``83.3±1.1`` (percent, one decimal); ``83.3`` with one fold; ``–`` when undefined."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return DASH
    if sd is None or (isinstance(sd, float) and math.isnan(sd)):
        return f"{pct(mean):.1f}"
    return f"{pct(mean):.1f}{sep}{pct(sd):.1f}"


def _n_foreground(summary_rows: pd.DataFrame) -> int:
    return max((len([n for n in str(s).split("|") if n]) for s in summary_rows["class_names"]), default=0)


def _table_columns(summary: pd.DataFrame) -> tuple[list[str], int]:
    """Metric columns shown (class-wise only where a dataset has >= 2 foreground classes)."""
    n_class = 0
    for _, g in summary.groupby("dataset"):
        k = _n_foreground(g)
        if k >= 2:
            n_class = max(n_class, k)
    pp = [POSTPROCESSED] if f"mean_{POSTPROCESSED}" in summary and summary[f"mean_{POSTPROCESSED}"].notna().any() else []
    return [METRICS[0], *pp, *METRICS[1:], *(dice_column(i) for i in range(1, n_class + 1))], n_class


PP_NOTE = ("mDSC pp: after nnU-Net's largest-component post-processing, chosen per class on the same folds "
           "(postprocessing.json; slightly optimistic), never marked best")


def _header(c: str) -> str:
    return "mDSC pp" if c == POSTPROCESSED else c if c in METRICS else f"C_{c[len('dice_C'):]}"


def is_complete(row: pd.Series | dict) -> bool:
    """Every expected fold of the model evaluated (rows without fold counts count as complete)."""
    if "complete" in row and pd.notna(row["complete"]):
        return bool(row["complete"])
    if "n_ok" in row and "n_expected" in row and pd.notna(row["n_ok"]):
        return int(row["n_ok"]) >= int(row["n_expected"])
    return True


def best_rows(g: pd.DataFrame, col: str) -> set[int]:
    """Row positions holding the best value of a column as printed (one decimal), among the
    complete models only: a partial model is never marked best."""
    key = f"mean_{col}"
    if key not in g or g[key].isna().all():
        return set()
    printed = [np.nan if pd.isna(v) or not is_complete(r) else pct(v) for v, (_, r) in zip(g[key], g.iterrows())]
    if all(math.isnan(v) for v in printed):
        return set()
    top = np.nanmax(printed)
    return {i for i, v in enumerate(printed) if v == top}



def fewer_folds(row: pd.Series | dict, col: str) -> int | None:
    """The folds a column was averaged over when fewer than the model's evaluated folds, else None."""
    n = row.get(f"n_{col}") if hasattr(row, "get") else None
    if n is None or pd.isna(n) or "n_ok" not in row or pd.isna(row["mean_" + col]):
        return None
    return int(n) if int(n) < int(row["n_ok"]) else None


def ranking(summary: pd.DataFrame) -> pd.DataFrame:
    """Average mDSC over datasets per architecture, best first (paper section 3.1).

    Only architectures with every fold of every dataset are ``complete`` and get a ``rank``; the
    others follow unranked (rank empty), their average taken over what they have
    (``n_datasets`` datasets; ``partial`` names the datasets with missing folds)."""
    datasets = sorted(summary["dataset"].unique())
    rows = []
    for arch, g in summary.groupby("arch"):
        values = {d: g.loc[g["dataset"] == d, "mean_mDSC"] for d in datasets}
        per = {d: (float(v.iloc[0]) if len(v) and pd.notna(v.iloc[0]) else np.nan) for d, v in values.items()}
        have = [v for v in per.values() if not math.isnan(v)]
        partial = [f"{r['dataset']} {int(r['n_ok'])}/{int(r['n_expected'])} folds" for _, r in g.iterrows()
                   if not is_complete(r)]
        rows.append({"arch": arch, "average_mDSC": float(np.mean(have)) if have else np.nan,
                     "n_datasets": len(have), "complete": len(have) == len(datasets) and not partial,
                     "partial": "; ".join(partial), **{f"mDSC_{d}": v for d, v in per.items()}})
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df = df.sort_values(["complete", "average_mDSC", "arch"], ascending=[False, False, True], na_position="last")
    n_complete = int(df["complete"].sum())
    df.insert(0, "rank", pd.array(list(range(1, n_complete + 1)) + [pd.NA] * (len(df) - n_complete), dtype="Int64"))
    return df.reset_index(drop=True)


def _footnote(summary: pd.DataFrame) -> list[str]:
    notes = []
    for dataset, g in summary.groupby("dataset"):
        names = [n for n in str(g["class_names"].iloc[0]).split("|") if n]
        if len(names) >= 2:
            notes.append(f"{dataset}: " + "; ".join(f"C_{i} - {n}" for i, n in enumerate(names, start=1)))
    return notes


def markdown(df: pd.DataFrame, title: str = "Cross-validation results") -> str:
    """Table 3 in Markdown, the mDSC ranking and the folds behind every number."""
    summary = model_summary(df)
    cols, n_class = _table_columns(summary)
    head = ["Dataset", "Model", *(_header(c) for c in cols), "Folds"]
    lines = [f"# {title}", "",
             "Mean±SD over folds (sample SD, ddof=1), in percent; best per dataset and column in **bold**, "
             "among the models with every fold (a model with missing folds is never marked best). "
             "† a class averaged over fewer folds than its model. "
             "Metrics: global micro-averaging over all pixels, background excluded.", "",
             "| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 3) + ["---"]) + "|"]
    for dataset, g in summary.groupby("dataset", sort=True):
        g = g.reset_index(drop=True)
        has_class = _n_foreground(g) >= 2
        best = {c: best_rows(g, c) if c != POSTPROCESSED else set() for c in cols}
        for i, r in g.iterrows():
            cells = [dataset if i == 0 else "", str(r["arch"])]
            for c in cols:
                if c.startswith("dice_C") and (not has_class or f"mean_{c}" not in r or pd.isna(r[f"mean_{c}"])):
                    cells.append(DASH)
                    continue
                text = mean_sd(r[f"mean_{c}"], r[f"sd_{c}"])
                text = f"**{text}**" if i in best[c] and text != DASH else text
                fewer = fewer_folds(r, c)
                cells.append(text if fewer is None else f"{text} †{fewer}/{int(r['n_expected'])}")
            cells.append(str(r["folds"]) if is_complete(r) else f"partial: {r['folds']}")
            lines.append("| " + " | ".join(cells) + " |")
    notes = _footnote(summary)
    if notes:
        lines += ["", "Class-wise Dice: " + " | ".join(notes)]
    if POSTPROCESSED in cols:
        lines += ["", PP_NOTE + "."]
    evaluated = sorted({str(v) for v in df.get("evaluated_at", pd.Series(dtype=str)) if isinstance(v, str) and v})
    sources = sorted({str(v) for v in df.get("source", pd.Series(dtype=str)) if isinstance(v, str) and v})
    if evaluated or sources:
        lines += ["", f"Evaluated at: {', '.join(evaluated) or '?'}; numbers from: {', '.join(sources) or '?'}."]
    rank = ranking(summary)
    if not rank.empty:
        datasets = sorted(summary["dataset"].unique())
        lines += ["", "## Average mDSC across datasets", "",
                  "| Rank | Model | Average mDSC | " + " | ".join(datasets) + " |",
                  "|---:|---|---:|" + "---:|" * len(datasets)]
        for _, r in rank.iterrows():
            avg = DASH if pd.isna(r["average_mDSC"]) else f"{pct(r['average_mDSC']):.1f}"
            if not r["complete"]:
                avg += f" (not ranked: {r['n_datasets']}/{len(datasets)} datasets" + \
                    (f"; {r['partial']})" if r["partial"] else ")")
            per = [DASH if pd.isna(r[f"mDSC_{d}"]) else f"{pct(r[f'mDSC_{d}']):.1f}" for d in datasets]
            place = DASH if pd.isna(r["rank"]) else str(r["rank"])
            lines.append(f"| {place} | {r['arch']} | {avg} | " + " | ".join(per) + " |")
    incomplete = summary[summary["n_ok"] < summary["n_expected"]]
    if not incomplete.empty:
        lines += ["", "## Missing folds", ""]
        lines += [f"- {r['dataset']} / {r['arch']}: {r['folds']}" for _, r in incomplete.iterrows()]
    return "\n".join(lines) + "\n"


_TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def tex_escape(text: str) -> str:
    return "".join(_TEX_SPECIAL.get(ch, ch) for ch in str(text))


def latex(df: pd.DataFrame, caption: str = "Per-dataset metrics (mean$\\pm$sample SD over folds, \\%; best per "
                                           "column in bold, among the models with every fold).") -> str:
    """Table 3 as a booktabs LaTeX table, ready to ``\\input`` (needs ``\\usepackage{booktabs}``)."""
    summary = model_summary(df)
    cols, n_class = _table_columns(summary)
    lines = ["% Table 3 written by medplan_evaluate --all-folds: \\input{summary.tex} in a document with",
             "% \\usepackage{booktabs}; values in percent, mean$\\pm$sample SD (ddof=1) over folds.",
             r"\begin{table}[t]", r"\centering", f"\\caption{{{caption}}}", r"\label{tab:cv-results}",
             r"\begin{tabular}{ll" + "r" * len(cols) + "}", r"\toprule"]
    n_metrics = len(cols) - n_class
    if n_class:
        lines.append(" & & \\multicolumn{%d}{c}{} & \\multicolumn{%d}{c}{Class-wise DSC} \\\\" % (n_metrics, n_class))
        lines.append(r"\cmidrule(lr){%d-%d}" % (3 + n_metrics, 2 + n_metrics + n_class))
    heads = [f"$C_{{{c[len('dice_C'):]}}}$" if c.startswith("dice_C") else _header(c) for c in cols]
    lines.append("Dataset & Model & " + " & ".join(heads) + r" \\")
    lines.append(r"\midrule")
    groups = list(summary.groupby("dataset", sort=True))
    for gi, (dataset, g) in enumerate(groups):
        g = g.reset_index(drop=True)
        has_class = _n_foreground(g) >= 2
        best = {c: best_rows(g, c) if c != POSTPROCESSED else set() for c in cols}
        for i, r in g.iterrows():
            arch = tex_escape(r["arch"]) + ("" if is_complete(r) else "$^{*}$")
            cells = [tex_escape(dataset) if i == 0 else "", arch]
            for c in cols:
                if c.startswith("dice_C") and (not has_class or f"mean_{c}" not in r or pd.isna(r[f"mean_{c}"])):
                    cells.append("--")
                    continue
                text = mean_sd(r[f"mean_{c}"], r[f"sd_{c}"], sep="$\\pm$")
                if text == DASH:
                    cells.append("--")
                else:
                    text = f"\\textbf{{{text}}}" if i in best[c] else text
                    fewer = fewer_folds(r, c)
                    cells.append(text if fewer is None else f"{text}$^\\dagger$")
            lines.append(" & ".join(cells) + r" \\")
        if gi < len(groups) - 1:
            lines.append(r"\midrule")
    lines += [r"\bottomrule", r"\end{tabular}"]
    notes = _footnote(summary)
    incomplete = summary[summary["n_ok"] < summary["n_expected"]]
    extra = [tex_escape(n) for n in notes] + ([tex_escape(PP_NOTE)] if POSTPROCESSED in cols else [])
    extra += ["$^{*}$ " + tex_escape(f"{r['dataset']} / {r['arch']}: {r['folds']} (partial, never marked best)")
              for _, r in incomplete.iterrows()]
    extra += ["$^\\dagger$ " + tex_escape(f"{r['dataset']} / {r['arch']} C_{c[len('dice_C'):]}: averaged over "
                                          f"{fewer_folds(r, c)}/{int(r['n_expected'])} folds")
              for _, r in summary.iterrows() for c in cols if fewer_folds(r, c) is not None]
    if extra:
        lines.append(r"\par\smallskip{\footnotesize " + r" \\ ".join(extra) + "}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- plots
def _png(fig) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return buf.getvalue()


def grouped_bars(ax, groups: Sequence[str], series: dict[str, tuple[list[float], list[float]]],
                 partial: dict[str, list[str]] | None = None) -> None:
    """Bars from zero, one group per ``groups`` entry; ``partial[label][j]`` (e.g. ``"2/5"``) draws
    bar j of a model with missing folds hatched and pale, its fold count written above it."""
    import matplotlib

    n = max(len(series), 1)
    width = 0.8 / n
    x = np.arange(len(groups))
    # 10 strong colours; 20 (in light/dark pairs) only when more models must be told apart
    colours = matplotlib.colormaps["tab10" if len(series) <= 10 else "tab20"].colors
    for i, (label, (means, sds)) in enumerate(series.items()):
        flags = (partial or {}).get(label) or [""] * len(means)
        heights = [pct(m) if not math.isnan(m) else 0 for m in means]
        xs = x - 0.4 + width * (i + 0.5)
        bars = ax.bar(xs, heights, width, yerr=[0 if math.isnan(s) else pct(s) for s in sds], capsize=2,
                      label=label + (" (partial)" if any(flags) else ""), color=colours[i % len(colours)])
        for bar, flag, h, xpos in zip(bars, flags, heights, xs):
            if flag:
                bar.set_hatch("///")
                bar.set_alpha(0.45)
                ax.text(xpos, 2, flag, ha="center", va="bottom", fontsize=6, rotation=90)  # inside, at its foot
    ax.set_xticks(x)
    ax.set_xticklabels(groups)
    ax.set_ylim(0, 100)  # from zero: a gap of 2 points looks like 2 points
    ax.grid(axis="y", alpha=0.3)


def partial_flag(row: pd.Series | dict) -> str:
    """``"2/5 folds"`` for a model with missing folds, ``""`` for a complete one."""
    return "" if is_complete(row) else f"{int(row['n_ok'])}/{int(row['n_expected'])} folds"


def plot_mdsc(summary: pd.DataFrame) -> bytes:
    """Bar chart: mDSC ± SD per architecture, grouped by dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted(summary["dataset"].unique())
    archs = sorted(summary["arch"].unique())
    series, partial = {}, {}
    for arch in archs:
        rows = [summary[(summary["dataset"] == d) & (summary["arch"] == arch)] for d in datasets]
        series[arch] = ([float(r["mean_mDSC"].iloc[0]) if len(r) else np.nan for r in rows],
                        [float(r["sd_mDSC"].iloc[0]) if len(r) else np.nan for r in rows])
        partial[arch] = [partial_flag(r.iloc[0]) if len(r) else "" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(datasets) * max(1, len(archs)) / 3), 4))
    grouped_bars(ax, datasets, series, partial)
    ax.set_ylabel("mDSC (%)")
    ax.set_title("mDSC (mean ± sample SD over folds; hatched: missing folds)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    try:
        return _png(fig)
    finally:
        plt.close(fig)


def plot_classwise(summary: pd.DataFrame, dataset: str) -> bytes:
    """Bar chart: class-wise Dice ± SD per architecture on one dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = summary[summary["dataset"] == dataset]
    names = [n for n in str(g["class_names"].iloc[0]).split("|") if n]
    series, partial = {}, {}
    for _, r in g.iterrows():
        series[str(r["arch"])] = ([float(r.get(f"mean_{dice_column(i)}", np.nan)) for i in range(1, len(names) + 1)],
                                  [float(r.get(f"sd_{dice_column(i)}", np.nan)) for i in range(1, len(names) + 1)])
        partial[str(r["arch"])] = [partial_flag(r)] * len(names)
    fig, ax = plt.subplots(figsize=(max(6, 1.0 * len(names) * max(1, len(series)) / 3), 4))
    grouped_bars(ax, [f"C_{i}: {n}" for i, n in enumerate(names, start=1)], series, partial)
    ax.set_ylabel("Dice (%)")
    ax.set_title(f"{dataset}: class-wise Dice (mean ± SD over folds)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    try:
        return _png(fig)
    finally:
        plt.close(fig)


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def write_reports(df: pd.DataFrame, results_root: str | Path | None = None, *, suffix: str = "",
                  plots: bool = True) -> list[Path]:
    """Write summary.csv/.md/.tex, ranking.csv and the plots under ``results_root``; returns the paths.

    ``suffix`` (e.g. ``"_at_input_size"``) keeps reports of another evaluation beside these.
    """
    root = paths.results_root(results_root)
    root.mkdir(parents=True, exist_ok=True)
    order = df["fold"].map(lambda f: int(f) if str(f).isdigit() else 10**6)
    df = df.assign(_order=order).sort_values(["dataset", "arch", "_order"]).drop(columns="_order").reset_index(drop=True)
    summary = model_summary(df)
    written: list[tuple[Path, bytes]] = []
    csv = df.copy()
    if "n_cases" in csv:
        csv["n_cases"] = csv["n_cases"].astype("Int64")
    for c in metric_columns(csv):
        csv[c] = csv[c].map(lambda v: "" if pd.isna(v) else round(float(v), 6))
    written.append((root / f"summary{suffix}.csv", csv.to_csv(index=False).encode()))
    written.append((root / f"summary{suffix}.md", markdown(df).encode()))
    written.append((root / f"summary{suffix}.tex", latex(df).encode()))
    written.append((root / f"ranking{suffix}.csv", ranking(summary).to_csv(index=False).encode()))
    written += pointing_game_reports(root, suffix, written)
    if plots:
        written.append((root / f"mdsc_bar{suffix}.png", plot_mdsc(summary)))
        for dataset in sorted(summary["dataset"].unique()):
            g = summary[summary["dataset"] == dataset]
            if _n_foreground(g) >= 2:
                written.append((root / f"classwise_dice_{_safe(dataset)}{suffix}.png", plot_classwise(summary, dataset)))
    # every report is rendered before the first is written: an error leaves the old set intact
    for path, data in written:
        atomic_write_bytes(path, data)
    return [p for p, _ in written]


def format_table(df: pd.DataFrame) -> str:
    """A plain-text table for the console: one line per dataset x architecture."""
    summary = model_summary(df)
    cols, _ = _table_columns(summary)
    head = ["dataset", "arch", *[c.replace("dice_", "") for c in cols], "folds"]
    rows = []
    for _, r in summary.iterrows():
        has_class = len([n for n in str(r["class_names"]).split("|") if n]) >= 2
        rows.append([str(r["dataset"]), str(r["arch"]),
                     *[DASH if c.startswith("dice_C") and not has_class else
                       mean_sd(r.get(f"mean_{c}", np.nan), r.get(f"sd_{c}", np.nan)) for c in cols], str(r["folds"])])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows]
    return "\n".join(out)



def format_folds(df: pd.DataFrame) -> str:
    """Per-fold values for the console (percent, one decimal; ``missing`` for absent folds)."""
    cols = [c for c in metric_columns(df) if c in METRICS]
    lines = []
    for _, r in df.iterrows():
        head = f"{r['dataset']}  {r['arch']}  fold {r['fold']}: "
        if r["status"] != "ok":
            lines.append(head + "missing")
            continue
        values = "  ".join(f"{c} {DASH if pd.isna(r[c]) else f'{pct(r[c]):.1f}'}" for c in cols)
        n = "" if pd.isna(r.get("n_cases")) else f"  ({int(r['n_cases'])} cases, {r['source']})"
        lines.append(head + values + n)
    return "\n".join(lines)


# ---------------------------------------------------------------------------- pointing game (medplan_explain)
def pointing_game_markdown(summary: pd.DataFrame) -> str:
    """A Markdown section: per dataset, architecture and class, the share of Grad-CAM energy in the GT."""
    if summary.empty:
        return ""
    lines = ["", "## Grad-CAM energy inside the ground truth (pointing game)", "",
             "Mean±SD over explained cases, in percent (`medplan_explain`); chance = the class's share of the image.",
             "", "| Dataset | Model | Maps | Target | Class | Cases | Energy in GT | Median | Chance |",
             "|---|---|---|---|---|---:|---:|---:|---:|"]
    for _, r in summary.iterrows():
        maps = f"folds {r['folds']}" if r["maps"] == "fold" else str(r["maps"])
        lines.append(f"| {r['dataset']} | {r['arch']} | {maps} | {r['target']} | C_{r['class_index']}: {r['class']} "
                     f"| {r['n_cases']} | {mean_sd(r['mean_energy_in_gt'], r['sd_energy_in_gt'])} "
                     f"| {mean_sd(r['median_energy_in_gt'], None)} | {mean_sd(r['mean_gt_fraction'], None)} |")
    return "\n".join(lines) + "\n"


def pointing_game_reports(root: Path, suffix: str, written: list[tuple[Path, bytes]]) -> list[tuple[Path, bytes]]:
    """``pointing_game.csv`` and a section appended to ``summary{suffix}.md`` when explain maps exist."""
    summary = pointing_game_summary(gather_pointing_game(root))
    if summary.empty:
        return []
    md_path = root / f"summary{suffix}.md"
    for i, (path, data) in enumerate(written):
        if path == md_path:
            written[i] = (path, data + pointing_game_markdown(summary).encode())
    return [(root / f"pointing_game{suffix}.csv", summary.to_csv(index=False).encode())]
