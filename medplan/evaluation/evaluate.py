"""Evaluate saved label maps against raw labels: a folder pair, one trained fold, or a model
trained on one dataset applied to another (cross-dataset, with a class mapping).

The metrics are :mod:`medplan.metrics` (global micro-averaging, background
excluded), computed at each image's original resolution by default. ``input_size=(h, w)``
first resizes prediction and ground truth with nearest neighbour to the planned input size,
as the paper evaluated; note that the trainer's ``summary.json`` ``at_input_size`` block is
computed from the network's own input-size output, which this cannot recover from a saved
original-size map (the two differ only along class borders).

Every problem with the inputs (a missing file on either side, different sizes, label values
outside the declared classes, an empty folder) is a MedplanError naming the file; nothing is
written before every case was evaluated.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from medplan.datasets import resolve_raw_dataset
from medplan.errors import MedplanError
from medplan.inference import Predictor, predict_folder
from medplan.io import atomic_write_json, images_by_case, read_json, read_label
from medplan.metrics import MetricAccumulator, summary_dict
from medplan.names import check_names
from medplan.paths import raw_dir, results_dir
from medplan.plan import Plan
from medplan.preprocessing import prepare_label
from medplan.progress import progress_bar
from medplan.rundir import SUMMARY, RunDir
from medplan.stagefiles import load_plan

Pair = tuple[str, Path, Path]  # case id, prediction, ground truth


# ---------------------------------------------------------------------------- arguments
def parse_int_list(text: str | Sequence[int], what: str = "--labels") -> list[int]:
    """``"0,1,2"`` or ``[0, 1, 2]`` -> ``[0, 1, 2]``; a single ``"4"`` means ``0..3`` for ``--labels``."""
    if not isinstance(text, str):
        return [int(v) for v in text]
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise MedplanError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise MedplanError(f"{what} is empty")
    return values


def parse_mapping(spec: str | Sequence[str] | Mapping[int, int] | None) -> dict[int, int] | None:
    """``"1,2:1"`` (or several: ``"1,2:1;3:2"`` / a list of such) -> ``{1: 1, 2: 1}``.

    Values not named keep their index (``0`` stays background).
    """
    if spec is None:
        return None
    if isinstance(spec, Mapping):
        return {int(k): int(v) for k, v in spec.items()}
    parts = [spec] if isinstance(spec, str) else list(spec)
    mapping: dict[int, int] = {}
    for part in (p for chunk in parts for p in chunk.split(";")):
        part = part.strip()
        if not part:
            continue
        if part.count(":") != 1:
            raise MedplanError(f"class mapping {part!r}: expected SOURCE[,SOURCE...]:TARGET, e.g. 1,2:1")
        sources, target = part.split(":")
        try:
            tgt = int(target)
            srcs = [int(s) for s in sources.split(",") if s.strip()]
        except ValueError:
            raise MedplanError(f"class mapping {part!r}: classes must be integers, e.g. 1,2:1") from None
        if not srcs or tgt < 0 or any(s < 0 for s in srcs):
            raise MedplanError(f"class mapping {part!r}: expected non-negative SOURCE[,SOURCE...]:TARGET")
        for s in srcs:
            if s in mapping and mapping[s] != tgt:
                raise MedplanError(f"class mapping maps class {s} twice ({mapping[s]} and {tgt})")
            mapping[s] = tgt
    return mapping or None


def _labels_and_names(labels: int | Sequence[int] | Mapping[str, int] | str,
                      names: Sequence[str] | str | None) -> tuple[list[int], list[str]]:
    """Declared label values (file values, index order) and one name per class, background first."""
    if isinstance(labels, Mapping):
        order = sorted(labels.items(), key=lambda kv: kv[1])
        values = [int(v) for _, v in order]
        default_names = [str(n) for n, _ in order]
    else:
        if isinstance(labels, (int, np.integer)):
            values = list(range(int(labels)))
        else:
            values = parse_int_list(labels)
            if len(values) == 1 and isinstance(labels, str):  # "--labels 4": four classes 0..3
                values = list(range(values[0]))
        default_names = ["background" if v == 0 else f"class_{v}" for v in values]
    if len(values) < 2:
        raise MedplanError(f"declare at least two classes (background + one), got {values}")
    if len(set(values)) != len(values) or min(values) < 0:
        raise MedplanError(f"declared label values must be distinct and non-negative, got {values}")
    if names is None:
        return values, default_names
    names = [n.strip() for n in names.split(",")] if isinstance(names, str) else [str(n) for n in names]
    if len(names) != len(values):
        raise MedplanError(f"{len(names)} names ({', '.join(names)}) for {len(values)} classes "
                           f"({', '.join(map(str, values))}); give one name per class, background first")
    return values, names


# ---------------------------------------------------------------------------- one case
def _lookup(values: Sequence[int], size: int) -> np.ndarray:
    lut = np.full(size, -1, dtype=np.int64)
    for index, value in enumerate(values):
        if value < size:
            lut[value] = index
    return lut


def to_class_indices(label: np.ndarray, values: Sequence[int], path: Path, what: str,
                     mapping: Mapping[int, int] | None = None) -> np.ndarray:
    """File values -> class indices 0..K-1 (after an optional class mapping); values outside the
    declared classes are a MedplanError naming the file and the values."""
    if label.ndim != 2:
        raise MedplanError(f"{what} must be a single-channel label map, got shape {list(label.shape)}", path)
    if label.dtype.kind not in "biu":
        raise MedplanError(f"{what} must hold integer class values, got dtype {label.dtype}", path)
    a = label.astype(np.int64, copy=False)
    lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
    if lo < 0:
        raise MedplanError(f"{what} holds negative label value {lo}", path)
    if mapping:
        table = np.arange(max(hi, max(mapping)) + 1, dtype=np.int64)
        for src, tgt in mapping.items():
            table[src] = tgt
        a = table[a]
        hi = int(a.max()) if a.size else 0
    lut = _lookup(values, max(hi, max(values)) + 1)
    out = lut[a]
    bad = out < 0
    if bad.any():
        found = np.unique(a[bad])
        shown = ", ".join(map(str, found[:10])) + (" ..." if len(found) > 10 else "")
        after = " (after the class mapping)" if mapping else ""
        raise MedplanError(f"{what} holds label value(s) {shown}{after} outside the declared classes "
                           f"{', '.join(map(str, values))}", path)
    return out.astype(np.uint8)


def _resize_nearest(label: np.ndarray, size: Sequence[int]) -> np.ndarray:
    return prepare_label(label, size)


def evaluate_pairs(pairs: Sequence[Pair], labels: int | Sequence[int] | Mapping[str, int] | str,
                   names: Sequence[str] | str | None = None, *, input_size: Sequence[int] | None = None,
                   map_pred: Mapping[int, int] | None = None, map_gt: Mapping[int, int] | None = None,
                   progress: bool = False) -> dict[str, Any]:
    """Metrics over (case id, prediction file, ground-truth file) triples; summary_dict-shaped."""
    values, class_names = _labels_and_names(labels, names)
    if not pairs:
        raise MedplanError("nothing to evaluate (no cases)")
    acc = MetricAccumulator(len(values))
    for case_id, pred_path, gt_path in progress_bar(pairs, total=len(pairs), desc="evaluate", enabled=progress):
        pred = read_label(pred_path)  # a palette PNG's indices are its labels, not its colours
        gt = read_label(gt_path)
        if pred.shape[:2] != gt.shape[:2]:
            raise MedplanError(f"prediction is {pred.shape[0]}x{pred.shape[1]} but its ground truth {gt_path} is "
                               f"{gt.shape[0]}x{gt.shape[1]} (height x width)", pred_path)
        p = to_class_indices(pred, values, pred_path, "prediction", map_pred)
        g = to_class_indices(gt, values, gt_path, "ground truth", map_gt)
        if input_size is not None:
            p, g = _resize_nearest(p, input_size), _resize_nearest(g, input_size)
        acc.add(p, g, case_id)
    out = summary_dict(acc, class_names)
    out["class_names"] = class_names
    out["label_values"] = values
    out["evaluated_at"] = "original_size" if input_size is None else f"input_size {input_size[0]}x{input_size[1]}"
    return out


# ---------------------------------------------------------------------------- folders
def label_files(folder: str | Path, what: str) -> dict[str, Path]:
    """Case id -> label map file of a folder (overlays and hidden files left out)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MedplanError(f"{what} folder not found", folder)
    return images_by_case(folder, what, skip=lambda p: p.name.endswith("_overlay.png"))


def match_folders(pred_dir: str | Path, gt_dir: str | Path, cases: Iterable[str] | None = None) -> list[Pair]:
    """Pair predictions with ground truths by case name; a case missing on either side is an error.

    With ``cases``, exactly those cases are evaluated (each must exist on both sides);
    without, every file of both folders must have its counterpart.
    """
    preds = label_files(pred_dir, "prediction")
    gts = label_files(gt_dir, "ground-truth")
    if cases is None:
        if not preds:
            raise MedplanError("no label maps in this folder", pred_dir)
        for case in sorted(set(gts) - set(preds)):
            raise MedplanError(f"prediction missing for ground truth {gts[case].name}", Path(pred_dir) / f"{case}.png")
        wanted = sorted(preds)
    else:
        wanted = list(cases)
        if not wanted:
            raise MedplanError("no cases to evaluate", pred_dir)
        for case in wanted:
            if case not in preds:
                raise MedplanError("prediction missing", Path(pred_dir) / f"{case}.png")
    for case in wanted:
        if case not in gts:
            raise MedplanError(f"ground truth missing for prediction {preds[case].name}", Path(gt_dir) / f"{case}.png")
    return [(c, preds[c], gts[c]) for c in wanted]


def evaluate_folders(pred_dir: str | Path, gt_dir: str | Path, labels: int | Sequence[int] | Mapping[str, int] | str,
                     names: Sequence[str] | str | None = None, *, input_size: Sequence[int] | None = None,
                     map_pred: Mapping[int, int] | str | None = None, map_gt: Mapping[int, int] | str | None = None,
                     cases: Iterable[str] | None = None, progress: bool = False) -> dict[str, Any]:
    """Metrics of the label maps in ``pred_dir`` against those in ``gt_dir`` (matched by case name).

    ``labels``: the declared class values as stored in the files (``[0, 255]`` for 0/255 masks),
    in class-index order, or plans["labels"]; ``names``: one per class, background first.
    """
    _labels_and_names(labels, names)  # argument errors before any file is looked at
    map_pred, map_gt = parse_mapping(map_pred), parse_mapping(map_gt)
    pairs = match_folders(pred_dir, gt_dir, cases)
    return evaluate_pairs(pairs, labels, names, input_size=input_size, map_pred=map_pred, map_gt=map_gt,
                          progress=progress)


# ---------------------------------------------------------------------------- one trained fold
def fold_config(fold_dir: str | Path) -> dict:
    """The fold's config.json (``{}`` when there is none)."""
    return RunDir(fold_dir).config()


def fold_has_predictions(fold_dir: str | Path) -> bool:
    return RunDir(fold_dir).has_predictions()


def raw_dir_for(dataset: str, plan: Plan | None = None) -> Path:
    """A dataset's raw folder, for its labels (:func:`medplan.datasets.resolve_raw_dataset`, the
    one resolver): the ``raw_dir`` of ``plan`` (else of the dataset's plans.json, when it was
    planned) while it still holds the dataset, else ``$MEDPLAN_RAW/NAME``."""
    if not plan:
        try:
            plan = load_plan(dataset)
        except MedplanError:  # never planned (a cross-dataset target): $MEDPLAN_RAW/NAME
            plan = None
    try:
        return resolve_raw_dataset(dataset, recorded=plan.raw_dir if plan else None)
    except MedplanError:
        pass
    except Exception:  # noqa: BLE001 - importing a download found there may need importers not installed here
        pass
    raise MedplanError(f"raw dataset {dataset!r} not found (needed for its labels); convert it or set MEDPLAN_RAW",
                       raw_dir(dataset) / "dataset.json")


def evaluate_fold(fold_dir: str | Path, plan: Plan | None = None, *, at_input_size: bool = False,
                  progress: bool = False) -> dict[str, Any]:
    """Recompute one fold's metrics from ``validation/CASE.png`` against the raw labels.

    The cases are the fold's validation cases (config.json ``val_cases``, else the files
    present); a validation case without its label map is an error, not a smaller fold.
    """
    run = RunDir(fold_dir)
    config = run.config()
    if plan is None:
        recorded = config.get("plan")
        if not recorded:
            raise MedplanError("no plan (config.json missing or without 'plan')", run.config_path)
        plan = Plan.from_json(recorded, source=run.config_path)
    gt_dir = raw_dir_for(plan.dataset, plan) / "labels"
    vdir = run.validation
    if not vdir.is_dir():
        raise MedplanError("no validation predictions (the fold is not trained to the end)", vdir)
    cases = config.get("val_cases") or None
    if cases is not None:  # ids from a file become file names below: checked first
        if not isinstance(cases, list):
            raise MedplanError("'val_cases' must be a list of case ids", run.config_path)
        check_names(cases, "case id in 'val_cases'", run.config_path)
    pairs = match_folders(vdir, gt_dir, cases if cases else sorted(label_files(vdir, "prediction")))
    size = plan.input_size if at_input_size else None
    return evaluate_pairs(pairs, plan.labels, input_size=size, progress=progress)


# ---------------------------------------------------------------------------- cross-dataset
def _target_labels(raw: Path) -> dict[str, int]:
    info = read_json(raw / "dataset.json")
    labels = info.get("labels")
    if not isinstance(labels, dict) or sorted(labels.values()) != list(range(len(labels))):
        raise MedplanError("'labels' must map names to contiguous indices 0..K-1", raw / "dataset.json")
    return {str(k): int(v) for k, v in labels.items()}


def check_mapping(model_labels: Mapping[str, int], target_labels: Mapping[str, int],
                  mapping: Mapping[int, int] | None, where: str) -> None:
    """Every class the model can predict must land on a class of the target dataset."""
    target = set(target_labels.values())
    names = {v: n for n, v in model_labels.items()}
    for index in sorted(names):
        mapped = (mapping or {}).get(index, index)
        if mapped not in target:
            raise MedplanError(f"model class {names[index]!r} (index {index}) maps to {mapped}, which is not a class "
                               f"of {where} ({', '.join(f'{n}={v}' for n, v in sorted(target_labels.items(), key=lambda kv: kv[1]))}); "
                               f"give --map, e.g. --map {index}:1")
    unknown = sorted(set(mapping or {}) - set(names))
    if unknown:
        raise MedplanError(f"--map names class(es) {', '.join(map(str, unknown))} that the model does not have "
                           f"({', '.join(f'{n}={v}' for n, v in sorted(model_labels.items(), key=lambda kv: kv[1]))})")


def cross_dataset_evaluation(model_from: str, arch: str, on: str, *, mapping: Mapping[int, int] | str | None = None,
                             map_gt: Mapping[int, int] | str | None = None, folds: Sequence[int | str] | None = None,
                             checkpoint: str = "best", device: str = "auto", tta: bool = False,
                             at_input_size: bool = False, batch_size: int | None = None,
                             output_dir: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Predict dataset ``on``'s raw images with ``model_from``'s ``arch`` folds (probabilities
    averaged over folds) and evaluate them against ``on``'s labels, the model's classes
    mapped by ``mapping`` (``"1,2:1"``: both polyp classes count as polyp).

    Writes the label maps and ``summary.json`` to ``RESULTS/MODEL_FROM/ARCH/cross_ON/``.
    """
    mapping, map_gt = parse_mapping(mapping), parse_mapping(map_gt)
    raw = raw_dir_for(on)
    target = _target_labels(raw)
    predictor = Predictor.from_folder(results_dir(model_from, arch), folds=folds, checkpoint=checkpoint,
                                      device=device, tta=tta, batch_size=batch_size)
    check_mapping(predictor.plan.labels, target, mapping, on)
    if map_gt:
        for src, tgt in map_gt.items():
            if tgt not in target.values():
                raise MedplanError(f"--map-gt maps {src} to {tgt}, which is not a class of {on}")
    out = Path(output_dir) if output_dir else results_dir(model_from, arch) / f"cross_{on}"
    # the ground truth is checked before the (slow) prediction: every image needs its label
    images = raw / "images"
    match_folders(images, raw / "labels", sorted(label_files(images, "image")))
    predict_folder(predictor, images, out, progress=progress)
    size = predictor.plan.input_size if at_input_size else None
    summary = evaluate_folders(out, raw / "labels", target, input_size=size, map_pred=mapping, map_gt=map_gt,
                               cases=sorted(label_files(images, "image")), progress=progress)
    summary.update(model_from=model_from, arch=arch, on=on,
                   mapping={str(k): v for k, v in (mapping or {}).items()},
                   map_gt={str(k): v for k, v in (map_gt or {}).items()},
                   folds=[f.fold for f in predictor.folds], checkpoint=checkpoint, tta=tta)
    atomic_write_json(out / SUMMARY, summary)
    return summary
