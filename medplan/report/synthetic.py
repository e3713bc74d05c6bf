"""A synthetic results tree with every file the report reads, for its tests and its benchmark.

Folds carry ``config.json`` (plan and provenance), ``metrics.jsonl`` (some folds stopped
early), ``validation/summary.json`` with per-case values and, with ``raw``, the label maps;
the raw dataset, ``fingerprint.json`` / ``duplicates.csv`` (one planted duplicate pair), an LR
search, a Grad-CAM output and the study's efficiency rows complete it. Deterministic for a seed.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from medplan.io import atomic_write_bytes, atomic_write_json, atomic_write_png, atomic_write_text, read_image
from medplan.plan import make_plan
from medplan.rundir import write_metrics

DEFAULT_DATASETS = (("CAMUS", ("LV", "LV wall", "LA")), ("ISIC", ("lesion",)))
DEFAULT_ARCHS = ("segformer", "unet", "ukan")


def _label_map(rng: np.random.Generator, size: int, n_classes: int) -> np.ndarray:
    """Nested discs, one ring per class (class k inside class k-1)."""
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(0.35, 0.65, 2) * size
    r = np.hypot(yy - cy, xx - cx)
    out = np.zeros((size, size), np.uint8)
    for k in range(1, n_classes + 1):
        out[r < size * (0.42 - 0.1 * (k - 1))] = k
    return out


def _raw(raw_dir: Path, dataset: str, names: Sequence[str], case_ids: list[str], size: int,
         rng: np.random.Generator) -> dict[str, np.ndarray]:
    labels = {}
    for cid in case_ids:
        lab = _label_map(rng, size, len(names))
        img = (60 + 50 * lab + rng.normal(0, 12, lab.shape)).clip(0, 255).astype(np.uint8)
        atomic_write_png(raw_dir / "images" / f"{cid}.png", img)
        atomic_write_png(raw_dir / "labels" / f"{cid}.png", lab)
        labels[cid] = lab
    atomic_write_text(raw_dir / "cases.csv", "case_id\n" + "".join(f"{c}\n" for c in case_ids))
    atomic_write_json(raw_dir / "dataset.json", {"name": dataset, "channels": 1, "modality": "gray",
                                                 "labels": {"background": 0, **{n: i for i, n in
                                                                                enumerate(names, start=1)}}})
    return labels


def _history(rng: np.random.Generator, epochs: int, final: float, stop: int | None) -> list[dict[str, Any]]:
    n = stop or epochs
    rows, best = [], -1.0
    for e in range(1, n + 1):
        miou = final * (1 - math.exp(-e / max(1, epochs / 4))) + rng.normal(0, 0.005)
        improved = miou > best
        best = max(best, miou)
        rows.append({"epoch": e, "train_loss": 1.2 * math.exp(-e / max(1, epochs / 3)) + 0.05, "val_loss": 0.5,
                     "val_mIoU": miou, "val_mDSC": min(1.0, miou + 0.08),
                     "lr": 1e-4 * 0.5 * (1 + math.cos(math.pi * (e - 1) / epochs)), "epoch_time": 1.0,
                     "best": improved})
    return rows


def make_results_tree(results: str | Path, *, raw: str | Path | None = None, preprocessed: str | Path | None = None,
                      datasets: Sequence[tuple[str, Sequence[str]]] = DEFAULT_DATASETS,
                      archs: Sequence[str] = DEFAULT_ARCHS, n_folds: int = 5, cases_per_fold: int = 4,
                      epochs: int = 12, size: int = 32, missing: Iterable[tuple[str, str, int]] = (),
                      absent: Iterable[tuple[str, str, int, str]] = (), seed: int = 0) -> dict[str, Any]:
    """Write the tree; returns what was planted (missing folds, absent classes, the duplicate pair).

    ``missing``: (dataset, arch, fold) without any result; ``absent``: (dataset, arch, fold,
    class) whose Dice is undefined there (no such pixels in that fold's validation cases)."""
    results = Path(results)
    rng = np.random.default_rng(seed)
    missing, absent = set(missing), set(absent)
    planted: dict[str, Any] = {"missing": sorted(missing), "absent": sorted(absent), "duplicates": {}}
    efficiency = []
    for d_i, (dataset, names) in enumerate(datasets):
        names = list(names)
        labels_map = {"background": 0, **{n: i for i, n in enumerate(names, start=1)}}
        folds = {k: [f"c{k}_{i:02d}" for i in range(cases_per_fold)] for k in range(n_folds)}
        case_ids = [c for k in range(n_folds) for c in folds[k]]
        raw_dir = Path(raw) / dataset if raw is not None else None
        gt = _raw(raw_dir, dataset, names, case_ids + ["dup0"], size, rng) if raw_dir is not None else {}
        if raw_dir is not None:  # a planted near-duplicate: c0_00 a little brighter
            img = read_image(raw_dir / "images" / "c0_00.png")
            atomic_write_png(raw_dir / "images" / "dup0.png", np.clip(img.astype(int) + 6, 0, 255).astype(np.uint8))
            atomic_write_png(raw_dir / "labels" / "dup0.png", gt["c0_00"])
        plan = make_plan(dataset=dataset, labels=labels_map, split={"n_folds": n_folds}, input_size=[size, size],
                         raw_dir=str(raw_dir) if raw_dir is not None else None)
        if preprocessed is not None:
            pre = Path(preprocessed) / dataset
            atomic_write_json(pre / "plans.json", plan.to_json())
            atomic_write_json(pre / "fingerprint.json", {
                "dataset": dataset, "modality": "gray", "num_cases": len(case_ids) + 1, "num_kept": len(case_ids),
                "channels": 1, "channels_seen": 1, "sizes": {"median": [size, size], "min": [size, size],
                                                             "max": [size, size], "n_unique": 1},
                "labels": {"pixel_share": {n: 1 / (len(names) + 1) for n in labels_map},
                           "presence": {n: 1.0 for n in labels_map}},
                "groups": {"column": None, "n_groups": len(case_ids), "max_cases_per_group": 1},
                "duplicates": {"summary": "1 near-duplicate dropped (phash <= 4)"}})
            atomic_write_text(pre / "duplicates.csv", "case_id,kept_case_id,reason,distance,decision\n"
                                                     "dup0,c0_00,phash,2,dropped: near-duplicate\n")
            planted["duplicates"][dataset] = ("dup0", "c0_00", 2)
        for a_i, arch in enumerate(archs):
            base = 0.78 + 0.12 * (a_i + 1) / (len(archs) + 1) - 0.05 * d_i
            for k in range(n_folds):
                if (dataset, arch, k) in missing:
                    continue
                fold = results / dataset / arch / f"fold_{k}"
                stop = epochs - 3 if k == 1 else None
                atomic_write_json(fold / "config.json", {
                    "dataset": dataset, "arch": arch, "fold": k, "trainer": "medplan.trainers.base.Trainer",
                    "created": "2025-01-01T00:00:00", "command_line": ["medplan_train", "-d", dataset, "-a", arch,
                                                                         "-f", str(k)],
                    "lr": 1e-4, "lr_source": "lr_search.json", "epochs": epochs, "batch_size": 2, "seed": 12345,
                    "model_options": {}, "device": "cuda:0", "device_name": "synthetic GPU",
                    "versions": {"python": "3.12", "medplan": "0", "torch": "2"}, "git_commit": "0" * 40,
                    "deviations": ["poly LR schedule"] if a_i == 1 else [], "plan": plan.to_json()})
                write_metrics(_history(rng, epochs, base - 0.1, stop), fold / "metrics.jsonl")
                per_case, per_class = {}, {}
                for cid in folds[k]:
                    v = float(np.clip(base + rng.normal(0, 0.04), 0.05, 0.99))
                    per_case[cid] = {"mDSC": v, "mIoU": v * 0.85, "mRec": v - 0.01, "mPrec": v + 0.005,
                                     "dice": {n: v for n in names}}
                    if gt:
                        pred = gt[cid].copy()
                        noise = rng.random(pred.shape) < (1 - v) * 0.5
                        pred[noise] = rng.integers(0, len(names) + 1, int(noise.sum()))
                        atomic_write_png(fold / "validation" / f"{cid}.png", pred)
                m = float(np.mean([c["mDSC"] for c in per_case.values()]))
                for i, n in enumerate(names):
                    gone = (dataset, arch, k, n) in absent
                    per_class[n] = {"dice": None if gone else m + 0.01 * (i - 1), "iou": None}
                atomic_write_json(fold / "validation" / "summary.json", {
                    "mDSC": m, "mIoU": m * 0.85, "mRec": m - 0.01, "mPrec": m + 0.005, "n_cases": len(per_case),
                    "per_class": per_class, "per_case": per_case, "evaluated_at": "original_size"})
            if a_i == 0:
                atomic_write_json(results / dataset / arch / "lr_search.json", {
                    "dataset": dataset, "arch": arch, "grid": [1e-3, 1e-4], "epochs": 4, "fold": 0,
                    "monitor": "val_mIoU", "results": {"1e-03": 0.61, "1e-04": 0.66}, "best_lr": 1e-4})
            if d_i == 0:
                efficiency.append({"arch": arch, "params_m": 3.0 + 10 * a_i, "gmacs": 1.5 * (a_i + 1),
                                   "size": f"{size}x{size}", "train_img_s": 100.0 / (a_i + 1),
                                   "infer_img_s": 300.0 / (a_i + 1), "peak_mem_mb": 500.0 * (a_i + 1),
                                   "device": "synthetic GPU"})
        if raw_dir is not None and d_i == 0:  # a Grad-CAM output of the first model's fold 0
            out = results / dataset / archs[0] / "fold_0" / "explain"
            atomic_write_png(out / "c0_00.png", np.full((40, 120, 3), 128, np.uint8))
            atomic_write_bytes(out / "cases.csv", b"case_id,source,mDSC,layer,target,panel\n"
                                                  b"c0_00,worst,0.5,decoder,class,c0_00.png\n")
            atomic_write_bytes(out / "pointing_game.csv", (
                "dataset,arch,maps,target,layer,case_id,class_index,class,energy_in_gt,gt_fraction,dice\n"
                f"{dataset},{archs[0]},fold_0,class,decoder,c0_00,1,{names[0]},0.7,0.2,0.5\n").encode())
    atomic_write_json(results / "study_report.json", {"folds": [], "efficiency": efficiency})
    return planted
