"""nnU-Net v2 raw datasets (``DatasetXXX_Name/``), 2D only.

``dataset.json`` (``channel_names``, ``labels``, ``file_ending``, ``numTraining``) beside
``imagesTr/CASE_0000.EXT`` (``_0001``... for more channels), ``labelsTr/CASE.EXT`` and an
optional ``imagesTs/`` (no labels: counted in a note, not imported); or the explicit
``"dataset": {CASE: {"images": [...], "label": ...}}`` form of dataset.json.

medplan stores one image per case, gray or RGB, and one class index per pixel. So a case is
one ``_0000`` file: gray when ``channel_names`` has one entry, an RGB file when it has three
(nnU-Net's natural-image convention). What medplan cannot represent is refused with the
reason before anything is written: 3D images, region labels, an ignore label, other channel
counts, channel files that do not match ``channel_names``, a missing ``_0000`` file, or a
file ending medplan cannot read losslessly.

The same module names the format for :mod:`medplan.interop.nnunet`, which writes it.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from PIL import Image

from medplan.datasets.base import Case, Collected, Importer, IndexLabels, no_options, register, walk_dirs
from medplan.errors import MedplanError
from medplan.io import ITK_SUFFIXES, PIL_SUFFIXES, is_image_file, read_json

IMAGES_TR, LABELS_TR, IMAGES_TS = "imagesTr", "labelsTr", "imagesTs"
DATASET_JSON = "dataset.json"
SPLITS_FINAL = "splits_final.json"
#: ``CASE_0000.png``: nnU-Net's four-digit channel suffix
CHANNEL_DIGITS = 4
#: file endings medplan reads without loss (nnU-Net refuses JPEG for the same reason)
FILE_ENDINGS = tuple(s for s in PIL_SUFFIXES + ITK_SUFFIXES if s not in (".jpg", ".jpeg"))
#: the block medplan's export adds to dataset.json (groups, modality), read back on import
MEDPLAN_KEY = "medplan"
MODALITIES = ("echocardiography", "ultrasound", "dermoscopy", "endoscopy", "unknown")
#: PIL modes medplan reads as one gray channel (every other mode becomes RGB: :func:`medplan.io.read_image`)
GRAY_MODES = ("1", "L", "LA", "I", "F")


def channel_file(case_id: str, channel: int, file_ending: str) -> str:
    """``CASE_0000.png``: the file name nnU-Net gives channel ``channel`` of a case."""
    return f"{case_id}_{channel:0{CHANNEL_DIGITS}d}{file_ending}"


def is_nnunet_dataset(folder: Path) -> bool:
    """``folder`` holds an nnU-Net raw dataset: a dataset.json naming channels, labels and file ending."""
    path = folder / DATASET_JSON
    if not path.is_file():
        return False
    try:
        info = read_json(path)
    except MedplanError:
        return False
    return isinstance(info, dict) and "file_ending" in info and "labels" in info and \
        ("channel_names" in info or "modality" in info)


def find_root(source: Path) -> Path | None:
    """The nnU-Net dataset folder: ``source`` itself or a folder one level below."""
    return next((folder for folder in walk_dirs(source, depth=1) if is_nnunet_dataset(folder)), None)


# ----------------------------------------------------------------------------- dataset.json


def _file_ending(info: dict, path: Path) -> str:
    ending = info.get("file_ending")
    if not isinstance(ending, str) or not ending.startswith("."):
        raise MedplanError(f"'file_ending' must be a file ending such as '.png', got {ending!r}", path)
    if ending.lower() in (".jpg", ".jpeg"):
        raise MedplanError(f"file_ending {ending!r} is lossy (nnU-Net refuses it too): label maps must be stored "
                           "losslessly", path)
    if ending.lower() not in FILE_ENDINGS:
        raise MedplanError(f"file_ending {ending!r} is not a format medplan reads (one of {', '.join(FILE_ENDINGS)})",
                           path)
    return ending


def _channels(info: dict, path: Path) -> int:
    names = info.get("channel_names", info.get("modality"))
    if not isinstance(names, dict) or not names:
        raise MedplanError("'channel_names' must be a non-empty {\"0\": name, ...} object", path)
    if sorted(names, key=str) != [str(i) for i in range(len(names))]:
        raise MedplanError(f"'channel_names' keys must be \"0\"..\"{len(names) - 1}\", got {sorted(names)}", path)
    if len(names) not in (1, 3):
        raise MedplanError(f"{len(names)} channels ({', '.join(map(str, names.values()))}): a medplan dataset holds "
                           "1 (gray) or 3 (RGB) channels", path)
    return len(names)


def _labels(info: dict, path: Path) -> dict[str, int]:
    if "regions_class_order" in info:
        raise MedplanError("labels are regions (regions_class_order): medplan needs one class per pixel", path)
    labels = info.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise MedplanError("'labels' must be a non-empty {name: index} object", path)
    out: dict[str, int] = {}
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise MedplanError(f"label {name!r} is a region {list(value)}: medplan needs one class index per label "
                               "(region-based training cannot be represented)", path)
        if isinstance(value, bool) or not isinstance(value, int):
            raise MedplanError(f"label {name!r} has index {value!r}; expected an integer", path)
        if name == "ignore":
            raise MedplanError(f"'ignore' label ({value}): medplan has no ignore label", path)
        out[str(name)] = value
    if sorted(out.values()) != list(range(len(out))):
        raise MedplanError(f"label indices must be 0..{len(out) - 1} without gaps, got {sorted(out.values())}", path)
    return out


# ----------------------------------------------------------------------------- files


def _shape(path: Path) -> tuple[tuple[int, ...], int]:
    """``(size, components)`` from the file header: a PIL size plus its page count when it has
    several pages, or the ITK size (x, y[, z]); components per pixel (3 for RGB)."""
    try:
        if path.name.lower().endswith(ITK_SUFFIXES):
            import SimpleITK as sitk  # imported here: only ITK files need it

            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            return tuple(reader.GetSize()), int(reader.GetNumberOfComponents())
        with Image.open(path) as img:
            frames = int(getattr(img, "n_frames", 1))
            size = (*img.size, frames) if frames > 1 else tuple(img.size)
            return size, 1 if img.mode in GRAY_MODES or img.mode.startswith("I;") else 3
    except Exception as exc:  # PIL/ITK raise many types for corrupt files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MedplanError(f"cannot read image header ({reason})", path) from None


def _check_2d(path: Path) -> int:
    """Refuse a 3D image (more than one slice or page); return its components per pixel."""
    size, components = _shape(path)
    if len(size) > 2 and any(s > 1 for s in size[2:]):
        raise MedplanError(f"3D image (size {'x'.join(map(str, size))}): medplan handles 2D datasets only "
                           "(an nnU-Net 2D dataset has one slice per image)", path)
    return components


def _scan(folder: Path, ending: str) -> dict[str, dict[int, Path]]:
    """``{case: {channel: file}}`` of ``CASE_XXXX<ending>`` files (nnU-Net's naming)."""
    pattern = re.compile(rf"(?P<case>.+)_(?P<ch>\d{{{CHANNEL_DIGITS}}}){re.escape(ending)}")
    cases: dict[str, dict[int, Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file() or not path.name.endswith(ending):
            continue
        match = pattern.fullmatch(path.name)
        if match is None:
            raise MedplanError(f"not named CASE_{'X' * CHANNEL_DIGITS}{ending} (nnU-Net's channel suffix)", path)
        cases.setdefault(match["case"], {})[int(match["ch"])] = path
    return cases


def _explicit(info: dict, root: Path, path: Path) -> tuple[dict[str, dict[int, Path]], dict[str, Path]]:
    """The ``"dataset": {CASE: {"images": [...], "label": ...}}`` form of dataset.json."""
    entries = info["dataset"]
    if not isinstance(entries, dict) or not entries:
        raise MedplanError("'dataset' must be a non-empty {case: {\"images\": [...], \"label\": ...}} object", path)
    images: dict[str, dict[int, Path]] = {}
    labels: dict[str, Path] = {}

    def where(p: object) -> Path:
        if not isinstance(p, str):
            raise MedplanError(f"'dataset' file names must be strings, got {p!r}", path)
        expanded = Path(os.path.expandvars(p))
        return expanded if expanded.is_absolute() else root / expanded

    for case, entry in entries.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("images"), list) or "label" not in entry:
            raise MedplanError(f"'dataset' entry {case!r} needs \"images\" (a list) and \"label\"", path)
        images[str(case)] = {i: where(p) for i, p in enumerate(entry["images"])}
        labels[str(case)] = where(entry["label"])
    return images, labels


def _one_image(case: str, files: dict[int, Path], channels: int, ending: str) -> Path:
    """The case's image file, after checking its channel files against ``channel_names``."""
    found = sorted(files)
    shown = ", ".join(f"_{c:0{CHANNEL_DIGITS}d}" for c in found)
    if 0 not in files:
        raise MedplanError(f"case {case!r} has no _0000 channel file (found {shown})",
                           next(iter(files.values())).parent / channel_file(case, 0, ending))
    if len(found) > 1:
        if found == list(range(channels)):
            raise MedplanError(f"case {case!r} has {channels} channel files ({shown}): medplan stores one image file "
                               "per case, so store the 3 channels as one RGB file CASE_0000 (nnU-Net reads that as "
                               "3 channels too)", files[0])
        raise MedplanError(f"case {case!r} has channel files {shown} but dataset.json channel_names declares "
                           f"{channels} channel(s)", files[found[-1]])
    components = _check_2d(files[0])
    if components != channels:
        kind = {1: "a gray", 3: "an RGB"}.get(components, f"a {components}-component")
        raise MedplanError(f"case {case!r}: _0000 is {kind} image but dataset.json channel_names declares "
                           f"{channels} channel(s)", files[0])
    return files[0]


def _medplan_block(info: dict) -> tuple[dict[str, str], str]:
    """Groups and modality medplan's export recorded (nnU-Net keeps unknown keys)."""
    block = info.get(MEDPLAN_KEY)
    if not isinstance(block, dict):
        return {}, "unknown"
    groups = block.get("groups")
    groups = {str(k): str(v) for k, v in groups.items()} if isinstance(groups, dict) else {}
    modality = block.get("modality")
    return groups, modality if modality in MODALITIES else "unknown"


@register
class NnUNet(Importer):
    name = "nnunet"
    default_name = ""  # DatasetXXX_Name gives Name: see name_for
    description = "nnU-Net v2 raw dataset (DatasetXXX_Name: dataset.json, imagesTr/, labelsTr/), 2D"

    def name_for(self, source: Path) -> str:
        """The dataset name a ``DatasetXXX_Name`` folder suggests (``Name``); "" when it follows no such pattern."""
        root = find_root(Path(source)) or Path(source)
        match = re.fullmatch(r"Dataset\d{3}_(.+)", root.name)
        return match[1] if match else ""

    def detect(self, path: Path) -> bool:
        return find_root(path) is not None

    def collect(self, source: Path, **options: Any) -> Collected:
        no_options(self.name, options)
        root = find_root(source)
        if root is None:
            raise MedplanError("no nnU-Net v2 raw dataset found (expected dataset.json with channel_names, labels and "
                               f"file_ending beside {IMAGES_TR}/ and {LABELS_TR}/)", source)
        path = root / DATASET_JSON
        info = read_json(path)
        if not isinstance(info, dict):
            raise MedplanError("expected a JSON object", path)
        ending, channels, labels = _file_ending(info, path), _channels(info, path), _labels(info, path)
        notes: list[str] = []
        if "dataset" in info:
            images, label_files = _explicit(info, root, path)
            orphans: list[Path] = []
        else:
            for sub in (IMAGES_TR, LABELS_TR):
                if not (root / sub).is_dir():
                    raise MedplanError("folder not found", root / sub)
            images = _scan(root / IMAGES_TR, ending)
            label_files = {case: root / LABELS_TR / f"{case}{ending}" for case in images}
            on_disk = {p for p in (root / LABELS_TR).iterdir() if p.is_file() and p.name.endswith(ending)}
            orphans = sorted(on_disk - set(label_files.values()))
        if not images:
            raise MedplanError(f"no training cases ({IMAGES_TR}/CASE_0000{ending})", root / IMAGES_TR)
        declared = info.get("numTraining")
        if declared is not None and declared != len(images):
            raise MedplanError(f"numTraining is {declared!r} but {len(images)} training case(s) were found", path)
        groups, modality = _medplan_block(info)
        cases = []
        for case, files in images.items():
            image = _one_image(case, files, channels, ending)
            label = label_files[case]
            if not label.is_file():
                raise MedplanError(f"missing label {label.name} for this image", image)
            _check_2d(label)
            cases.append(Case(case_id=case, image=image, labels=[label], group=groups.get(case)))
        if (root / IMAGES_TS).is_dir():
            test = {p.name[:-len(ending) - CHANNEL_DIGITS - 1] for p in (root / IMAGES_TS).iterdir()
                    if p.is_file() and p.name.endswith(ending) and not p.name.startswith(".")}
            if test:
                notes.append(f"{IMAGES_TS}/ holds {len(test)} case(s) without labels: not imported")
        if "dataset" not in info:
            other = [p for p in (root / IMAGES_TR).iterdir() if is_image_file(p) and not p.name.endswith(ending)]
            if other:
                notes.append(f"{len(other)} file(s) in {IMAGES_TR}/ not ending in {ending}: ignored (as nnU-Net "
                             "ignores them)")
        if groups:
            notes.append("patient groups restored from the medplan block of dataset.json")
        return Collected(cases=cases, decoder=IndexLabels(len(labels)), labels=labels, modality=modality,
                         source_format="nnunet-v2", root=root, notes=notes, orphan_masks=orphans)
