"""What every importer shares: the case record, label decoders, folder search, the registry.

An importer only *finds* cases in an official download layout (``collect``); decoding,
validation and writing the medplan raw format happen once, in :mod:`medplan.datasets.writer`,
so every format gets the same checks and the same error messages.
"""
from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from PIL import Image

from medplan.errors import MedplanError
from medplan.io import ITK_SUFFIXES, case_stem, image_suffix, is_image_file, plain_png, read_image
from medplan.io import read_label as io_read_label
from medplan.registry import Registry

# Folders that never belong to a download: our own import target and temporary folders.
SKIP_DIR_NAMES = {"medplan", "__MACOSX", "__pycache__"}


# ----------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One image and the label file(s) it is paired with, as found in the download."""

    case_id: str
    image: Path
    labels: list[Path]
    group: str | None = None  # patient id; None -> case_id
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Collected:
    """What an importer found: the cases, the label decoder, and dataset.json facts."""

    cases: list[Case]
    decoder: "LabelDecoder"
    labels: dict[str, int]
    modality: str
    source_format: str
    root: Path  # the folder source paths in cases.csv are relative to
    notes: list[str] = field(default_factory=list)
    # mask files no image was paired with: listed in dataset.json and its notes, never dropped silently
    orphan_masks: list[Path] = field(default_factory=list)
    # every value of every label file, when the importer decoded them all already and its
    # IndexLabels decoder declares them all (the folder importer): the writer then copies 8-bit
    # gray PNG label maps without decoding them a second time
    label_values: set[int] | None = None


# ----------------------------------------------------------------------------- label decoders
# Module-level classes (not closures) so they pickle into worker processes.


def _gray(array: np.ndarray) -> np.ndarray:
    """Gray view of a mask: the mean of the colour channels when the file is RGB."""
    if array.ndim == 3:
        return array[..., :3].astype(np.float32).mean(axis=2)
    return array


def _as_integer_map(array: np.ndarray, path: Path) -> np.ndarray:
    if array.ndim == 3:
        if array.shape[2] >= 3 and np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(
                array[..., 0], array[..., 2]):
            array = array[..., 0]
        else:
            raise MedplanError("label map is a colour image; expected one channel of class indices", path)
    if array.dtype.kind == "f":
        rounded = np.rint(array)
        if not np.array_equal(rounded, array):
            raise MedplanError("label map holds non-integer values", path)
        array = rounded
    return array.astype(np.int64, copy=False)


def _value_list(values: Iterable[int], limit: int = 8) -> str:
    values = sorted(int(v) for v in values)
    text = ", ".join(str(v) for v in values[:limit])
    return text + (", ..." if len(values) > limit else "")


class LabelDecoder:
    """Turn the decoded label file(s) of one case into a uint8 class-index map."""

    # palette PNGs hold class indices in their pixel values: read those, not the colours
    palette_indices: bool = False

    def decode(self, arrays: list[np.ndarray], paths: list[Path]) -> np.ndarray:
        raise NotImplementedError


class IndexLabels(LabelDecoder):
    """Pixel values already are class indices 0..K-1 (CAMUS ground truth, plain label maps)."""

    palette_indices = True

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def decode(self, arrays: list[np.ndarray], paths: list[Path]) -> np.ndarray:
        out = None
        for array, path in zip(arrays, paths):
            counts = value_counts(array)  # uint8 maps (nearly all): checked from a histogram, not copied
            if counts is not None:
                values, bad = array, np.nonzero(counts[self.num_classes:])[0] + self.num_classes
            else:
                values = _as_integer_map(array, path)
                bad = np.unique(values[(values < 0) | (values >= self.num_classes)])
            if bad.size:
                raise MedplanError(f"label values {_value_list(bad)} outside the declared classes "
                                   f"0..{self.num_classes - 1}", path)
            out = values if out is None else np.maximum(out, values)
        return out.astype(np.uint8, copy=False)


class ValueMapLabels(LabelDecoder):
    """Lossless masks whose values map to classes (ISIC 0/255 -> 0/1, ``--map`` of the folder format)."""

    palette_indices = True

    def __init__(self, mapping: dict[int, int]):
        self.mapping = {int(k): int(v) for k, v in mapping.items()}

    def decode(self, arrays: list[np.ndarray], paths: list[Path]) -> np.ndarray:
        out = None
        for array, path in zip(arrays, paths):
            counts = value_counts(array)
            values = array if counts is not None else _as_integer_map(array, path)
            present = np.nonzero(counts)[0] if counts is not None else np.unique(values)
            bad = [v for v in present if int(v) not in self.mapping]
            if bad:
                raise MedplanError(f"label values {_value_list(bad)} outside the declared classes "
                                   f"(mapped values: {_value_list(self.mapping)})", path)
            if counts is not None:  # uint8: one table look-up per pixel
                table = np.zeros(256, dtype=np.uint8)
                for v in present:
                    table[v] = self.mapping[int(v)]
                result = table[values]
            else:
                result = np.zeros(values.shape, dtype=np.uint8)
                for v in present:
                    result[values == v] = self.mapping[int(v)]
            out = result if out is None else np.maximum(out, result)
        return out


class ThresholdLabels(LabelDecoder):
    """Binary masks stored lossy or anti-aliased (JPEG Kvasir, CVC, BUSI): gray >= threshold -> 1.

    Several mask files of one case (BUSI ``_mask``, ``_mask_1``) are merged by OR.
    """

    def __init__(self, threshold: float = 128):
        self.threshold = threshold

    def decode(self, arrays: list[np.ndarray], paths: list[Path]) -> np.ndarray:
        out = None
        for array in arrays:
            fg = _gray(array) >= self.threshold
            out = fg if out is None else (out | fg)
        return out.astype(np.uint8)


class ColourLabels(LabelDecoder):
    """Colour-coded masks saved as JPEG (BKAI-IGH NeoPolyp: green -> 1, red -> 2).

    A pixel is foreground when its strongest of R and G reaches ``threshold`` and that channel
    beats the other by ``margin``; red wins ties at the JPEG-blurred border between the two
    colours. Chroma subsampling smears colour across a few pixels at edges, so deciding by the
    dominant channel is far more robust than matching exact colours.
    """

    def __init__(self, colours: dict[str, int], threshold: int = 128, margin: int = 0):
        self.colours = colours  # {"green": 1, "red": 2}
        self.threshold = threshold
        self.margin = margin

    def decode(self, arrays: list[np.ndarray], paths: list[Path]) -> np.ndarray:
        out = None
        for array, path in zip(arrays, paths):
            if array.ndim != 3 or array.shape[2] < 3:
                raise MedplanError("expected a colour (RGB) mask", path)
            r = array[..., 0].astype(np.int16)
            g = array[..., 1].astype(np.int16)
            result = np.zeros(r.shape, dtype=np.uint8)
            red = (r >= self.threshold) & (r >= g + self.margin)
            green = (g >= self.threshold) & (g > r + self.margin) & ~red
            result[green] = self.colours["green"]
            result[red] = self.colours["red"]
            out = result if out is None else np.maximum(out, result)
        return out


def read_label(path: Path, palette_indices: bool) -> np.ndarray:
    """Decode a label file; a palette ("P") PNG gives its indices when those are the classes
    (:func:`medplan.io.read_label`), else its colours (colour-coded or thresholded masks)."""
    return io_read_label(path) if palette_indices else read_image(path)


def unused(files: Iterable[Path], cases: Iterable[Case]) -> list[Path]:
    """The label files of ``files`` that no case uses (orphan masks, or a second mask file
    with the same stem as the one used)."""
    used = {p for case in cases for p in case.labels}
    return sorted(p for p in files if p not in used)


# ----------------------------------------------------------------------------- PNG files kept as they are
# An 8-bit gray or RGB PNG already is a raw-format file of exactly the array medplan reads from
# it: the writer copies such files instead of decoding and re-encoding them.

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk every complete PNG ends with


def plain_png_shape(path: Path) -> tuple[int, ...] | None:
    """``(H, W)`` or ``(H, W, 3)`` of an 8-bit gray or RGB PNG, from its header alone (no pixels
    decoded); ``None`` for any other file and for one that does not end with the IEND chunk (a
    truncated download). The one decode of the fingerprint pass checks the pixels of a copied
    file (a corrupt stream is reported there, naming the file)."""
    try:
        with open(path, "rb") as f:
            if f.read(8) != PNG_SIGNATURE:
                return None
            f.seek(-len(PNG_END), os.SEEK_END)
            if f.read(len(PNG_END)) != PNG_END:
                return None
            f.seek(0)
            with Image.open(f) as img:
                if not plain_png(img):
                    return None
                w, h = img.size
                return (h, w) if img.mode == "L" else (h, w, 3)
    except Exception:  # noqa: BLE001 -- unreadable here: decoding it names the file and the reason
        return None


def read_label_keeping_png(path: Path, palette_indices: bool) -> tuple[np.ndarray, bytes | None]:
    """:func:`read_label` plus the file's bytes when it is an 8-bit gray PNG (its bytes then are
    a raw-format label map of exactly the returned values, read either way); else ``None``."""
    if image_suffix(path) not in ITK_SUFFIXES and path.is_file():
        try:
            data = path.read_bytes()
            with Image.open(io.BytesIO(data)) as img:
                if plain_png(img) and img.mode == "L":
                    img.load()
                    return np.asarray(img), data
        except Exception:  # noqa: BLE001 -- read_label below names the file and the reason
            pass
    return read_label(path, palette_indices), None


def label_value_set(path: Path) -> set[int]:
    """The values of a label file (a palette PNG's indices; a colour file's first channel),
    counted on the decoded PIL image itself for 8-bit gray and palette files (no numpy copies)."""
    if image_suffix(path) not in ITK_SUFFIXES:
        try:
            with Image.open(path) as img:
                if img.mode in ("L", "P"):
                    return {v for v, c in enumerate(img.histogram()) if c}
        except Exception:  # noqa: BLE001 -- read_label below names the file and the reason
            pass
    array = read_label(path, palette_indices=True)
    if array.ndim == 3:
        array = array[..., 0]
    counts = value_counts(array)
    return {int(v) for v in (np.nonzero(counts)[0] if counts is not None else np.unique(array))}


def value_counts(array: np.ndarray) -> np.ndarray | None:
    """Counts of the values 0..255 of a uint8 (H, W) array as int64 (PIL's C histogram, several
    times faster than ``np.unique``); ``None`` for any other array."""
    if array.dtype != np.uint8 or array.ndim != 2:
        return None
    return np.asarray(Image.fromarray(np.ascontiguousarray(array), mode="L").histogram(), dtype=np.int64)


# ----------------------------------------------------------------------------- folder helpers


def visible_dirs(path: Path) -> list[Path]:
    """Sub-folders of ``path`` a download may hold (no hidden, temporary or medplan folders)."""
    try:
        entries = sorted(path.iterdir())
    except OSError:
        return []
    return [p for p in entries if p.is_dir() and not p.name.startswith((".", "_")) and p.name not in SKIP_DIR_NAMES]


def walk_dirs(root: Path, depth: int = 2) -> Iterator[Path]:
    """``root`` and its visible sub-folders down to ``depth`` levels, breadth first."""
    level = [root]
    for d in range(depth + 1):
        nxt = []
        for p in level:
            yield p
            if d < depth:
                nxt.extend(visible_dirs(p))
        level = nxt


def find_child(parent: Path, *names: str) -> Path | None:
    """A child folder whose name matches one of ``names`` case-insensitively."""
    wanted = {n.lower() for n in names}
    for p in visible_dirs(parent):
        if p.name.lower() in wanted:
            return p
    return None


def unnest(path: Path) -> Path:
    """Follow doubly nested extraction folders (``train/train/``, ``X_Input/X_Input/``)."""
    while True:
        inner = path / path.name
        if inner.is_dir() and not any(is_image_file(p) for p in path.iterdir()):
            path = inner
        else:
            return path


def image_files(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (LICENSE, ATTRIBUTION.txt, .DS_Store are skipped)."""
    try:
        return sorted(p for p in folder.iterdir() if is_image_file(p))
    except OSError:
        return []


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_case_id(text: str) -> str:
    """A file-name-safe case id (``benign (1)`` -> ``benign_1``)."""
    cleaned = _SAFE.sub("_", text).strip("._")
    cleaned = re.sub(r"_+", "_", cleaned)
    return cleaned or "case"


def stem_index(files: Iterable[Path], strip_suffixes: tuple[str, ...] = ()) -> dict[str, Path]:
    """Map stems (minus any of ``strip_suffixes``, e.g. ``_segmentation``) to files."""
    index: dict[str, Path] = {}
    for p in files:
        stem = case_stem(p)
        for suffix in strip_suffixes:
            if stem.endswith(suffix):
                stem = stem[: -len(suffix)]
                break
        index.setdefault(stem, p)
    return index


def read_cfg(path: Path) -> dict[str, str]:
    """``Key: value`` lines (CAMUS ``Info_2CH.cfg``); unreadable lines are ignored."""
    values: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return values
    for line in text.splitlines():
        if ":" in line:
            key, _, value = line.partition(":")
            if key.strip():
                values[key.strip()] = value.strip()
    return values


# ----------------------------------------------------------------------------- registry


class Importer:
    """One official download layout. Subclasses set the class attributes and two methods."""

    name: str = ""
    default_name: str = ""  # dataset name when -d is not given
    description: str = ""
    generic: bool = False  # detects almost any folder: tried after every specific layout

    def detect(self, path: Path) -> bool:
        """Whether ``path`` (or a folder up to two levels below) holds this layout."""
        raise NotImplementedError

    def collect(self, source: Path, **options: Any) -> Collected:
        """Find every case; raise MedplanError when the layout is missing or empty."""
        raise NotImplementedError

    def name_for(self, source: Path) -> str:
        """The dataset name when -d is not given (a format may derive it from the folder)."""
        return self.default_name


IMPORTER_ENTRY_POINT_GROUP = "medplan.importers"
#: the built-in formats, in detection order (most specific first)
BUILTIN_IMPORTERS = tuple(f"medplan.datasets.{m}" for m in ("camus", "isic2018", "neopolyp", "busi", "polyp", "nnunet",
                                                                 "folder"))


def _importer_from_plugin(name: str, obj: Any) -> Importer:
    importer = obj() if isinstance(obj, type) and issubclass(obj, Importer) else obj
    if not isinstance(importer, Importer):
        raise TypeError(f"importer plug-in {name!r} is not an Importer subclass: {obj!r}")
    if importer.name != name:
        raise TypeError(f"importer plug-in {name!r} names its format {importer.name!r}; the entry point must use "
                        "the same name")
    return importer


#: format name -> importer, in detection order; third-party formats register through the
#: ``medplan.importers`` entry-point group (an Importer subclass named like the entry point)
FORMATS: Registry[Importer] = Registry("format", group=IMPORTER_ENTRY_POINT_GROUP, builtins=BUILTIN_IMPORTERS,
                                       identity=type, from_plugin=_importer_from_plugin)


def register(cls: type[Importer]) -> type[Importer]:
    """Class decorator: registers an instance of the importer under its ``name``."""
    FORMATS.add(cls.name, cls())
    return cls


def no_options(fmt: str, options: dict[str, Any]) -> None:
    unknown = sorted(k for k, v in options.items() if v is not None)
    if unknown:
        raise MedplanError(f"format {fmt!r} takes no option(s) {', '.join(unknown)}")
