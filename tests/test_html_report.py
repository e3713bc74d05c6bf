"""The web report (issue 14): rendered for a synthetic results tree of 2 datasets x 3 architectures
x 5 folds with one fold missing and one class absent from a fold, and checked from its HTML."""
from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

from medplan.evaluation.aggregate import gather_all_folds
from medplan.evaluation.report import write_reports
from medplan.io import atomic_write_json, read_json
from medplan.report import build_report
from medplan.report.synthetic import make_results_tree

MISSING = ("CAMUS", "ukan", 3)
ABSENT = ("CAMUS", "unet", 2, "LA")


class Page(HTMLParser):
    """Every element's attributes, the Table-3 cells and the text of each table row."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.cells: dict[tuple[str, str, str], dict[str, str]] = {}
        self.rows: dict[tuple[str, str], dict[str, str]] = {}
        self.text: dict[tuple[str, str], str] = {}
        self.dataset = self.arch = self.column = None
        self.ranking_rows: list[str] = []
        self._in_ranking = False
        self._row_text: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("src", "href"):
            if a.get(key):
                self.links.append(a[key])
        if tag == "table":
            self.dataset = a.get("data-dataset") if "table3" in (a.get("class") or "") else None
            self._in_ranking = "ranking" in (a.get("class") or "")
        if tag == "tr":
            self._row_text = []
            if self.dataset and a.get("data-arch"):
                self.arch = a["data-arch"]
                self.rows[(self.dataset, self.arch)] = a
        if tag == "td" and self.dataset and self.arch and a.get("data-column"):
            self.column = a["data-column"]
            self.cells[(self.dataset, self.arch, self.column)] = {**a, "text": ""}

    def handle_endtag(self, tag):
        if tag == "td":
            self.column = None
        if tag == "tr" and self._row_text is not None:
            text = " ".join(" ".join(self._row_text).split())
            if self.dataset and self.arch:
                self.text[(self.dataset, self.arch)] = text
            if self._in_ranking:
                self.ranking_rows.append(text)
            self._row_text = None
            self.arch = None
        if tag == "table":
            self.dataset = None
            self._in_ranking = False

    def handle_data(self, data):
        if self._row_text is not None:
            self._row_text.append(data)
        if self.column and self.dataset and self.arch:
            self.cells[(self.dataset, self.arch, self.column)]["text"] += data


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDPLAN_RAW", str(tmp / "raw"))
        mp.setenv("MEDPLAN_PREPROCESSED", str(tmp / "preprocessed"))
        mp.setenv("MEDPLAN_RESULTS", str(tmp / "results"))
        make_results_tree(tmp / "results", raw=tmp / "raw", preprocessed=tmp / "preprocessed", missing=[MISSING],
                          absent=[ABSENT], cases_per_fold=4, epochs=8, size=24)
        df = gather_all_folds(tmp / "results")
        write_reports(df, tmp / "results")
        index = build_report(tmp / "results", table=df, num_workers=0)
        page = Page()
        page.feed(index.read_text(encoding="utf-8"))
        yield {"root": tmp / "results", "index": index, "page": page, "html": index.read_text(encoding="utf-8"),
               "tmp": tmp, "mp": mp}


def test_table3_values_equal_summary_csv(report):
    csv = pd.read_csv(report["root"] / "summary.csv")
    ok = csv[csv["status"] == "ok"]
    page = report["page"]
    checked = 0
    for (dataset, arch), g in ok.groupby(["dataset", "arch"]):
        for column in ("mDSC", "mIoU", "mRec", "mPrec", "dice_C1", "dice_C3"):
            values = g[column].dropna() if column in g else pd.Series(dtype=float)
            cell = page.cells.get((dataset, arch, column))
            if dataset == "ISIC" and column.startswith("dice_"):
                assert cell is None  # one foreground class: no class-wise columns, as in the paper
                continue
            assert float(cell["data-value"]) == pytest.approx(values.mean(), abs=1e-6)
            assert float(cell["data-sd"]) == pytest.approx(values.std(ddof=1), abs=1e-6)
            assert cell["text"].startswith(f"{100 * values.mean():.1f}±")
            checked += 1
    assert checked == 3 * 6 + 3 * 4


def test_missing_fold_shown_and_never_marked_best(report):
    page, (dataset, arch, _) = report["page"], MISSING
    row = page.rows[(dataset, arch)]
    assert row["class"] == "partial"
    assert "partial: 4/5 folds; missing: 3" in page.text[(dataset, arch)]
    # the partial model has the highest mDSC of CAMUS in the synthetic tree, yet is not marked best
    values = {a: float(page.cells[(dataset, a, "mDSC")]["data-value"]) for a in ("segformer", "unet", "ukan")}
    assert max(values, key=values.get) == "ukan"
    assert "best" not in page.cells[(dataset, "ukan", "mDSC")]["class"]
    assert "best" in page.cells[(dataset, "unet", "mDSC")]["class"]
    assert "No metrics.jsonl for fold 3." in report["html"]
    ranked = [r for r in page.ranking_rows if "ukan" in r]
    assert ranked and ranked[0].startswith("– ukan") and "not ranked" in ranked[0] and "CAMUS 4/5 folds" in ranked[0]


def test_class_absent_from_a_fold_is_flagged(report):
    dataset, arch, _, _ = ABSENT
    cell = report["page"].cells[(dataset, arch, "dice_C3")]
    assert "†4/5" in cell["text"]
    assert "†" not in report["page"].cells[(dataset, arch, "dice_C1")]["text"]
    assert "sample" in report["html"] and "ddof = 1" in report["html"]


def test_every_link_resolves_inside_the_report_folder(report):
    folder = report["index"].parent
    links = [link for link in report["page"].links if not link.startswith(("#", "data:"))]
    assert len(links) > 30
    for link in links:
        assert "://" not in link and not link.startswith("/"), link  # nothing from the network, nothing absolute
        assert (folder / link).is_file(), link
        assert (folder / link).resolve().is_relative_to(folder.resolve()), link
    html = report["html"]
    for section in ("table3", "ranking", "datasets", "runs", "cases", "data", "efficiency", "provenance"):
        assert f'<section id="{section}">' in html
    # data card: the plan's reasons, the planted duplicate pair with its distance, a strip of it
    assert "dup0 ↔ c0_00: phash, distance 2" in html
    assert any(link.startswith("img/duplicates/CAMUS/") for link in links)
    assert any(link.startswith("img/cases/CAMUS/unet/") for link in links)  # worst-case strips
    assert any(link.startswith("img/explain/") for link in links)  # the Grad-CAM panel
    assert "poly LR schedule" in html and "medplan_train -d CAMUS -a unet -f 0" in html
    assert "epoch 5" in html  # fold 1 stopped early (budget 8)


def test_every_plot_also_as_pdf_and_svg_at_column_width(report):
    folder = report["index"].parent / "figures"
    pngs = sorted(folder.glob("*.png"))
    assert {p.stem for p in pngs} >= {"mdsc_bar", "classwise_CAMUS", "folds_CAMUS", "folds_ISIC", "quality_vs_cost",
                                      "curves_CAMUS_unet"}
    for png in pngs:
        pdf, svg = png.with_suffix(".pdf"), png.with_suffix(".svg")
        assert pdf.read_bytes()[:5] == b"%PDF-"
        head = svg.read_text()[:2000]
        width = float(re.search(r'<svg[^>]*width="([0-9.]+)pt"', head).group(1))
        assert width <= 3.5 * 72 * 1.25, (png.name, width)  # a column, plus the legend's overhang at most


def test_incremental_rebuild_redraws_only_what_changed(report):
    root = report["root"]
    build_report(root, num_workers=0)
    last = read_json(root / "report" / "cache.json")["last_build"]
    assert last == {"figures_drawn": [], "pictures_made": 0, "comparisons_computed": 0}
    path = root / "ISIC" / "segformer" / "fold_0" / "validation" / "summary.json"
    summary = read_json(path)
    summary["mDSC"] = 0.5
    first = next(iter(summary["per_case"]))
    summary["per_case"][first]["mDSC"] = 0.1
    atomic_write_json(path, summary)
    build_report(root, num_workers=0)
    last = read_json(root / "report" / "cache.json")["last_build"]
    assert set(last["figures_drawn"]) == {"mdsc_bar", "folds_ISIC", "quality_vs_cost"}
    assert last["comparisons_computed"] == 2  # segformer against each other ISIC model


def test_report_without_optional_data_leaves_sections_out(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDPLAN_RAW", str(tmp_path / "raw"))
    monkeypatch.setenv("MEDPLAN_PREPROCESSED", str(tmp_path / "pre"))
    root = tmp_path / "results"
    for k, v in enumerate([0.8, 0.82]):
        atomic_write_json(root / "D" / "net" / f"fold_{k}" / "validation" / "summary.json",
                          {"mDSC": v, "mIoU": v, "mRec": v, "mPrec": v, "n_cases": 3,
                           "per_class": {"fg": {"dice": v}}})
    html = build_report(root, num_workers=0).read_text()
    assert '<section id="table3">' in html and '<section id="runs">' not in html
    assert '<section id="efficiency">' not in html and '<section id="cases">' not in html
    assert "No fingerprint.json" in html
    assert json.loads((root / "report" / "figures" / "manifest.json").read_text())  # figures still drawn
    assert np.isfinite(float(re.search(r'data-column="mDSC" data-value="([0-9.]+)"', html).group(1)))
