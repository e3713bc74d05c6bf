"""What every plan must hold, whichever planner wrote it, and the keys derived from others.

Trainers and predictors rely on these keys; checking them here turns a bad edit of
plans.json or a bad ``--set`` into a one-line error instead of a crash mid-training.
"""
from __future__ import annotations

from pathlib import Path

from medplan.errors import MedplanError

REQUIRED_KEYS = (
    "dataset", "modality", "channels", "labels", "num_classes", "task", "loss", "num_outputs",
    "split", "input_size", "batch_size", "normalization", "augmentation", "optimizer",
    "lr_schedule", "lr_grid", "lr", "epochs", "early_stopping", "excluded_cases", "reasons",
)
LOSSES = ("bce", "ce")

# Every key of plans.json["augmentation"], with the value that switches it off (the data
# pipeline reads the same table, so planner and augmenter cannot drift apart).
AUGMENTATION_OFF: dict[str, object] = {
    "rotation_deg": 0.0, "p_rotation": 0.0,
    "scale": [1.0, 1.0], "p_scale": 0.0,
    "hflip": False, "vflip": False, "rot90": False,
    "brightness": 0.0, "contrast": 0.0, "p_intensity": 0.0,
    "saturation": 0.0, "hue": 0.0, "p_color": 0.0,
    "gamma": [1.0, 1.0], "p_gamma": 0.0,
    "noise_std": 0.0, "p_noise": 0.0,
    "blur_sigma": [0.5, 1.0], "p_blur": 0.0,
}


def finalize_plan(plan: dict, source: str | Path = "plans.json") -> dict:
    """Recompute derived keys and validate; raise MedplanError naming ``source`` on problems."""
    missing = [k for k in REQUIRED_KEYS if k not in plan]
    if missing:
        raise MedplanError(f"plan lacks key(s) {', '.join(missing)}", source)

    labels = plan["labels"]
    if not isinstance(labels, dict) or sorted(labels.values()) != list(range(len(labels))):
        raise MedplanError("'labels' must map names to contiguous indices 0..K-1", source)
    plan["num_classes"] = len(labels)
    if plan["num_classes"] < 2:
        raise MedplanError("a segmentation plan needs at least 2 classes (background + one)", source)
    plan["task"] = "binary" if plan["num_classes"] == 2 else "multiclass"

    if plan["loss"] not in LOSSES:
        raise MedplanError(f"'loss' must be one of {', '.join(LOSSES)}, got {plan['loss']!r}", source)
    if plan["loss"] == "bce" and plan["num_classes"] != 2:
        raise MedplanError("'loss': bce needs a binary task (2 classes); use ce", source)
    plan["num_outputs"] = 1 if plan["loss"] == "bce" else plan["num_classes"]

    size = plan["input_size"]
    if isinstance(size, int):
        size = [size, size]
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) and s >= 8 for s in size)):
        raise MedplanError(f"'input_size' must be [height, width] of integers >= 8, got {size!r}", source)
    plan["input_size"] = list(size)

    if plan["channels"] not in (1, 3) or plan["modality"] not in ("gray", "rgb"):
        raise MedplanError("'modality' must be gray (1 channel) or rgb (3 channels)", source)
    if (plan["modality"] == "rgb") != (plan["channels"] == 3):
        plan["channels"] = 3 if plan["modality"] == "rgb" else 1

    if not isinstance(plan["batch_size"], int) or plan["batch_size"] < 1:
        raise MedplanError(f"'batch_size' must be a positive integer, got {plan['batch_size']!r}", source)
    grid = plan["lr_grid"]
    if not isinstance(grid, list) or not grid or not all(isinstance(x, (int, float)) and x > 0 for x in grid):
        raise MedplanError("'lr_grid' must be a non-empty list of positive numbers", source)
    for stage in ("lr_search", "cv"):
        value = plan["epochs"].get(stage) if isinstance(plan["epochs"], dict) else None
        if not isinstance(value, int) or value < 1:
            raise MedplanError(f"'epochs.{stage}' must be a positive integer, got {value!r}", source)
    n_folds = plan["split"].get("n_folds") if isinstance(plan["split"], dict) else None
    if not isinstance(n_folds, int) or n_folds < 2:
        raise MedplanError(f"'split.n_folds' must be an integer >= 2, got {n_folds!r}", source)
    norm = plan["normalization"]
    if norm.get("scheme") == "zscore":
        if len(norm.get("mean", [])) != plan["channels"] or len(norm.get("std", [])) != plan["channels"]:
            raise MedplanError("'normalization' needs one mean and one std per channel", source)
        if any(s <= 0 for s in norm["std"]):
            raise MedplanError("'normalization.std' must be positive", source)
    elif norm.get("scheme") != "minmax":
        raise MedplanError(f"'normalization.scheme' must be zscore or minmax, got {norm.get('scheme')!r}", source)
    return plan
