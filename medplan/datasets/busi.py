"""BUSI breast ultrasound: ``Dataset_BUSI_with_GT/{benign,malignant,normal}/``.

``benign (1).png`` has ``benign (1)_mask.png`` and sometimes ``benign (1)_mask_1.png`` ...
(several lesions): the masks of one image are merged by OR into one binary lesion map.
The folder name is kept as the ``diagnosis`` column; case ids are made file-name safe
(``benign (1)`` -> ``benign_1``).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from medplan.datasets.base import (Case, Collected, Importer, ThresholdLabels, find_child, image_files, no_options,
                                   register, safe_case_id, unused, walk_dirs)
from medplan.errors import MedplanError
from medplan.io import case_stem

LABELS = {"background": 0, "lesion": 1}
DIAGNOSES = ("benign", "malignant", "normal")
_MASK = re.compile(r"^(?P<stem>.+?)_mask(_\d+)?$")


def find_root(source: Path) -> Path | None:
    for folder in walk_dirs(source, depth=2):
        subdirs = [find_child(folder, d) for d in DIAGNOSES]
        if any(d is not None and any(_MASK.match(case_stem(p)) for p in image_files(d)) for d in subdirs):
            return folder
    return None


@register
class Busi(Importer):
    name = "busi"
    default_name = "BUSI"
    description = "BUSI: Dataset_BUSI_with_GT/{benign,malignant,normal}/ with *_mask*.png"

    def detect(self, path: Path) -> bool:
        return find_root(path) is not None

    def collect(self, source: Path, **options: Any) -> Collected:
        no_options(self.name, options)
        root = find_root(source)
        if root is None:
            raise MedplanError("no BUSI layout found (expected benign/, malignant/, normal/ with *_mask.png)", source)
        cases = []
        all_masks: list[Path] = []
        for diagnosis in DIAGNOSES:
            folder = find_child(root, diagnosis)
            if folder is None:
                continue
            masks: dict[str, list[Path]] = {}
            images = []
            for p in image_files(folder):
                m = _MASK.match(case_stem(p))
                if m:
                    masks.setdefault(m.group("stem"), []).append(p)
                    all_masks.append(p)
                else:
                    images.append(p)
            for image in images:
                stem = case_stem(image)
                found = sorted(masks.get(stem, []), key=lambda p: (len(p.name), p.name))
                if not found:
                    raise MedplanError(f"missing label {stem}_mask.png", image)
                cases.append(Case(case_id=safe_case_id(stem), image=image, labels=found,
                                  metadata={"diagnosis": folder.name.lower()}))
        if not cases:
            raise MedplanError("no BUSI images found", root)
        return Collected(cases=cases, decoder=ThresholdLabels(128), labels=dict(LABELS), modality="ultrasound",
                         source_format="busi", root=source, orphan_masks=unused(all_masks, cases))
