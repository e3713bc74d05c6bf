"""``$MEDPLAN_RESULTS/report/index.html``: the study as one page that opens from the file system.

Everything it shows sits beside it (``figures/`` PNG + PDF + SVG, ``img/`` case strips,
duplicate pairs and Grad-CAM copies) or inline (CSS, the sorting script): no CDN, no server.
The HTML comes from jinja2 templates (``medplan/report/templates``), the plots from
matplotlib (:mod:`medplan.report.figures`).

A rebuild is incremental: figures are keyed by a hash of their data, pictures by their source
files, paired comparisons by the per-case values behind them (``report/cache.json``); only
what changed is redrawn or recomputed, and the page itself is always rewritten.
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pandas as pd

import medplan
from medplan import paths
from medplan.errors import MedplanError
from medplan.evaluation.aggregate import gather_all_folds, gather_pointing_game, pointing_game_summary
from medplan.evaluation.report import DASH, mean_sd, pct
from medplan.io import atomic_write_json, atomic_write_text, read_json
from medplan.report import collect
from medplan.report.figures import Figures
from medplan.report.images import Pictures, case_strip, pair_strip
from medplan.report.sections import (comparisons, dataset_figures, efficiency_section, fmt, overview_figures,
                                     ranking_section, table3)

REPORT_DIR = "report"
INDEX = "index.html"
CACHE = "cache.json"
TEMPLATES = Path(__file__).resolve().parent / "templates"


def _safe(name: str) -> str:
    return "".join(ch if ch.isascii() and (ch.isalnum() or ch in "-_.") else "_" for ch in str(name))


def _environment():
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = fmt
    env.filters["pct"] = lambda v: DASH if v is None else f"{pct(v):.1f}"
    env.filters["mean_sd"] = mean_sd
    return env


def _read_cache(out: Path, incremental: bool) -> dict[str, Any]:
    cache: dict[str, Any] = {"comparisons": {}, "pictures": {}}
    if incremental and (out / CACHE).is_file():
        try:
            old = read_json(out / CACHE)
            cache.update({k: dict(old.get(k) or {}) for k in cache})
        except (MedplanError, AttributeError):
            pass  # a damaged cache only costs a full rebuild
    return cache


def _runs(study: collect.Study, dataset: str, figs: Figures) -> list[dict[str, Any]]:
    """Per model: the learning curves of every fold, the folds without a record, the LR search."""
    out = []
    t = study.table[study.table["dataset"] == dataset]
    for arch in study.archs(dataset):
        mdir = study.model_dir(dataset, arch)
        curves = collect.learning_curves(mdir)
        expected = [str(f) for f in t.loc[t["arch"] == arch, "fold"]]
        have = {c["fold"] for c in curves}
        entry: dict[str, Any] = {"arch": arch, "without_curve": [f for f in expected if f not in have],
                                 "folds": [{"fold": c["fold"], "best_epoch": c["best_epoch"], "epochs": len(c["epoch"]),
                                            "budget": c["budget"], "stopped_epoch": c["stopped_epoch"]}
                                           for c in curves],
                                 "lr_search": collect.lr_search(mdir), "curves": None}
        if curves:
            entry["curves"] = figs.add(f"curves_{_safe(dataset)}_{_safe(arch)}", "curves", {
                "title": f"{dataset} / {arch}: every fold (dot: best epoch; dashed: early stop)", "folds": curves})
        if curves or entry["lr_search"]:
            out.append(entry)
    return out


def _cases(study: collect.Study, dataset: str, tables: dict[str, pd.DataFrame | None],
           images: dict[str, Path], labels: dict[str, Path], pics: Pictures, worst: int) -> list[dict[str, Any]]:
    """Per model: the worst cases of each fold as image / GT / prediction strips, and Grad-CAM panels."""
    out = []
    for arch in study.archs(dataset):
        mdir = study.model_dir(dataset, arch)
        strips = []
        for c in collect.worst_cases(mdir, tables.get(arch), worst):
            cid = c["case_id"]
            if cid not in images or cid not in labels:
                continue
            name = f"cases/{_safe(dataset)}/{_safe(arch)}/fold_{_safe(c['fold'])}_{_safe(cid)}.png"
            src = pics.strip(name, [images[cid], labels[cid], c["prediction"]],
                             lambda c=c, cid=cid: case_strip(images[cid], labels[cid], c["prediction"]))
            if src:
                strips.append({**c, "src": src})
        explained = []
        for block in collect.explain_outputs(mdir):
            panels = []
            for case in block["cases"][:worst * 5]:
                name = f"explain/{_safe(dataset)}/{_safe(arch)}/{_safe(block['maps'])}/{case['panel'].name}"
                src = pics.copy(name, case["panel"])
                if src:
                    panels.append({**case, "src": src})
            if panels:
                explained.append({"maps": block["maps"], "panels": panels})
        if strips or explained:
            out.append({"arch": arch, "strips": strips, "explain": explained})
    return out


def _data_card(study: collect.Study, dataset: str, pics: Pictures) -> dict[str, Any]:
    card = collect.data_card(study, dataset)
    images, _ = collect.raw_paths(card["raw"])
    pairs = []
    for d in card["duplicates"]:
        entry = {"case_id": d.case_id, "kept": d.kept_case_id, "reason": d.reason, "distance": d.distance,
                 "decision": d.decision, "src": None}
        if d.case_id in images and d.kept_case_id in images:
            name = f"duplicates/{_safe(dataset)}/{_safe(d.case_id)}__{_safe(d.kept_case_id)}.png"
            entry["src"] = pics.strip(name, [images[d.case_id], images[d.kept_case_id]],
                                      lambda d=d: pair_strip(images[d.case_id], images[d.kept_case_id]))
        pairs.append(entry)
    return {"fingerprint": collect.fingerprint_rows(card["fingerprint"]), "decisions": card["decisions"],
            "duplicates": pairs, "n_excluded": card["n_excluded"], "has_fingerprint": card["fingerprint"] is not None,
            "raw": card["raw"]}


def _pointing(root: Path, dataset: str) -> list[dict[str, Any]]:
    try:
        summary = pointing_game_summary(gather_pointing_game(root, datasets=[dataset]))
    except MedplanError:
        return []
    return [{**r, "energy": mean_sd(r["mean_energy_in_gt"], r["sd_energy_in_gt"]),
             "median": mean_sd(r["median_energy_in_gt"], None), "chance": mean_sd(r["mean_gt_fraction"], None)}
            for r in summary.to_dict("records")]


def n_computed(used: dict[str, Any], old: dict[str, Any]) -> int:
    """Comparisons of this build that were not in the last build's cache."""
    return sum(k not in old for k in used)


def build_report(results_root: str | Path | None = None, *, incremental: bool = True,
                 table: pd.DataFrame | None = None, worst_per_fold: int = 2, num_workers: int | None = None) -> Path:
    """Write ``RESULTS/report/index.html`` (and its figures and pictures); returns its path.

    ``table`` is :func:`medplan.evaluation.aggregate.gather_all_folds`'s result when the caller
    has it (``medplan_evaluate --all-folds``); otherwise the folds are gathered here.
    ``incremental=False`` redraws every figure and recomputes every comparison."""
    root = paths.results_root(results_root)
    if table is None:
        table = gather_all_folds(root)
    if table.empty:
        raise MedplanError("no folds to report", root)
    study = collect.Study(root, table)
    out = root / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    cache = _read_cache(out, incremental)
    figs = Figures(out / "figures", incremental)
    pics = Pictures(out / "img", cache["pictures"] if incremental else None)
    cmp_cache = cache["comparisons"] if incremental else {}
    used_cmp: dict[str, Any] = {}
    datasets = []
    for dataset in study.datasets:
        tables = {a: collect.per_case(study, dataset, a) for a in study.archs(dataset)}
        card = _data_card(study, dataset, pics)
        images, labels = collect.raw_paths(card.pop("raw"))
        matrix = comparisons(study, dataset, tables, cmp_cache, used_cmp)
        datasets.append({
            "name": dataset, "id": _safe(dataset), "class_names": study.class_names(dataset),
            "figures": dataset_figures(study, dataset, figs), "comparisons": matrix,
            "runs": _runs(study, dataset, figs), "cases": _cases(study, dataset, tables, images, labels, pics,
                                                                 worst_per_fold),
            "grids": [pics.copy(f"explain/{_safe(dataset)}/grid/{p.name}", p) for p in collect.explain_grids(root,
                                                                                                       dataset)],
            "pointing": _pointing(root, dataset), "card": card,
            "provenance": [{"arch": a, **p} for a in study.archs(dataset)
                           if (p := collect.provenance(study.model_dir(dataset, a))) is not None]})
    context = {
        "title": f"medplan study report: {', '.join(study.datasets)}",
        "created": dt.datetime.now().isoformat(timespec="seconds"), "version": medplan.__version__,
        "root": str(root), "table3": table3(study), "ranking": ranking_section(study),
        "overview": overview_figures(study, figs), "datasets": datasets,
        "efficiency": efficiency_section(study, collect.efficiency(root), figs),
        "missing": [{"dataset": r["dataset"], "arch": r["arch"], "folds": r["folds"]}
                    for _, r in study.summary.iterrows() if r["n_ok"] < r["n_expected"]],
    }
    figs.draw(num_workers)
    pics.prune()
    html = _environment().get_template("index.html.j2").render(**context)
    atomic_write_text(out / INDEX, html)
    atomic_write_json(out / CACHE, {"comparisons": used_cmp, "pictures": pics.keys,
                                    "last_build": {"figures_drawn": sorted(figs.drawn), "pictures_made": pics.made,
                                                   "comparisons_computed": n_computed(used_cmp, cmp_cache)}})
    return out / INDEX
