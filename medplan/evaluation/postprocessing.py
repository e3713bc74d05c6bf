"""nnU-Net's post-processing, decided on the cross-validation folds (issue 15, item 5).

After cross-validation, :func:`decide_postprocessing` asks, as nnU-Net does, whether keeping
only the largest connected component raises the validation mDSC pooled over the folds:
first for all foreground classes taken as one object (when there are two or more), then for
each class on its own, on top of what was chosen before. A step is kept only when it strictly
raises the mDSC. The mDSC is medplan's metric (:mod:`medplan.metrics`: TP/FP/FN summed over
every validation case of every fold, background excluded), on the saved ``validation/`` label
maps at original size against the raw labels, i.e. the numbers of ``summary.json``.

Removing a class's small components only moves that class's pixels to background, so the
class's own TP/FP/FN are all that change: one pass over the cases collects the counts of every
candidate, and the decision never needs the label maps twice (memory stays flat on large sets).

The decision and its evidence go to ``RESULTS/DATASET/ARCH/postprocessing.json`` (atomically):
per step the mDSC before and after, per class its Dice before and after, and per fold the
raw and post-processed metrics, for Table 3. The folds both choose and score the decision,
as in nnU-Net, so the post-processed numbers are slightly optimistic; the raw ones stay beside them.
Apply it with :func:`medplan.interop.postprocessing.apply_postprocessing`.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any, Sequence

import numpy as np

from medplan import __version__
from medplan.errors import MedplanError
from medplan.evaluation.evaluate import label_files, match_folders, raw_dir_for, to_class_indices
# apply_postprocessing is re-exported: deciding and applying are one topic for the callers
from medplan.interop.postprocessing import POSTPROCESSING, apply_postprocessing, keep_largest  # noqa: F401
from medplan.io import atomic_write_json, read_label
from medplan.metrics import confusion_counts, summarize
from medplan.names import check_names
from medplan.paths import results_dir
from medplan.plan import Plan
from medplan.progress import progress_bar
from medplan.rundir import RunDir, fold_dirs

CRITERION = ("validation mDSC pooled over the folds (TP/FP/FN summed over every validation case of every fold, "
             "background excluded; medplan.metrics), original size; a step is kept only if it strictly raises it")
METRICS = ("mDSC", "mIoU", "mRec", "mPrec")

__all__ = ["apply_postprocessing", "decide_postprocessing", "POSTPROCESSING", "CRITERION"]


def _folds(dataset: str, arch: str, folds: Sequence[int | str] | None) -> list[RunDir]:
    model_dir = results_dir(dataset, arch)
    runs = fold_dirs(model_dir, numbered=True)
    if folds is not None:
        wanted = {str(f) for f in folds}
        missing = sorted(wanted - {r.fold for r in runs})
        if missing:
            raise MedplanError(f"no fold_{missing[0]} of {arch} on {dataset}", model_dir / f"fold_{missing[0]}")
        runs = [r for r in runs if r.fold in wanted]
    if not runs:
        raise MedplanError(f"no cross-validation folds of {arch} on {dataset} (train them first)", model_dir)
    for run in runs:
        if not run.is_complete() or not run.has_predictions():
            raise MedplanError("fold has no validation predictions yet; train it to the end (or leave it out with "
                               "folds=...)", run.validation)
    return runs


def _fold_pairs(run: RunDir) -> tuple[Plan, list[tuple[str, Any, Any]]]:
    """The fold's plan and its (case, prediction, ground truth) files, as evaluate_fold pairs them."""
    config = run.config(required=True)
    if not isinstance(config.get("plan"), dict):
        raise MedplanError("no plan in config.json", run.config_path)
    plan = Plan.from_json(config["plan"], source=run.config_path)
    cases = config.get("val_cases") or None
    if cases is not None:  # ids from a file become file names below: checked first
        if not isinstance(cases, list):
            raise MedplanError("'val_cases' must be a list of case ids", run.config_path)
        check_names(cases, "case id in 'val_cases'", run.config_path)
    gt_dir = raw_dir_for(plan.dataset, plan) / "labels"
    pairs = match_folders(run.validation, gt_dir, cases if cases else sorted(label_files(run.validation, "prediction")))
    return plan, pairs


def _candidate_counts(pred: np.ndarray, gt: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """TP/FP/FN of the raw map, of the largest-foreground map, and of each class's own
    largest-component rule on both (rows ``c`` of ``class`` / ``fg_class``; other rows unused)."""
    out = {"raw": confusion_counts(pred, gt, k)}
    fg = keep_largest(pred, None) if k > 2 else pred
    out["fg"] = confusion_counts(fg, gt, k) if k > 2 else out["raw"]
    for key, base in (("class", pred), ("fg_class", fg)):
        rows = np.zeros((k, 3), dtype=np.int64)
        for c in range(1, k):
            if not (base == c).any():
                rows[c] = out["raw" if key == "class" else "fg"][c]
                continue
            rows[c] = confusion_counts(keep_largest(base, [c]), gt, k)[c]
        out[key] = rows
    return out


def _combine(counts: dict[str, np.ndarray], foreground: bool, classes: Sequence[int]) -> np.ndarray:
    base, per_class = ("fg", "fg_class") if foreground else ("raw", "class")
    total = counts[base].copy()
    for c in classes:
        total[c] = counts[per_class][c]
    return total


def _metrics(counts: np.ndarray, labels: Any) -> dict[str, Any]:
    s = summarize(counts, labels)
    return {**{m: s[m] for m in METRICS}, "dice": {n: v["dice"] for n, v in s["per_class"].items()}}


def decide_postprocessing(dataset: str, arch: str, *, folds: Sequence[int | str] | None = None,
                          write: bool = True, progress: bool = False) -> dict[str, Any]:
    """Decide nnU-Net's largest-component post-processing for ``arch`` on ``dataset`` from the
    validation predictions of its folds; write and return ``postprocessing.json``'s content."""
    runs = _folds(dataset, arch, folds)
    plans, per_fold = [], {}
    for run in runs:
        plan, pairs = _fold_pairs(run)
        plans.append(plan)
        per_fold[run.fold] = pairs
    labels, k = plans[0].labels, plans[0].num_classes
    for run, plan in zip(runs, plans):
        if plan.labels != labels:
            raise MedplanError(f"fold {run.fold} was trained with other classes than fold {runs[0].fold}",
                               run.config_path)
    values = list(range(k))
    sums: dict[str, dict[str, np.ndarray]] = {}
    seen: dict[str, str] = {}
    for fold, pairs in per_fold.items():
        for case, pred_path, gt_path in progress_bar(pairs, total=len(pairs), desc=f"post-processing fold {fold}",
                                                     enabled=progress):
            if case in seen:
                raise MedplanError(f"case {case!r} is validated in folds {seen[case]} and {fold}", pred_path)
            seen[case] = fold
            pred = to_class_indices(read_label(pred_path), values, pred_path, "prediction")
            gt = to_class_indices(read_label(gt_path), values, gt_path, "ground truth")
            if pred.shape != gt.shape:
                raise MedplanError(f"prediction is {pred.shape[0]}x{pred.shape[1]} but its ground truth {gt_path} is "
                                   f"{gt.shape[0]}x{gt.shape[1]} (height x width)", pred_path)
            fold_sums = sums.setdefault(fold, {})
            for key, counts in _candidate_counts(pred, gt, k).items():
                fold_sums[key] = fold_sums.get(key, 0) + counts
    pooled = {key: sum(s[key] for s in sums.values()) for key in ("raw", "fg", "class", "fg_class")}

    def mdsc(foreground: bool, classes: Sequence[int]) -> float:
        return float(summarize(_combine(pooled, foreground, classes), labels)["mDSC"])

    names = plans[0].class_names
    foreground, chosen = False, []
    steps: dict[str, Any] = {}
    if k > 2:
        before, after = mdsc(False, []), mdsc(True, [])
        foreground = after > before
        steps["foreground"] = {"largest_component": foreground, "mDSC_before": before, "mDSC_after": after}
    classes: dict[str, Any] = {}
    for c in range(1, k):
        before, after = mdsc(foreground, chosen), mdsc(foreground, chosen + [c])
        take = after > before
        dice = [_metrics(_combine(pooled, foreground, cs), labels)["dice"][names[c]] for cs in (chosen, chosen + [c])]
        classes[names[c]] = {"index": c, "largest_component": take, "mDSC_before": before, "mDSC_after": after,
                             "dice_before": dice[0], "dice_after": dice[1]}
        if take:
            chosen.append(c)
    raw_total, post_total = pooled["raw"], _combine(pooled, foreground, chosen)
    decision = {
        "dataset": dataset, "arch": arch, "folds": list(per_fold), "n_cases": len(seen),
        "criterion": CRITERION,
        "connectivity": "8-connected (full); all components of the largest size kept; removed pixels -> background",
        "foreground_largest_component": foreground,
        "largest_component_classes": chosen,
        "steps": {**steps, "classes": classes},
        "raw": _metrics(raw_total, labels),
        "postprocessed": _metrics(post_total, labels),
        "per_fold": {fold: {"raw": _metrics(s["raw"], labels), "postprocessed": _metrics(
            _combine(s, foreground, chosen), labels)} for fold, s in sums.items()},
        "note": "decided and scored on the same validation folds (as nnU-Net): the post-processed numbers are "
                "slightly optimistic",
        "created": datetime.now().isoformat(timespec="seconds"), "medplan_version": __version__,
    }
    if write:
        atomic_write_json(results_dir(dataset, arch) / POSTPROCESSING, decision)
    return decision
