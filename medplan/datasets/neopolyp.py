"""BKAI-IGH NeoPolyp (Small): ``train/`` images and ``train_gt/`` colour-coded JPEG masks.

Kaggle extracts to ``train/train/`` and ``train_gt/train_gt/``; both forms are accepted.
Masks are JPEG, so their colours are smeared at edges: green = non-neoplastic (1),
red = neoplastic (2), decided per pixel by the dominant channel (``ColourLabels``).
``test/`` has no ground truth and is skipped.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from medplan.datasets.base import (Case, Collected, ColourLabels, Importer, find_child, image_files, no_options,
                                   register, safe_case_id, stem_index, unnest, unused, walk_dirs)
from medplan.errors import MedplanError
from medplan.io import case_stem

LABELS = {"background": 0, "non-neoplastic": 1, "neoplastic": 2}


def find_folders(source: Path) -> tuple[Path, Path] | None:
    for folder in walk_dirs(source, depth=2):
        train, gt = find_child(folder, "train"), find_child(folder, "train_gt")
        if train is not None and gt is not None:
            return unnest(train), unnest(gt)
    return None


@register
class NeoPolyp(Importer):
    name = "neopolyp"
    default_name = "NeoPolyp"
    description = "BKAI-IGH NeoPolyp: train/ + train_gt/ (colour JPEG masks)"

    def detect(self, path: Path) -> bool:
        return find_folders(path) is not None

    def collect(self, source: Path, **options: Any) -> Collected:
        no_options(self.name, options)
        folders = find_folders(source)
        if folders is None:
            raise MedplanError("no NeoPolyp layout found (expected train/ and train_gt/)", source)
        train, gt = folders
        mask_files = image_files(gt)
        masks = stem_index(mask_files)
        cases = []
        for image in image_files(train):
            stem = case_stem(image)
            mask = masks.get(stem)
            if mask is None:
                raise MedplanError(f"missing label {stem}.jpeg in {gt}", image)
            cases.append(Case(case_id=safe_case_id(stem), image=image, labels=[mask]))
        if not cases:
            raise MedplanError("no images found in train/", train)
        return Collected(cases=cases, decoder=ColourLabels({"green": 1, "red": 2}), labels=dict(LABELS),
                         modality="endoscopy", source_format="neopolyp", root=source,
                         orphan_masks=unused(mask_files, cases))
