"""One case's fingerprint record, computed from pixels decoded once.

The per-case half of :mod:`medplan.fingerprint`: the worker that decodes a raw case and
:func:`scan_pixels`, the one function that turns pixels into a record (validation, histograms,
colour and sector evidence, hashes, and the arrays through an :class:`ArrayWriter`), used both
by the fingerprint pass and by medplan_convert (:class:`ConvertScan`), which hands over the
pixels it decodes anyway so they are not decoded again.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol

import numpy as np
from PIL import Image, ImageChops

from medplan.datasets.raw import RawIndex
from medplan.duplicates import (DEFAULT_HASH, DEFAULT_HASH_SIZE, DEFAULT_THRESHOLD, bytes_digest, check_hash_options,
                                perceptual_hash, pixel_digest, pixel_key, preload_hash)
from medplan.errors import MedplanError
from medplan.io import decode_image, os_error_record, os_errors, read_label

# A stored-RGB image counts as gray when fewer than GRAY_MAX_COLOR_SHARE of its pixels have
# channels that differ by more than GRAY_TOLERANCE (JPEG round trips of gray images differ by
# 1-3 grey levels; a tiny share tolerates a coloured caliper mark or text overlay).
GRAY_TOLERANCE = 10
GRAY_MAX_COLOR_SHARE = 0.001
# Near-black level and the top-corner regions probed for a sector (cone) acquisition: with the
# apex at the top centre, the top quarter of the outer fifths lies outside any usual sector.
BLACK_LEVEL = 5
CORNER_ROWS = 0.25
CORNER_COLS = 0.2


class ArrayWriter(Protocol):
    """Writes the arrays of one input size while the fingerprint pass decodes each image once.

    Handed in by the caller (the pipeline hands in :class:`medplan.preprocessing.CaseArrays`),
    so this module knows nothing of the array format; it is pickled to the worker processes.
    """

    input_size: tuple[int, int]

    def prepare(self) -> None:
        """Make the folder (before the pass)."""

    def write(self, case_id: str, image: np.ndarray | Image.Image, label: np.ndarray, channels: int) -> None:
        """Write one case (in a worker) with ``channels`` (1 or 3) input channels; ``image`` is
        the decoded 8-bit gray or RGB PIL image (or an array of the same pixels)."""

    def keep_only(self, case_ids: Iterable[str]) -> None:
        """Remove leftovers and the arrays of every other case (after the pass)."""

    def discard_partial(self) -> None:
        """Remove the half-written files of workers stopped mid-write (after a failed pass)."""


def scan_case(task: tuple) -> dict:
    """Worker: decode one case once and compute everything the fingerprint needs."""
    case_id, image_path, label_path, opt = task
    try:
        return scan_file(case_id, Path(image_path), Path(label_path), opt)
    except MedplanError as exc:  # handed back as text: the parent raises it after stopping the pool
        return {"case_id": case_id, "error": str(exc)}
    except OSError as exc:  # handed back with its file and operation, which pickling would lose
        return {"case_id": case_id, "error": "os", "os_error": os_error_record(exc)}


def scan_file(case_id: str, image_path: Path, label_path: Path, opt: dict) -> dict:
    """The record of one raw case, its image read and decoded here (the fingerprint pass)."""
    with os_errors(image_path, "read"):
        data = image_path.read_bytes()
    image = _checked_image(decode_image(data, image_path), image_path, opt["channels"])  # the one decode
    return scan_pixels(case_id, image, data, read_label(label_path), opt, image_path, label_path)


def _checked_image(image: Image.Image | np.ndarray, path: Path | None, channels: int | None) -> Image.Image:
    """An 8-bit gray or RGB image (decoded PIL image, or an array checked, then wrapped) with the
    channels dataset.json declares (``None``: not known yet); else the one-line error."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise MedplanError(f"expected an 8-bit image, got {image.dtype}", path)
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
            raise MedplanError(f"expected a gray or RGB image, got shape {image.shape}", path)
        image = Image.fromarray(np.ascontiguousarray(image), mode="L" if image.ndim == 2 else "RGB")
    stored = 1 if image.mode == "L" else 3
    if channels is not None and stored != channels:
        raise MedplanError(f"image has {stored} channel(s) but dataset.json declares {channels}", path)
    return image


def scan_pixels(case_id: str, image: Image.Image | np.ndarray, data: bytes, label: np.ndarray, opt: dict,
                image_path: Path | None = None, label_path: Path | None = None) -> dict:
    """The fingerprint record of one case from pixels already in memory: the one function that
    computes records, for the fingerprint pass (the raw file decoded) and for medplan_convert
    (:class:`ConvertScan`: the uint8 image it just encoded as ``data``, so it is not decoded
    again). ``opt``: channels (or None), n_classes, hash_name, hash_size, arrays (or None)."""
    image = _checked_image(image, image_path, opt["channels"])
    stored = 1 if image.mode == "L" else 3
    w, h = image.size
    if label.ndim != 2:
        raise MedplanError(f"label must be a single-channel (class index) image, got shape {label.shape}", label_path)
    if label.dtype != np.uint8:
        raise MedplanError(f"expected an 8-bit label image, got {label.dtype}", label_path)
    if label.shape != (h, w):
        raise MedplanError(f"label size {list(label.shape)} != image size {[h, w]}", label_path)
    label_hist = np.asarray(Image.fromarray(label, mode="L").histogram(), dtype=np.int64)
    n_classes = opt["n_classes"]
    bad = np.nonzero(label_hist[n_classes:])[0] + n_classes
    if bad.size:
        raise MedplanError(f"label values {bad.tolist()} are not declared classes 0..{n_classes - 1}", label_path)

    hist, gray, color_share, border_black = _intensity_evidence(image)
    is_gray = stored == 1 or color_share <= GRAY_MAX_COLOR_SHARE
    phash = perceptual_hash(gray, opt["hash_name"], opt["hash_size"])

    array_channels = None
    if opt["arrays"] is not None:
        # Channels the planner will choose if the whole set agrees with this image: a gray
        # image (stored gray or R=G=B) goes in as 1 channel, a colour one as 3. Cases that
        # guess wrong (a gray image in a colour set) are redone by preprocess_dataset.
        array_channels = 1 if is_gray else 3
        opt["arrays"].write(case_id, gray if array_channels == 1 else image, label, array_channels)
    return {
        "case_id": case_id, "error": None,
        "size": (int(h), int(w)), "channels": stored,
        "bytes_digest": bytes_digest(data), "pixel_key": pixel_key((h, w, stored), hist, phash), "phash": phash,
        "hist": hist, "label_counts": label_hist[:n_classes].astype(np.int64),
        "color_share": color_share, "is_gray": is_gray, "border_black": border_black,
        "array_channels": array_channels,
    }


@dataclass(frozen=True)
class PixelScanner:
    """In medplan_convert's workers (picklable): the record of an image it encoded as PNG ``data``;
    ``None`` where :func:`scan_pixels` refuses it (the fingerprint pass then reports it, as always)."""

    hash_name: str
    hash_size: int
    arrays: ArrayWriter | None

    def __call__(self, case_id: str, image: np.ndarray, data: bytes, label: np.ndarray | Path,
                 n_classes: int) -> dict | None:
        opt = {"channels": None, "n_classes": int(n_classes), "hash_name": self.hash_name,
               "hash_size": self.hash_size, "arrays": self.arrays}
        try:  # a label the converter copied undecoded is read here, as the fingerprint pass reads it
            label = label if isinstance(label, np.ndarray) else read_label(label)
            return scan_pixels(case_id, image, data, label, opt)
        except (MedplanError, OSError):
            return None


class ConvertScan:
    """Records medplan_convert computes from the pixels it decodes anyway: the pipeline hands one to
    the auto-import of a download, then to :func:`fingerprint_dataset`, which scans only the other
    cases. Never read back from a file: histograms go to an unlinked temporary file (flat memory)."""

    def __init__(self, out_dir: str | Path, *, hash_name: str = DEFAULT_HASH, hash_size: int = DEFAULT_HASH_SIZE,
                 threshold: int = DEFAULT_THRESHOLD, arrays: ArrayWriter | None = None):
        check_hash_options(hash_name, hash_size, threshold)  # before the convert, not after it
        self.out_dir, self.arrays = Path(out_dir), arrays
        self._scanner = PixelScanner(hash_name, int(hash_size), arrays)
        self.raw_dir: Path | None = None  # set once the convert has swapped the dataset in
        self._records: dict[str, tuple[int, dict]] = {}  # case id -> (histogram row, record)
        self._stamps, self._spool, self._rows = {}, None, 0

    @property
    def scanner(self) -> PixelScanner:
        """What the converter runs per case (taken when a convert starts)."""
        preload_hash(self._scanner.hash_name)  # before the converter's workers fork
        return self._scanner

    def add(self, case_id: str, record: dict) -> None:
        """Keep a worker's record of ``case_id`` (in the converting process)."""
        hist = np.ascontiguousarray(record.pop("hist"), dtype=np.uint32)
        if hist.shape != (4, 256) or record.get("case_id") != case_id:
            return  # not a record of this case: the fingerprint pass scans it
        with os_errors(self.out_dir, "write"):
            if self._spool is None:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                self._spool = tempfile.TemporaryFile(dir=self.out_dir, prefix=".fingerprint_fused.", suffix=".tmp")
            self._spool.write(hist.tobytes())
        self._records[case_id] = (self._rows, record)
        self._rows += 1

    def drop(self, case_id: str) -> None:
        """The converter changed the case's image after its record (a gray image stored as RGB)."""
        self._records.pop(case_id, None)

    def done(self, raw_dir: str | Path) -> None:
        """The convert succeeded: the records describe the files in ``raw_dir`` as they are now."""
        self.raw_dir = Path(raw_dir).resolve()
        self._stamps = {c: _stamps(self.raw_dir / "images" / f"{c}.png", self.raw_dir / "labels" / f"{c}.png")
                        for c in self._records}

    def records_for(self, raw: RawIndex, opt: dict) -> tuple[dict[str, tuple[int, dict]], np.ndarray | None]:
        """``({case_id: (row, record)}, histograms)`` usable for ``raw`` scanned with ``opt``: none
        unless ``raw`` is the dataset this object's convert wrote, with the same options."""
        if not (self.raw_dir is not None and Path(raw.raw_dir).resolve() == self.raw_dir and self._rows
                and opt["hash_name"] == self._scanner.hash_name and opt["hash_size"] == self._scanner.hash_size
                and opt["arrays"] == self.arrays):
            return {}, None
        n_classes, ids = len(raw.labels), set(raw.case_ids)
        usable = {c: (row, rec) for c, (row, rec) in self._records.items() if c in ids
                  and (raw.channels is None or rec["channels"] == raw.channels) and len(rec["label_counts"]) == n_classes
                  and self._stamps.get(c, ()) == _stamps(raw.image_paths[c], raw.label_paths[c])}  # unchanged
        with os_errors(self.out_dir, "read"):
            self._spool.flush()
        return usable, np.memmap(self._spool, dtype=np.uint32, mode="r", shape=(self._rows, 4, 256))

    def close(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        self._records.clear()


def _stamps(*paths: Path) -> tuple | None:
    """Size, modification time and inode of files (None if one is gone): whether they changed."""
    with contextlib.suppress(OSError):
        return tuple((st.st_size, st.st_mtime_ns, st.st_ino) for st in map(os.stat, paths))
    return None


def pixel_digest_of(path: Path) -> str:
    """:func:`pixel_digest` of a raw image, decoded again (only for the few cases whose pixels
    may equal another file's; see :func:`medplan.duplicates.exact_pixel_digests`)."""
    with os_errors(path, "read"):
        data = path.read_bytes()
    image = decode_image(data, path)
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    return pixel_digest(image)


def _intensity_evidence(image: Image.Image) -> tuple[np.ndarray, Image.Image, float, float]:
    """``(hist, gray, color_share, border_black)`` of an 8-bit gray or RGB image: the 256-bin
    histograms of the stored channels (rows 0..2) and of the luma (row 3), the luma image, the
    share of pixels whose channels differ by more than GRAY_TOLERANCE and the near-black share
    of the top corners. PIL's C histograms and channel arithmetic: several times faster than numpy."""
    w, h = image.size
    hist = np.zeros((4, 256), dtype=np.uint32)
    if image.mode == "L":
        gray = image
        hist[:] = gray.histogram()  # as RGB too (R=G=B), for sets that mix gray and RGB
        color_share = 0.0
    else:
        hist[:3] = np.asarray(image.histogram(), dtype=np.uint32).reshape(3, 256)
        gray = image.convert("L")
        hist[3] = gray.histogram()
        r, g, b = image.split()
        spread = ImageChops.lighter(ImageChops.difference(r, g), ImageChops.difference(g, b))
        color_share = float(sum(spread.histogram()[GRAY_TOLERANCE + 1:])) / (h * w)
    ch, cw = max(1, round(h * CORNER_ROWS)), max(1, round(w * CORNER_COLS))
    corners = [gray.crop(box).histogram() for box in ((0, 0, cw, ch), (w - cw, 0, w, ch))]
    border_black = float(sum(sum(c[:BLACK_LEVEL + 1]) for c in corners)) / (2 * ch * cw)
    return hist, gray, color_share, border_black
