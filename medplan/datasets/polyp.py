"""Binary polyp datasets: Kvasir-SEG and CVC-ClinicDB.

* Kvasir-SEG: ``images/*.jpg`` and ``masks/*.jpg`` (JPEG masks, thresholded at 128);
  ``kavsir_bboxes.json`` is ignored.
* CVC-ClinicDB: ``Original/`` and ``Ground Truth/`` (``.tif`` or ``.png``; the Kaggle copy has
  both under ``PNG/`` and ``TIF/``, PNG is used), masks thresholded at 128.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from medplan.datasets.base import (Case, Collected, Importer, ThresholdLabels, find_child, image_files, no_options,
                                   register, safe_case_id, stem_index, unnest, unused, walk_dirs)
from medplan.errors import MedplanError
from medplan.io import case_stem

LABELS = {"background": 0, "polyp": 1}


def _pair(images_dir: Path, masks_dir: Path, case_id) -> tuple[list[Case], list[Path]]:
    """Cases matched by stem, and the mask files no image was paired with."""
    mask_files = image_files(masks_dir)
    masks = stem_index(mask_files)
    cases = []
    for image in image_files(images_dir):
        stem = case_stem(image)
        mask = masks.get(stem)
        if mask is None:
            raise MedplanError(f"missing label: no file named {stem}.* in {masks_dir}", image)
        cases.append(Case(case_id=case_id(stem), image=image, labels=[mask]))
    if not cases:
        raise MedplanError("no images found", images_dir)
    return cases, unused(mask_files, cases)


def find_kvasir(source: Path, strict: bool) -> tuple[Path, Path] | None:
    for folder in walk_dirs(source, depth=2):
        images, masks = find_child(folder, "images"), find_child(folder, "masks")
        if images is None or masks is None:
            continue
        if not strict or (folder / "kavsir_bboxes.json").is_file() or "kvasir" in folder.name.lower():
            return unnest(images), unnest(masks)
    return None


@register
class Kvasir(Importer):
    name = "kvasir"
    default_name = "Kvasir"
    description = "Kvasir-SEG: images/ + masks/ (JPEG masks)"

    def detect(self, path: Path) -> bool:
        return find_kvasir(path, strict=True) is not None

    def collect(self, source: Path, **options: Any) -> Collected:
        no_options(self.name, options)
        folders = find_kvasir(source, strict=False)
        if folders is None:
            raise MedplanError("no Kvasir-SEG layout found (expected images/ and masks/)", source)
        cases, orphans = _pair(*folders, case_id=safe_case_id)
        return Collected(cases=cases, decoder=ThresholdLabels(128), labels=dict(LABELS), modality="endoscopy",
                         source_format="kvasir", root=source, orphan_masks=orphans)


def find_cvc(source: Path) -> tuple[Path, Path] | None:
    candidates = []
    for folder in walk_dirs(source, depth=3):
        original = find_child(folder, "Original")
        gt = find_child(folder, "Ground Truth", "GroundTruth", "Ground_Truth")
        if original is not None and gt is not None:
            candidates.append((unnest(original), unnest(gt)))
    if not candidates:
        return None
    # the Kaggle copy has PNG/ and TIF/ versions of the same frames: PNG decodes everywhere
    candidates.sort(key=lambda pair: (pair[0].parent.name.upper() != "PNG", len(pair[0].parts)))
    return candidates[0]


def _cvc_id(stem: str) -> str:
    return f"cvc_{int(stem):04d}" if stem.isdigit() else safe_case_id(stem)


@register
class Cvc(Importer):
    name = "cvc"
    default_name = "CVC"
    description = "CVC-ClinicDB: Original/ + Ground Truth/"

    def detect(self, path: Path) -> bool:
        return find_cvc(path) is not None

    def collect(self, source: Path, **options: Any) -> Collected:
        no_options(self.name, options)
        folders = find_cvc(source)
        if folders is None:
            raise MedplanError("no CVC-ClinicDB layout found (expected Original/ and 'Ground Truth/')", source)
        cases, orphans = _pair(*folders, case_id=_cvc_id)
        return Collected(cases=cases, decoder=ThresholdLabels(128), labels=dict(LABELS), modality="endoscopy",
                         source_format="cvc", root=source, orphan_masks=orphans)
