"""The cases explain works on: their raw files, their validation values, and what one explained
case holds (:class:`CaseMaps`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medplan.errors import MedplanError
from medplan.io import IMAGE_SUFFIXES, read_label
from medplan.names import check_name
from medplan.paths import raw_dir
from medplan.plan import Plan
from medplan.rundir import RunDir


@dataclass
class CaseMaps:
    """Everything one figure and one pointing-game row need, at the image's original size."""

    case_id: str
    image: np.ndarray
    gt: np.ndarray | None
    pred: np.ndarray
    cams: np.ndarray                       # (n_fg, H, W) in [0, 1]
    dice: dict[str, Any] = field(default_factory=dict)   # mDSC and per-class dice, when known
    energy: list[float] = field(default_factory=list)
    gt_fraction: list[float] = field(default_factory=list)


def validation_cases(fold_dir: Path) -> dict[str, dict]:
    """The fold's per-case validation values (``validation/summary.json``); an error naming the
    file when the fold has none."""
    run = RunDir(fold_dir)
    per_case = run.summary(required=True).get("per_case")
    if not isinstance(per_case, dict) or not per_case:
        raise MedplanError("validation summary has no per_case values", run.summary_path)
    return per_case


def validated_cases(fold_dirs: list[Path]) -> dict[str, tuple[Path, dict]]:
    """case -> (the fold that validated it, its per-case values), over the folds that have values."""
    out: dict[str, tuple[Path, dict]] = {}
    for d in fold_dirs:
        summary = RunDir(d).summary(required=False)
        if summary is not None:
            for case_id, values in (summary.get("per_case") or {}).items():
                out[case_id] = (d, values)
    return out


def raw_case_files(plan: Plan, dataset: str, case_id: str) -> tuple[Path, Path]:
    """The raw image and label of a case (the plan's ``raw_dir``, else ``$MEDPLAN_RAW/DATASET``)."""
    check_name(case_id, "case id")
    roots = [Path(plan.raw_dir)] if plan.raw_dir else []
    roots.append(raw_dir(dataset))
    for root in roots:
        for suffix in (".png", *IMAGE_SUFFIXES):
            image = root / "images" / f"{case_id}{suffix}"
            if image.is_file():
                return image, root / "labels" / f"{case_id}.png"
    raise MedplanError(f"raw image of case {case_id!r} not found", roots[0] / "images" / f"{case_id}.png")


def read_case_label(path: Path) -> np.ndarray:
    """A raw label map as class indices (int64, first channel of a multi-channel file)."""
    label = np.asarray(read_label(path))
    if label.ndim == 3:
        label = label[:, :, 0]
    return label.astype(np.int64)
