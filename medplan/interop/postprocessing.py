"""nnU-Net's post-processing rule: keep only the largest connected component (of all foreground
together, and/or of single classes), as ``postprocessing.json`` decides it.

The decision is made on the cross-validation folds by
:func:`medplan.evaluation.postprocessing.decide_postprocessing`; this module only applies it
and reads it back, so that inference (below evaluation in medplan's layers) can use it.

Components are 8-connected in 2D (full connectivity, as nnU-Net's ``skimage.measure.label``
default); every component of the largest size is kept (nnU-Net keeps ties too); removed
pixels become background (0).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from scipy import ndimage

from medplan.errors import MedplanError
from medplan.io import read_json

#: written beside the fold folders: ``RESULTS/DATASET/ARCH/postprocessing.json``
POSTPROCESSING = "postprocessing.json"
#: full connectivity in 2D (8 neighbours)
STRUCTURE = np.ones((3, 3), dtype=bool)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The pixels of ``mask`` in its largest 8-connected component(s) (all of a tied size)."""
    mask = np.asarray(mask, dtype=bool)
    labelled, n = ndimage.label(mask, structure=STRUCTURE)
    if n <= 1:
        return mask
    sizes = np.bincount(labelled.ravel())[1:]
    keep = np.flatnonzero(sizes == sizes.max()) + 1
    return np.isin(labelled, keep)


def keep_largest(label_map: np.ndarray, classes: Iterable[int] | None) -> np.ndarray:
    """``label_map`` with only the largest component kept: of all foreground as one object when
    ``classes`` is None, else of each class in ``classes`` on its own. A copy; removed pixels are 0."""
    out = np.array(label_map, copy=True)
    groups = [out > 0] if classes is None else [out == c for c in classes]
    for mask in groups:
        out[mask & ~largest_component(mask)] = 0
    return out


def check_decision(decision: Mapping[str, Any], source: str | Path | None = None,
                   num_classes: int | None = None) -> tuple[bool, list[int]]:
    """``(foreground_largest_component, largest_component_classes)`` of a decision, checked."""
    if not isinstance(decision, Mapping):
        raise MedplanError("a post-processing decision must be a JSON object", source)
    foreground = decision.get("foreground_largest_component", False)
    classes = decision.get("largest_component_classes", [])
    if not isinstance(foreground, bool):
        raise MedplanError(f"'foreground_largest_component' must be true or false, got {foreground!r}", source)
    if not isinstance(classes, list) or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1
                                                for c in classes):
        raise MedplanError(f"'largest_component_classes' must be a list of class indices >= 1, got {classes!r}", source)
    if num_classes is not None and any(c >= num_classes for c in classes):
        raise MedplanError(f"'largest_component_classes' {classes} names a class outside 1..{num_classes - 1}", source)
    return foreground, sorted(set(classes))


def apply_postprocessing(label_map: np.ndarray, decision: Mapping[str, Any]) -> np.ndarray:
    """``label_map`` post-processed as ``decision`` (postprocessing.json) says: first the
    largest foreground component (when chosen), then the largest component of each chosen class."""
    foreground, classes = check_decision(decision)
    out = keep_largest(label_map, None) if foreground else np.array(label_map, copy=True)
    return keep_largest(out, classes) if classes else out


def read_postprocessing(model_dir: str | os.PathLike, num_classes: int | None = None) -> dict[str, Any] | None:
    """``MODEL_DIR/postprocessing.json`` checked, or None when the folds never decided one."""
    path = Path(model_dir) / POSTPROCESSING
    if not path.is_file():
        return None
    decision = read_json(path)
    check_decision(decision, path, num_classes)
    return decision
