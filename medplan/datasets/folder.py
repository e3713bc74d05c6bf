"""Any images folder plus a masks folder, matched by file stem.

Masks are matched by stem, also with a ``_mask``/``_seg``/``_segmentation``/``_gt``/``_label``
suffix. Values become classes through ``value_map`` (``--map 0:0,255:1``); by default, when
every mask only holds 0 and 255 the masks are binary (255 -> 1), otherwise the values are
already class indices 0..K-1.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from medplan.datasets.base import (Case, Collected, IndexLabels, Importer, ValueMapLabels, find_child, image_files,
                                   label_value_set, register, safe_case_id, stem_index, unnest, unused, walk_dirs)
from medplan.errors import MedplanError
from medplan.io import case_stem

IMAGE_DIRS = ("images", "image", "imgs", "img", "inputs", "input")
MASK_DIRS = ("masks", "mask", "gt", "ground_truth", "groundtruth", "annotations", "segmentations")
MASK_SUFFIXES = ("_segmentation", "_mask", "_seg", "_gt", "_label")
MODALITIES = ("echocardiography", "ultrasound", "dermoscopy", "endoscopy", "unknown")


def parse_value_map(text: str | dict | None) -> dict[int, int] | None:
    """``"0:0,255:1"`` -> ``{0: 0, 255: 1}``."""
    if text is None or isinstance(text, dict):
        return None if text is None else {int(k): int(v) for k, v in text.items()}
    mapping: dict[int, int] = {}
    for item in str(text).split(","):
        if not item.strip():
            continue
        try:
            value, cls = item.split(":")
            mapping[int(value)] = int(cls)
        except ValueError:
            raise MedplanError(f"--map expects VALUE:CLASS pairs separated by commas, got {item.strip()!r}") from None
    if not mapping:
        raise MedplanError("--map is empty")
    classes = sorted(set(mapping.values()))
    if classes != list(range(len(classes))):
        raise MedplanError(f"--map classes must be contiguous 0..K-1, got {classes}")
    return mapping


def find_folders(source: Path, images: str | Path | None, masks: str | Path | None) -> tuple[Path, Path] | None:
    if images is not None or masks is not None:
        if images is None or masks is None:
            raise MedplanError("give both the images and the masks folder")
        pair = [Path(p) if Path(p).is_absolute() else source / p for p in (images, masks)]
        for p in pair:
            if not p.is_dir():
                raise MedplanError("folder not found", p)
        return pair[0], pair[1]
    for folder in walk_dirs(source, depth=2):
        i, m = find_child(folder, *IMAGE_DIRS), find_child(folder, *MASK_DIRS)
        if i is not None and m is not None:
            return unnest(i), unnest(m)
    return None


@register
class Folder(Importer):
    name = "folder"
    default_name = ""
    generic = True  # any images/ + masks/ pair: detected last
    description = "any images/ + masks/ folders matched by stem (--map VALUE:CLASS,...)"

    def detect(self, path: Path) -> bool:
        return find_folders(path, None, None) is not None

    def collect(self, source: Path, *, value_map: str | dict | None = None, images: str | Path | None = None,
                masks: str | Path | None = None, label_names: list[str] | str | None = None,
                modality: str | None = None, **options: Any) -> Collected:
        unknown = sorted(k for k, v in options.items() if v is not None)
        if unknown:
            raise MedplanError(f"format 'folder' takes no option(s) {', '.join(unknown)}")
        folders = find_folders(source, images, masks)
        if folders is None:
            raise MedplanError(f"no images/ and masks/ folders found (looked for {'/'.join(IMAGE_DIRS[:2])} "
                               f"and {'/'.join(MASK_DIRS[:3])})", source)
        images_dir, masks_dir = folders
        mask_files = image_files(masks_dir)
        index = stem_index(mask_files, strip_suffixes=MASK_SUFFIXES)
        cases = []
        for image in image_files(images_dir):
            stem = case_stem(image)
            mask = index.get(stem)
            if mask is None:
                raise MedplanError(f"missing label: no mask named {stem}.* in {masks_dir}", image)
            case_id = safe_case_id(stem)
            if case_id.isdigit():
                case_id = f"case_{case_id}"
            cases.append(Case(case_id=case_id, image=image, labels=[mask]))
        if not cases:
            raise MedplanError("no images found", images_dir)

        mapping = parse_value_map(value_map)
        notes = []
        if mapping is None:
            # decide once for the whole dataset, so a mask holding only 0 is read like its siblings
            values: set[int] = set()
            for case in cases:
                values.update(label_value_set(case.labels[0]))
            if values <= {0, 255}:
                mapping = {0: 0, 255: 1}
                notes.append("masks hold only 0 and 255: read as binary (255 -> 1)")
        if mapping is not None:
            num_classes = max(mapping.values()) + 1
            decoder = ValueMapLabels(mapping)
        else:
            num_classes = max(values) + 1
            if num_classes > 64:
                raise MedplanError(f"mask values {sorted(values)[:6]}... look like intensities, not class indices; "
                                   "give the mapping with --map VALUE:CLASS,...", masks_dir)
            decoder = IndexLabels(num_classes)
            notes.append(f"mask values are class indices 0..{num_classes - 1}")
        names = _label_names(label_names, num_classes)
        if modality is not None and modality not in MODALITIES:
            raise MedplanError(f"unknown modality {modality!r}; one of {', '.join(MODALITIES)}")
        return Collected(cases=cases, decoder=decoder, labels={n: i for i, n in enumerate(names)},
                         modality=modality or "unknown", source_format="folder", root=source, notes=notes,
                         orphan_masks=unused(mask_files, cases),
                         label_values=values if isinstance(decoder, IndexLabels) else None)


def _label_names(label_names: list[str] | str | None, num_classes: int) -> list[str]:
    if label_names is None:
        return ["background"] + [f"class_{i}" for i in range(1, num_classes)]
    names = [n.strip() for n in label_names.split(",")] if isinstance(label_names, str) else list(label_names)
    if len(names) != num_classes or len(set(names)) != len(names):
        raise MedplanError(f"expected {num_classes} distinct label names (background first), got {names}")
    return names
