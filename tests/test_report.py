"""--all-folds gathering (mean ± SD over folds, missing folds) and the Table-3 reports."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medplan.evaluation.aggregate import evaluate_model, gather_all_folds, model_summary
from medplan.evaluation.report import latex, markdown, ranking, write_reports
from medplan.io import atomic_write_json, atomic_write_png
from medplan.plan import make_plan

# dataset -> (class names, n_folds), arch -> per-fold mDSC (None = fold missing)
DATA = {
    "CAMUS": (["LV", "LV wall", "LA"], {"unet": [0.891, 0.888, 0.894], "segformer": [0.915, 0.914, 0.916]}),
    "ISIC": (["lesion"], {"unet": [0.89, 0.88, None], "segformer": [0.913, 0.905, 0.92]}),
}


def fold_summary(mdsc: float, names: list[str], shift: float = 0.0) -> dict:
    per_class = {n: {"dice": mdsc + shift * (i - 1), "iou": None} for i, n in enumerate(names)}
    return {"mDSC": mdsc, "mIoU": mdsc - 0.1, "mRec": mdsc - 0.01, "mPrec": mdsc + 0.01, "n_cases": 10,
            "per_class": per_class, "at_input_size": {"mDSC": mdsc + 0.001, "mIoU": mdsc - 0.099,
                                                      "mRec": mdsc, "mPrec": mdsc, "per_class": per_class}}


def make_results(root: Path) -> Path:
    for dataset, (names, archs) in DATA.items():
        labels = {"background": 0, **{n: i for i, n in enumerate(names, start=1)}}
        for arch, values in archs.items():
            for k, v in enumerate(values):
                fold = root / dataset / arch / f"fold_{k}"
                plan = make_plan(dataset=dataset, labels=labels, split={"n_folds": 3}, input_size=[32, 32])
                atomic_write_json(fold / "config.json", {"plan": plan.to_json()})
                if v is not None:
                    atomic_write_json(fold / "validation" / "summary.json", fold_summary(v, names, 0.02))
    return root


def test_mean_and_sd_over_folds_with_missing_folds_reported(tmp_path):
    df = gather_all_folds(make_results(tmp_path))
    assert len(df) == 12  # 2 datasets x 2 archs x 3 expected folds, the missing one included
    missing = df[df["status"] == "missing"]
    assert missing[["dataset", "arch", "fold"]].values.tolist() == [["ISIC", "unet", 2]]
    s = model_summary(df).set_index(["dataset", "arch"])
    assert s.loc[("CAMUS", "unet"), "mean_mDSC"] == pytest.approx(np.mean([0.891, 0.888, 0.894]))
    assert s.loc[("CAMUS", "unet"), "sd_mDSC"] == pytest.approx(np.std([0.891, 0.888, 0.894], ddof=1))
    assert s.loc[("CAMUS", "unet"), "mean_dice_C3"] == pytest.approx(np.mean([0.891, 0.888, 0.894]) + 0.02)
    assert s.loc[("ISIC", "unet"), "mean_mDSC"] == pytest.approx(0.885)
    assert s.loc[("ISIC", "unet"), "folds"] == "2/3 folds; missing: 2"
    cv = evaluate_model("CAMUS", "segformer", results_root=tmp_path)
    saved = json.loads((tmp_path / "CAMUS" / "segformer" / "cv_summary.json").read_text())
    assert saved["mean"]["mDSC"] == pytest.approx(0.915) and saved["std"]["mDSC"] == pytest.approx(0.001)
    assert saved["mean"]["dice"]["LA"] == pytest.approx(0.935) and set(saved["folds"]) == {"0", "1", "2"}
    assert cv["n_available"] == 3 and cv["missing_folds"] == []
    at_input = gather_all_folds(tmp_path, at_input_size=True)
    assert at_input.loc[0, "mDSC"] == pytest.approx(df.loc[0, "mDSC"] + 0.001)


def test_reports_are_laid_out_like_table_3(tmp_path):
    df = gather_all_folds(make_results(tmp_path))
    paths = write_reports(df, tmp_path)
    names = sorted(p.name for p in paths)
    assert names == ["classwise_dice_CAMUS.png", "mdsc_bar.png", "ranking.csv", "summary.csv", "summary.md",
                     "summary.tex"]
    for p in paths:
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv = pd.read_csv(tmp_path / "summary.csv")
    assert len(csv) == 12 and {"dataset", "arch", "fold", "status", "mDSC", "dice_C3"} <= set(csv.columns)
    md = (tmp_path / "summary.md").read_text()
    assert "| CAMUS | segformer | **91.5±0.1** |" in md  # percent, one decimal, best in bold
    assert "| unet | 89.1±0.3 |" in md  # not the best: plain
    assert "| ISIC | segformer | **91.3±0.8** |" in md and "| –" in md  # binary: no class-wise columns
    assert "ISIC / unet: 2/3 folds; missing: 2" in md
    assert "CAMUS: C_1 - LV; C_2 - LV wall; C_3 - LA" in md
    # average-mDSC ranking: unet lacks a fold of ISIC, so it is listed after, unranked (issue 14 item 3)
    assert md.index("| 1 | segformer | 91.4 |") < md.index("| – | unet | 88.8 (not ranked: 2/2 datasets; ISIC 2/3 folds) |")
    tex = (tmp_path / "summary.tex").read_text()
    assert "\\toprule" in tex and "\\bottomrule" in tex and "\\textbf{91.5$\\pm$0.1}" in tex
    rank = pd.read_csv(tmp_path / "ranking.csv")
    assert rank["arch"].tolist() == ["segformer", "unet"] and rank["complete"].tolist() == [True, False]
    assert rank["rank"].iloc[0] == 1 and pd.isna(rank["rank"].iloc[1]) and rank["partial"].iloc[1] == "ISIC 2/3 folds"


def test_ranking_puts_incomplete_architectures_last():
    summary = pd.DataFrame([
        {"dataset": "A", "arch": "x", "mean_mDSC": 0.95}, {"dataset": "A", "arch": "y", "mean_mDSC": 0.80},
        {"dataset": "B", "arch": "y", "mean_mDSC": 0.82},
    ])
    r = ranking(summary)
    assert r["arch"].tolist() == ["y", "x"] and r["complete"].tolist() == [True, False]


def test_ties_are_all_marked_best():
    rows = [{"dataset": "D", "arch": a, "fold": f, "status": "ok", "n_folds": 2, "class_names": "fg",
             "mDSC": v, "mIoU": v, "mRec": v, "mPrec": v} for a, v in (("a", 0.9001), ("b", 0.9004)) for f in (0, 1)]
    md = markdown(pd.DataFrame(rows))
    assert md.count("**90.0±0.0**") == 8  # 2 architectures x 4 metrics, equal as printed: all bold


def test_recomputed_from_label_maps_when_summary_is_absent(tmp_path, monkeypatch):
    from medplan.cli.evaluate import main

    monkeypatch.setenv("MEDPLAN_RESULTS", str(tmp_path / "results"))
    raw = tmp_path / "raw" / "T"
    atomic_write_json(raw / "dataset.json", {"labels": {"background": 0, "fg": 1}})
    rng = np.random.default_rng(0)
    tp = fp = fn = 0
    for k in range(2):
        fold = tmp_path / "results" / "T" / "net" / f"fold_{k}"
        plan = make_plan(dataset="T", labels={"background": 0, "fg": 1}, split={"n_folds": 2}, input_size=[16, 16],
                         raw_dir=str(raw))
        atomic_write_json(fold / "config.json", {"val_cases": [f"c{k}"], "plan": plan.to_json()})
        gt = (rng.random((13, 21)) < 0.5).astype(np.uint8)
        pred = np.where(rng.random((13, 21)) < 0.2, 1 - gt, gt).astype(np.uint8)
        atomic_write_png(raw / "labels" / f"c{k}.png", gt)
        atomic_write_png(fold / "validation" / f"c{k}.png", pred)
        if k == 0:
            tp, fp, fn = int((pred & gt).sum()), int((pred & (1 - gt)).sum()), int(((1 - pred) & gt).sum())
    df = gather_all_folds(tmp_path / "results")
    assert df["source"].tolist() == ["recomputed", "recomputed"]
    assert df.loc[0, "mDSC"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert main(["--all-folds", "--no-plots", "--no-progress"]) == 0
    assert (tmp_path / "results" / "T" / "net" / "cv_summary.json").is_file()
    assert (tmp_path / "results" / "summary.md").is_file() and not (tmp_path / "results" / "mdsc_bar.png").exists()
    # an empty results folder is an error, not an empty report
    monkeypatch.setenv("MEDPLAN_RESULTS", str(tmp_path / "nothing"))
    (tmp_path / "nothing").mkdir()
    assert main(["--all-folds"]) == 2


def _rows(arch: str, values: list[float | None], n_folds: int = 5, dataset: str = "D") -> list[dict]:
    """Fold rows of one model; None = a missing fold."""
    out = []
    for k, v in enumerate(values):
        ok = v is not None
        out.append({"dataset": dataset, "arch": arch, "fold": k, "status": "ok" if ok else "missing",
                    "n_folds": n_folds, "class_names": "a|b", "mDSC": v, "mIoU": v, "mRec": v, "mPrec": v,
                    "dice_C1": v, "dice_C2": (None if (ok and k == 1 and arch == "full") else v)})
    return out


def test_a_partial_model_is_never_bold_ranked_or_complete():
    """Issue 14 item 3: a 1-of-5-fold model with the highest numbers is shown, not crowned."""
    df = pd.DataFrame(_rows("full", [0.80, 0.81, 0.79, 0.80, 0.82]) + _rows("one_fold", [0.95, None, None, None, None]))
    md = markdown(df)
    assert "| full | **80.4±1.1** |" in md and "**95.0" not in md
    assert "| one_fold | 95.0 |" in md and "partial: 1/5 folds; missing: 1, 2, 3, 4" in md
    assert "**80.2±1.3** †4/5" in md  # full's C_2 is absent from fold 1: averaged over 4 of its 5 folds
    rank = ranking(model_summary(df))
    assert rank["arch"].tolist() == ["full", "one_fold"] and rank["complete"].tolist() == [True, False]
    assert rank["rank"].iloc[0] == 1 and pd.isna(rank["rank"].iloc[1]) and rank["partial"].iloc[1] == "D 1/5 folds"
    tex = latex(df)
    assert "\\textbf{95.0" not in tex and "\\textbf{80.4$\\pm$1.1}" in tex
    assert "one\\_fold$^{*}$" in tex and "$^\\dagger$" in tex


def test_summary_tex_is_ready_to_input():
    df = pd.DataFrame(_rows("net_a", [0.8] * 5) + _rows("b&c", [0.7] * 5))
    tex = latex(df)
    body = [line for line in tex.splitlines() if not line.startswith("%")]
    assert tex.startswith("%") and "\\documentclass" not in tex and "\\begin{document}" not in tex
    assert body[0] == "\\begin{table}[t]" and body[-1] == "\\end{table}"
    assert tex.count("{") == tex.count("}")
    assert "net\\_a" in tex and "b\\&c" in tex and "\\usepackage{booktabs}" in tex
    assert all(ord(ch) < 128 for ch in "\n".join(body))  # plain ASCII: pdflatex takes it as it is


def test_bars_start_at_zero_and_partial_models_are_hatched():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medplan.evaluation.report import grouped_bars

    fig, ax = plt.subplots()
    try:
        grouped_bars(ax, ["D"], {"full": ([0.88], [0.01]), "one_fold": ([0.9], [float("nan")])},
                     {"full": [""], "one_fold": ["1/5 folds"]})
        assert ax.get_ylim() == (0, 100)
        hatches = [p.get_hatch() for p in ax.patches]
        assert hatches == [None, "///"] and [t.get_text() for t in ax.texts] == ["1/5 folds"]
        assert ax.get_legend_handles_labels()[1] == ["full", "one_fold (partial)"]
    finally:
        plt.close(fig)
