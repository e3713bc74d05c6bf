"""What the web report shows, read from the results tree (and the plan stage's files) only.

Nothing here trains, predicts or imports a download: a section whose files are absent is left
out. Every reader returns plain data (dicts, lists, DataFrames) for :mod:`medplan.report.build`.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medplan.datasets import load_raw_index
from medplan.datasets.writer import AUTO_IMPORT_FOLDER
from medplan.duplicates import read_duplicates_csv
from medplan.errors import MedplanError
from medplan.evaluation.aggregate import fold_sort_key, model_plan, model_summary
from medplan.evaluation.compare import WORST_CASES, per_case_table
from medplan.fingerprint import DUPLICATES_FILE, FINGERPRINT_FILE
from medplan.io import read_json
from medplan.paths import preprocessed_dir, raw_root
from medplan.plan import Plan
from medplan.rundir import FOLD_PREFIX, LR_SEARCH_SUMMARY, fold_dirs

#: written by the study's report task (``medplan.study.model.REPORT_STATE``; the study sits above)
STUDY_STATE = "study_report.json"
#: written by ``medplan_models --measure`` (``medplan.architectures.measure.EFFICIENCY_FILE``)
EFFICIENCY = "efficiency.json"
#: DATASET/explain_grid (``medplan.explain.command.GRID_DIR``)
EXPLAIN_GRID = "explain_grid"


@dataclass
class Study:
    """The fold table of every model and what each dataset's rows share."""

    root: Path
    table: pd.DataFrame                       # gather_all_folds: one row per expected fold
    summary: pd.DataFrame = field(init=False)  # model_summary: one row per dataset x arch

    def __post_init__(self) -> None:
        self.summary = model_summary(self.table)

    @property
    def datasets(self) -> list[str]:
        return sorted(self.summary["dataset"].unique())

    def archs(self, dataset: str) -> list[str]:
        return sorted(self.summary.loc[self.summary["dataset"] == dataset, "arch"])

    def class_names(self, dataset: str) -> list[str]:
        g = self.summary[self.summary["dataset"] == dataset]
        return [n for n in str(g["class_names"].iloc[0]).split("|") if n] if len(g) else []

    def model_dir(self, dataset: str, arch: str) -> Path:
        return self.root / dataset / arch


def digest(obj: Any) -> str:
    """A short stable hash of JSON-able data (what a figure or a comparison was made from)."""
    text = json.dumps(obj, sort_keys=True, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if np.isnan(f) else f


# ---------------------------------------------------------------------------- runs
def learning_curves(model_dir: Path) -> list[dict[str, Any]]:
    """Per fold: epochs, train loss, validation mIoU, LR from metrics.jsonl, the best epoch (the
    weights validated) and the epoch it stopped at when early stopping ended it before its budget."""
    out = []
    for run in fold_dirs(model_dir):
        try:
            history = run.metrics()
            budget = run.config().get("epochs")
        except (MedplanError, ValueError, OSError):
            continue  # an unreadable record leaves its curve out, not the report
        if not history:
            continue
        epochs = [int(r.get("epoch", i + 1)) for i, r in enumerate(history)]
        best = [e for e, r in zip(epochs, history) if r.get("best")]
        last = epochs[-1]
        out.append({"fold": run.fold, "epoch": epochs,
                    "train_loss": [_num(r.get("train_loss")) for r in history],
                    "val_mIoU": [_num(r.get("val_mIoU")) for r in history],
                    "lr": [_num(r.get("lr")) for r in history],
                    "best_epoch": best[-1] if best else None, "budget": budget,
                    "stopped_epoch": last if isinstance(budget, int) and last < budget else None})
    return out


def lr_search(model_dir: Path) -> dict[str, Any] | None:
    """``ARCH/lr_search.json`` as rows (LR, best validation mIoU, chosen), or None."""
    path = model_dir / LR_SEARCH_SUMMARY
    if not path.is_file():
        return None
    try:
        data = read_json(path)
        rows = [{"lr": tag, "val_mIoU": _num(v), "best": False} for tag, v in (data.get("results") or {}).items()]
        best = max((r for r in rows if r["val_mIoU"] is not None), key=lambda r: r["val_mIoU"], default=None)
    except (MedplanError, AttributeError):
        return None
    if best is not None:
        best["best"] = True
    return {"rows": rows, "epochs": data.get("epochs"), "fold": data.get("fold"), "best_lr": data.get("best_lr"),
            "monitor": data.get("monitor", "val_mIoU")}


def per_case(study: Study, dataset: str, arch: str) -> pd.DataFrame | None:
    """Per-case metrics of every available fold (None when no fold has any)."""
    try:
        return per_case_table(dataset, arch, results_root=study.root)
    except MedplanError:
        return None


def worst_cases(model_dir: Path, cases: pd.DataFrame | None, n: int) -> list[dict[str, Any]]:
    """Per fold the ``n`` lowest per-case mDSC: ``fold_K/worst_cases.csv`` where evaluate wrote it,
    else from the per-case table."""
    out = []
    for run in fold_dirs(model_dir, numbered=True):
        path = run.file(WORST_CASES)
        rows = None
        if path.is_file():
            try:
                rows = pd.read_csv(path, dtype={"case_id": str}).head(n)
            except (ValueError, OSError):
                rows = None
        if rows is None and cases is not None:
            g = cases[cases["fold"].astype(str) == str(run.fold)]
            rows = g.sort_values(["mDSC", "case_id"], na_position="first").head(n)
        if rows is None:
            continue
        for _, r in rows.iterrows():
            out.append({"fold": str(run.fold), "case_id": str(r["case_id"]), "mDSC": _num(r.get("mDSC")),
                        "prediction": run.validation / f"{r['case_id']}.png"})
    return out


# ---------------------------------------------------------------------------- the data
def raw_folder(dataset: str, plan: Plan | None) -> Path | None:
    """The raw dataset folder when one is there (never imports a download: the report only reads)."""
    candidates = [Path(plan.raw_dir)] if plan is not None and plan.raw_dir else []
    candidates += [raw_root() / dataset, raw_root() / dataset / AUTO_IMPORT_FOLDER]
    return next((c for c in candidates if (c / "dataset.json").is_file()), None)


def raw_paths(folder: Path | None) -> tuple[dict[str, Path], dict[str, Path]]:
    """(image paths, label paths) by case id; empty when the folder is absent or unreadable."""
    if folder is None:
        return {}, {}
    try:
        index = load_raw_index(folder)
    except MedplanError:
        return {}, {}
    return dict(index.image_paths), dict(index.label_paths)


def data_card(study: Study, dataset: str, max_pairs: int = 24) -> dict[str, Any]:
    """The fingerprint, the plan's decisions with their reasons and the duplicates found."""
    plan = None
    for arch in study.archs(dataset):
        plan = model_plan(study.model_dir(dataset, arch), dataset)
        if plan is not None:
            break
    folder = preprocessed_dir(dataset)
    fingerprint = None
    if (folder / FINGERPRINT_FILE).is_file():
        try:
            fingerprint = read_json(folder / FINGERPRINT_FILE)
        except MedplanError:
            fingerprint = None
    duplicates = []
    if (folder / DUPLICATES_FILE).is_file():
        try:
            duplicates = read_duplicates_csv(folder / DUPLICATES_FILE)[:max_pairs]
        except (MedplanError, KeyError, ValueError):
            duplicates = []
    decisions = []
    if plan is not None:
        for key, value in plan.to_json().items():
            if key in ("reasons", "excluded_cases"):
                continue
            decisions.append({"key": key, "value": json.dumps(value, default=str)[:300], "reason": plan.reason(key)})
        extra = [{"key": k, "value": "", "reason": v} for k, v in plan.reasons.items() if "." in k]
        decisions += extra
    return {"plan": plan, "decisions": decisions, "fingerprint": fingerprint, "duplicates": duplicates,
            "raw": raw_folder(dataset, plan), "n_excluded": len(plan.excluded_cases) if plan is not None else 0}


def fingerprint_rows(fp: dict[str, Any] | None) -> list[tuple[str, str]]:
    """The fingerprint facts a reader checks first, as (name, value) text."""
    if not fp:
        return []
    labels = fp.get("labels") or {}
    share = labels.get("pixel_share") or {}
    presence = labels.get("presence") or {}
    groups = fp.get("groups") or {}
    sizes = fp.get("sizes") or {}
    rows = [("cases (kept / found)", f"{fp.get('num_kept')} / {fp.get('num_cases')}"),
            ("modality", str(fp.get("modality"))), ("channels (stored / seen)",
                                                     f"{fp.get('channels')} / {fp.get('channels_seen')}"),
            ("sizes (median, min, max)", f"{sizes.get('median')}, {sizes.get('min')}, {sizes.get('max')}; "
                                         f"{sizes.get('n_unique')} distinct"),
            ("label pixel share", ", ".join(f"{k} {100 * float(v):.1f}%" for k, v in share.items())),
            ("label presence (cases)", ", ".join(f"{k} {100 * float(v):.0f}%" for k, v in presence.items())),
            ("groups", f"column {groups.get('column')!r}: {groups.get('n_groups')} groups, at most "
                       f"{groups.get('max_cases_per_group')} cases each"),
            ("duplicates", str((fp.get("duplicates") or {}).get("summary", "")))]
    return [(k, v) for k, v in rows if v and v != "None"]


# ---------------------------------------------------------------------------- efficiency and provenance
def efficiency(root: Path) -> list[dict[str, Any]]:
    """Per architecture: params (M), GMACs, train/inference images/s, peak memory, device: the
    study report's rows (with GMACs) where a study ran, else ``efficiency.json``'s measurements."""
    state = root / STUDY_STATE
    if state.is_file():
        try:
            rows = read_json(state).get("efficiency") or []
            if rows:
                return [dict(r) for r in rows if isinstance(r, dict) and r.get("arch")]
        except (MedplanError, AttributeError):
            pass
    path = root / EFFICIENCY
    if not path.is_file():
        return []
    try:
        models = read_json(path).get("models") or {}
    except (MedplanError, AttributeError):
        return []
    return [{"arch": arch, "params_m": (m.get("params_total") or 0) / 1e6 or None, "gmacs": m.get("gmacs"),
             "size": "x".join(map(str, m.get("size") or [])), "train_img_s": m.get("train_images_per_s"),
             "infer_img_s": m.get("infer_images_per_s"), "peak_mem_mb": m.get("peak_memory_mb"),
             "device": m.get("device")} for arch, m in sorted(models.items())]


def provenance(model_dir: Path) -> dict[str, Any] | None:
    """What the folds' config.json record: trainer, versions, command lines, plan hashes, seeds,
    devices and the trainer's deviations from the shared protocol (None without any config)."""
    folds = []
    for run in fold_dirs(model_dir):
        try:
            cfg = run.config()
        except MedplanError:
            continue
        if not cfg:
            continue
        plan = cfg.get("plan")
        folds.append({"fold": run.fold, "trainer": cfg.get("trainer"), "created": cfg.get("created"),
                      "command_line": " ".join(map(str, cfg.get("command_line") or [])),
                      "versions": ", ".join(f"{k} {v}" for k, v in (cfg.get("versions") or {}).items() if v),
                      "plan_hash": digest(plan)[:12] if isinstance(plan, dict) else None, "seed": cfg.get("seed"),
                      "device": " ".join(str(x) for x in (cfg.get("device"), cfg.get("device_name")) if x),
                      "lr": cfg.get("lr"), "lr_source": cfg.get("lr_source"),
                      "git_commit": (cfg.get("git_commit") or "")[:12] or None,
                      "deviations": [str(d) for d in cfg.get("deviations") or []]})
    if not folds:
        return None
    deviations = sorted({d for f in folds for d in f["deviations"]})
    return {"folds": folds, "deviations": deviations,
            "plan_hashes": sorted({f["plan_hash"] for f in folds if f["plan_hash"]}),
            "seeds": sorted({str(f["seed"]) for f in folds if f["seed"] is not None}, key=fold_sort_key)}


def explain_outputs(model_dir: Path) -> list[dict[str, Any]]:
    """Each ``fold_K/explain`` / ``explain_mean`` folder with its cases (panel PNG, mDSC)."""
    out = []
    for folder in sorted([*model_dir.glob(f"{FOLD_PREFIX}*/explain"), model_dir / "explain_mean"]):
        path = folder / "cases.csv"
        if not path.is_file():
            continue
        try:
            cases = pd.read_csv(path, dtype={"case_id": str})
        except (ValueError, OSError):
            continue
        rows = [{"case_id": str(r["case_id"]), "mDSC": _num(r.get("mDSC")), "panel": folder / str(r["panel"])}
                for _, r in cases.iterrows() if (folder / str(r.get("panel", ""))).is_file()]
        if rows:
            maps = folder.parent.name if folder.name == "explain" else "mean over folds"
            out.append({"maps": maps, "cases": sorted(rows, key=lambda r: (r["mDSC"] is None, r["mDSC"] or 0))})
    return out


def explain_grids(root: Path, dataset: str) -> list[Path]:
    folder = root / dataset / EXPLAIN_GRID
    return sorted(folder.glob("*.png")) if folder.is_dir() else []

