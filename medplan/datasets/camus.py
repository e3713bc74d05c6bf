"""CAMUS echocardiography, both official releases.

* 2019 challenge release: ``training/patientXXXX/patientXXXX_{2CH,4CH}_{ED,ES}.mhd`` (+ ``.raw``),
  ``..._gt.mhd``, ``Info_2CH.cfg`` / ``Info_4CH.cfg``; ``testing/`` has no ground truth.
* 2023 NIfTI release: ``[CAMUS_public/]database_nifti/patientXXXX/patientXXXX_{2CH,4CH}_{ED,ES}.nii.gz``
  and ``..._gt.nii.gz``, same ``Info_*.cfg``.

Sequences (``_sequence``, ``_half_sequence``) are ignored: only the annotated ED/ES frames are cases.

Axis order: both releases store the image with x = lateral (width) and y = depth (height), so
SimpleITK (``medplan.io.read_image``, array order (y, x)) yields rows = depth for both, with
the probe at the top. Loaders built on nibabel index (x, y) and therefore have to transpose;
with SimpleITK no transposition is needed, and the two releases give identical PNGs.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from medplan.datasets.base import (Case, Collected, Importer, IndexLabels, no_options, read_cfg, register,
                                   visible_dirs, walk_dirs)
from medplan.errors import MedplanError

LABELS = {"background": 0, "LV": 1, "LV wall": 2, "LA": 3}
VIEWS = ("2CH", "4CH")
INSTANTS = ("ED", "ES")
_PATIENT = re.compile(r"^patient\d+$", re.IGNORECASE)
_SUFFIX = {"2019": ".mhd", "2023": ".nii.gz"}

# Info_*.cfg keys -> cases.csv columns
_CFG_COLUMNS = {
    "ED": "ed_frame", "ES": "es_frame", "NbFrame": "nb_frame", "Sex": "sex", "Age": "age",
    "ImageQuality": "image_quality", "LVedv": "lv_edv", "LVesv": "lv_esv", "LVef": "lv_ef",
    "EF": "ef", "FrameRate": "frame_rate",
}


def _cfg_column(key: str) -> str:
    if key in _CFG_COLUMNS:
        return _CFG_COLUMNS[key]
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", key).lower().replace(" ", "_")


def _patient_dirs(folder: Path) -> list[Path]:
    return [p for p in visible_dirs(folder) if _PATIENT.match(p.name)]


def _layout_of(folder: Path) -> str | None:
    """'2019' or '2023' from the files in the first patient folders."""
    for patient in _patient_dirs(folder)[:5]:
        names = [p.name.lower() for p in patient.iterdir()]
        if any(n.endswith(".mhd") for n in names):
            return "2019"
        if any(n.endswith(".nii.gz") or n.endswith(".nii") for n in names):
            return "2023"
    return None


def find_roots(source: Path) -> list[tuple[str, Path, str]]:
    """``(split, folder of patient folders, layout)`` for every CAMUS part under ``source``."""
    roots: list[tuple[str, Path, str]] = []
    for folder in walk_dirs(source, depth=2):
        name = folder.name.lower()
        if name == "database_nifti" and _patient_dirs(folder):
            roots.append(("", folder, _layout_of(folder) or "2023"))
        elif name in ("training", "testing") and _patient_dirs(folder):
            layout = _layout_of(folder)
            if layout:
                roots.append((name, folder, layout))
    if not roots and _patient_dirs(source):
        layout = _layout_of(source)
        if layout:
            roots.append(("", source, layout))
    # one release only: prefer the folder closest to ``source`` for each split
    seen, unique = set(), []
    for split, folder, layout in roots:
        if split not in seen:
            seen.add(split)
            unique.append((split, folder, layout))
    return unique


def _image_file(patient: Path, stem: str, layout: str) -> Path | None:
    for suffix in ((".mhd",) if layout == "2019" else (".nii.gz", ".nii")):
        p = patient / f"{stem}{suffix}"
        if p.is_file():
            return p
    return None


@register
class Camus(Importer):
    name = "camus"
    default_name = "CAMUS"
    description = "CAMUS 2019 (.mhd, training/) or 2023 (NIfTI, database_nifti/) release"

    def detect(self, path: Path) -> bool:
        return bool(find_roots(path))

    def collect(self, source: Path, **options: Any) -> Collected:
        no_options(self.name, options)
        roots = find_roots(source)
        if not roots:
            raise MedplanError("no CAMUS layout found (expected training/patientXXXX/*.mhd of the 2019 "
                               "release or database_nifti/patientXXXX/*.nii.gz of the 2023 release)", source)
        layouts = {layout for _, _, layout in roots}
        if len(layouts) > 1:
            raise MedplanError("holds both the 2019 (.mhd) and the 2023 (NIfTI) CAMUS release; "
                               "convert one of them", source)
        layout = layouts.pop()
        cases: list[Case] = []
        notes: list[str] = []
        orphans: list[Path] = []
        skipped = 0
        for split, folder, _ in roots:
            for patient in _patient_dirs(folder):
                pid = patient.name
                for view in VIEWS:
                    cfg = read_cfg(patient / f"Info_{view}.cfg")
                    for instant in INSTANTS:
                        stem = f"{pid}_{view}_{instant}"
                        image = _image_file(patient, stem, layout)
                        if image is None:
                            gt = _image_file(patient, f"{stem}_gt", layout)
                            if gt is not None:
                                orphans.append(gt)
                            continue
                        gt = _image_file(patient, f"{stem}_gt", layout)
                        if gt is None:
                            if split == "testing":
                                skipped += 1
                                continue
                            raise MedplanError(f"missing label {stem}_gt{_SUFFIX[layout]} for this image", image)
                        prefix = "testing_" if split == "testing" else ""
                        meta: dict[str, Any] = {"view": view, "frame": instant,
                                                "image_quality": cfg.get("ImageQuality", "")}
                        if split:
                            meta["split"] = split
                        meta["frame_index"] = cfg.get(instant, "")
                        for key, value in cfg.items():
                            column = _cfg_column(key)
                            if column not in meta:
                                meta[column] = value
                        cases.append(Case(case_id=prefix + stem, image=image, labels=[gt],
                                          group=prefix + pid, metadata=meta))
        if skipped:
            notes.append(f"skipped {skipped} image(s) without ground truth in testing/")
        if not cases:
            raise MedplanError("no CAMUS ED/ES frames with ground truth found", source)
        return Collected(cases=cases, decoder=IndexLabels(len(LABELS)), labels=dict(LABELS),
                         modality="echocardiography", source_format=f"camus-{layout}",
                         root=source, notes=notes, orphan_masks=orphans)
