"""ISIC 2018 Task 1 (lesion boundary segmentation).

``ISIC2018_Task1-2_{Training,Validation,Test}_Input/ISIC_*.jpg`` with
``ISIC2018_Task1_{Training,Validation,Test}_GroundTruth/ISIC_*_segmentation.png`` (0/255).
Every split that has ground truth is pooled, as in the benchmark paper (2,594 + 100 + 1,000 =
3,694 images before duplicate filtering); a split without a ground-truth folder is skipped
and reported. Extraction folders nested twice (``X_Input/X_Input/``) are followed.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from medplan.datasets.base import (Case, Collected, Importer, ValueMapLabels, image_files, no_options, register,
                                   stem_index, unnest, unused, walk_dirs)
from medplan.errors import MedplanError
from medplan.io import case_stem

LABELS = {"background": 0, "lesion": 1}
SPLITS = ("Training", "Validation", "Test")
_INPUT = re.compile(r"^ISIC2018_Task1-2_(Training|Validation|Test)_Input$", re.IGNORECASE)
_GT = re.compile(r"^ISIC2018_Task1_(Training|Validation|Test)_GroundTruth$", re.IGNORECASE)
_CASE = re.compile(r"^ISIC_\d+$")


def find_split_folders(source: Path) -> dict[str, dict[str, Path]]:
    """``{"Training": {"input": ..., "gt": ...}, ...}`` for the folders found under ``source``."""
    found: dict[str, dict[str, Path]] = {}
    for folder in walk_dirs(source, depth=2):
        for kind, pattern in (("input", _INPUT), ("gt", _GT)):
            m = pattern.match(folder.name)
            if m:
                split = m.group(1).capitalize()
                found.setdefault(split, {}).setdefault(kind, unnest(folder))
    return found


@register
class Isic2018(Importer):
    name = "isic2018"
    default_name = "ISIC2018"
    description = "ISIC 2018 Task 1: ISIC2018_Task1-2_*_Input + ISIC2018_Task1_*_GroundTruth"

    def detect(self, path: Path) -> bool:
        return any("input" in v for v in find_split_folders(path).values())

    def collect(self, source: Path, **options: Any) -> Collected:
        no_options(self.name, options)
        folders = find_split_folders(source)
        if not any("input" in v for v in folders.values()):
            raise MedplanError("no ISIC 2018 layout found (expected ISIC2018_Task1-2_Training_Input/ and "
                               "ISIC2018_Task1_Training_GroundTruth/)", source)
        cases: list[Case] = []
        notes: list[str] = []
        seen: dict[str, Path] = {}
        mask_files: list[Path] = []
        for split in SPLITS:
            parts = folders.get(split, {})
            if "gt" in parts:
                mask_files += image_files(parts["gt"])
            if "input" not in parts:
                continue
            images = [p for p in image_files(parts["input"]) if _CASE.match(case_stem(p))]
            if "gt" not in parts:
                notes.append(f"skipped {len(images)} {split} image(s): no ISIC2018_Task1_{split}_GroundTruth folder")
                continue
            masks = stem_index([p for p in mask_files if p.parent == parts["gt"]], strip_suffixes=("_segmentation",))
            for image in images:
                case_id = case_stem(image)
                mask = masks.get(case_id)
                if mask is None:
                    raise MedplanError(f"missing label {case_id}_segmentation.png in {parts['gt']}", image)
                if case_id in seen:
                    raise MedplanError(f"case {case_id} appears twice (also {seen[case_id]})", image)
                seen[case_id] = image
                cases.append(Case(case_id=case_id, image=image, labels=[mask],
                                  metadata={"split": split.lower()}))
        if not cases:
            raise MedplanError("no ISIC 2018 images with ground truth found", source)
        return Collected(cases=cases, decoder=ValueMapLabels({0: 0, 255: 1}), labels=dict(LABELS),
                         modality="dermoscopy", source_format="isic2018", root=source, notes=notes,
                         orphan_masks=unused(mask_files, cases))
