"""Dataset inspection (``fingerprint.json``) and duplicate filtering (``duplicates.csv``).

Every image is decoded once, in worker processes, and everything that needs its pixels is
done in that pass: validation, per-channel 256-bin histograms (exact mean, std and
percentiles for uint8), the label histogram, the byte digest, the perceptual hash, a key that
equal pixels share (pixels are digested, decoded again, only where two files share one),
the sector-scan evidence and, when the caller hands in an array writer (:class:`ArrayWriter`;
the pipeline hands in :class:`medplan.preprocessing.CaseArrays`), the resized arrays, so this
module knows nothing of the array format. Workers hand back small records, never pixels; the
per-case histograms, needed to leave duplicates out of the statistics once they are known, go
to a temporary memory-mapped file, so memory does not grow with the number of images. Images
medplan_convert decodes anyway get their records there (:class:`ConvertScan`), not decoded again.
"""
from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import numpy as np
from PIL import Image, ImageChops

import medplan
from medplan.datasets.raw import RawIndex, load_raw_index  # noqa: F401 - RawIndex is imported from here too
from medplan.duplicates import (DEFAULT_HASH, DEFAULT_HASH_SIZE, DEFAULT_THRESHOLD, DuplicateReport, bytes_digest,
                                check_hash_options, duplicate_decisions, exact_pixel_digests, perceptual_hash,
                                pixel_digest, pixel_key, preload_hash, summary_line, write_duplicates_csv)
from medplan.errors import MedplanError
from medplan.io import (atomic_write_json, decode_image, os_error_from_record, os_error_record, os_errors, read_label,
                        with_path)
from medplan.parallel import run_tasks

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
FINGERPRINT_FILE = "fingerprint.json"
DUPLICATES_FILE = "duplicates.csv"
# Bumped when the duplicate decisions change, so a fingerprint made under older rules is redone.
DUPLICATE_POLICY = 2  # 2: near-duplicates within one patient kept when the split is patient-aware


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


def _scan_case(task: tuple) -> dict:
    """Worker: decode one case once and compute everything the fingerprint needs."""
    case_id, image_path, label_path, opt = task
    try:
        return _scan(case_id, Path(image_path), Path(label_path), opt)
    except MedplanError as exc:  # handed back as text: the parent raises it after stopping the pool
        return {"case_id": case_id, "error": str(exc)}
    except OSError as exc:  # handed back with its file and operation, which pickling would lose
        return {"case_id": case_id, "error": "os", "os_error": os_error_record(exc)}


def _scan(case_id: str, image_path: Path, label_path: Path, opt: dict) -> dict:
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


def _pixel_digest_of(path: Path) -> str:
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


def _reserve(f, size: int, folder: Path) -> None:
    """Allocate the histogram file's blocks now: a full disk is then an OSError here, not a
    SIGBUS when the memory map touches a page later. Filesystems that cannot (EOPNOTSUPP,
    EINVAL) are left to allocate on write, as before."""
    if not hasattr(os, "posix_fallocate") or size <= 0:
        return
    try:
        os.posix_fallocate(f.fileno(), 0, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG):
            raise with_path(exc, folder, "write") from None


def patient_aware(raw: RawIndex) -> bool:
    """Whether the planner will split by patient: a group column with some group of 2+ cases
    (the default planner's ``group_kfold`` rule)."""
    return raw.group_column is not None and len(set(raw.groups.values())) < len(raw.case_ids)


def duplicates_line(fingerprint: dict) -> str:
    """One line for the logs of medplan_plan / medplan_preprocess: how many cases were dropped and why."""
    dup = fingerprint.get("duplicates") or {}
    if dup.get("summary"):
        return dup["summary"]
    why = {"identical_bytes": "identical bytes", "identical_pixels": "identical pixels", "phash": "near-duplicate"}
    decisions = [f"dropped: {why.get(reason, reason)}" for reason, n in (dup.get("by_reason") or {}).items()
                 for _ in range(int(n))]
    return summary_line(decisions, len(dup.get("kept_within_group") or []))


def _stats_from_hist(hist: np.ndarray) -> dict[str, float]:
    """Exact mean/std and inverted-CDF 0.5/99.5 percentiles of uint8 values from a histogram."""
    counts = [int(c) for c in hist]
    n = sum(counts)
    if n == 0:
        return {"mean": 0.0, "std": 0.0, "p005": 0.0, "p995": 0.0}
    s1 = sum(v * c for v, c in enumerate(counts))
    s2 = sum(v * v * c for v, c in enumerate(counts))
    var = (n * s2 - s1 * s1) / (n * n)  # exact integer numerator
    cdf = np.cumsum(np.asarray(hist, dtype=np.int64))
    return {"mean": s1 / n, "std": max(var, 0.0) ** 0.5,
            "p005": float(np.searchsorted(cdf, 0.005 * n)), "p995": float(np.searchsorted(cdf, 0.995 * n))}


def fingerprint_dataset(raw_dir: str | Path, out_dir: str | Path, *, hash_name: str = DEFAULT_HASH,
                        hash_size: int = DEFAULT_HASH_SIZE, threshold: int = DEFAULT_THRESHOLD,
                        arrays: ArrayWriter | None = None, num_workers: int | None = None,
                        progress: bool = True, precomputed: ConvertScan | None = None) -> dict:
    """Inspect a raw dataset, find duplicates and (optionally) write the arrays, in one pass.

    Writes ``out_dir/duplicates.csv`` and ``out_dir/fingerprint.json`` (atomically, after the
    whole pass succeeded) and returns the fingerprint. With ``arrays`` (an :class:`ArrayWriter`,
    e.g. ``medplan.preprocessing.CaseArrays.at(out_dir, (512, 512))``), the arrays are written
    for every kept case in the same pass, from the one decode of each image. ``precomputed``:
    the records the convert that wrote ``raw_dir`` computed (:class:`ConvertScan`); only the
    other cases are decoded, with the same result.
    """
    check_hash_options(hash_name, hash_size, threshold)
    raw = load_raw_index(raw_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if arrays is not None:
        arrays.prepare()
    opt = {"channels": raw.channels, "n_classes": len(raw.labels), "hash_name": hash_name,
           "hash_size": int(hash_size), "arrays": arrays}
    ids = raw.case_ids
    n = len(ids)
    done, done_hists = ({}, None) if precomputed is None else precomputed.records_for(raw, opt)
    todo = [i for i, c in enumerate(ids) if c not in done]
    tasks = [(ids[i], str(raw.image_paths[ids[i]]), str(raw.label_paths[ids[i]]), opt) for i in todo]
    preload_hash(hash_name)  # before the workers fork
    records: list[dict] = [{}] * n
    with os_errors(out_dir, "write"):
        tmp = tempfile.TemporaryFile(dir=out_dir, prefix=".fingerprint_hist.", suffix=".tmp")
    with tmp:
        shape = (n, 4, 256)
        _reserve(tmp, int(np.prod(shape)) * 4, out_dir)
        hists = np.memmap(tmp, dtype=np.uint32, mode="w+", shape=shape)
        try:
            for i, c in enumerate(ids):
                if c in done:
                    hists[i] = done_hists[done[c][0]]
                    records[i] = dict(done[c][1])
            with contextlib.closing(run_tasks(_scan_case, tasks, num_workers=num_workers, desc="fingerprint",
                                              progress=progress)) as results:
                for i, rec in zip(todo, results, strict=True):
                    if rec["error"] is not None:
                        if "os_error" in rec:
                            raise os_error_from_record(rec["os_error"])
                        raise MedplanError(rec["error"])
                    hists[i] = rec.pop("hist")
                    records[i] = rec
        except BaseException:
            if arrays is not None:  # arrays of the workers the pool stopped mid-write (joined by now)
                arrays.discard_partial()
            raise
        groups = [raw.groups[c] for c in ids] if patient_aware(raw) else None
        byte_digests = [r["bytes_digest"] for r in records]
        pixel_digests = exact_pixel_digests(byte_digests, [r["pixel_key"] for r in records],
                                            lambda i: _pixel_digest_of(raw.image_paths[ids[i]]))
        report = duplicate_decisions(ids, byte_digests, pixel_digests, [r["phash"] for r in records], threshold,
                                     groups)
        dups = report.dropped
        dropped = {d.case_id for d in dups}
        kept_idx = np.array([i for i, c in enumerate(ids) if c not in dropped], dtype=np.int64)
        total = np.zeros((4, 256), dtype=np.int64)
        for start in range(0, kept_idx.size, 4096):
            total += np.asarray(hists[kept_idx[start:start + 4096]], dtype=np.int64).sum(axis=0)
        del hists, done_hists
    input_size = None if arrays is None else arrays.input_size
    fingerprint = _summarise(raw, records, kept_idx, total, report, hash_name, hash_size, threshold, input_size)
    if arrays is not None:
        arrays.keep_only([ids[i] for i in kept_idx])
    write_duplicates_csv(out_dir / DUPLICATES_FILE, report.rows)
    atomic_write_json(out_dir / FINGERPRINT_FILE, fingerprint)
    return fingerprint


def _summarise(raw: RawIndex, records: list[dict], kept_idx: np.ndarray, total: np.ndarray, report: DuplicateReport,
               hash_name: str, hash_size: int, threshold: int, input_size: Sequence[int] | None) -> dict[str, Any]:
    dups = report.dropped
    kept = [records[i] for i in kept_idx]
    n_kept = len(kept)
    stored = raw.channels or (3 if any(r["channels"] == 3 for r in records) else 1)
    rgb_is_gray = stored == 3 and n_kept > 0 and all(r["is_gray"] for r in kept)
    seen = 1 if stored == 1 or rgb_is_gray else 3
    channel_hists = [total[3]] if seen == 1 else [total[0], total[1], total[2]]
    stats = [_stats_from_hist(h) for h in channel_hists]

    sizes = np.array([r["size"] for r in kept], dtype=np.int64).reshape(-1, 2)
    label_counts = np.array([r["label_counts"] for r in kept], dtype=np.int64).reshape(-1, len(raw.labels))
    pixel_count = label_counts.sum(axis=0)
    total_pixels = max(int(pixel_count.sum()), 1)
    names = sorted(raw.labels, key=raw.labels.get)
    groups = [raw.groups[r["case_id"]] for r in kept]
    group_sizes = np.unique(groups, return_counts=True)[1] if groups else np.zeros(0, dtype=np.int64)
    by_reason = {reason: sum(d.reason == reason for d in dups) for reason in ("identical_bytes", "identical_pixels",
                                                                               "phash")}
    dropped = {d.case_id: d for d in dups}
    per_case = {}
    for r in records:
        entry: dict[str, Any] = {"size": list(r["size"]), "channels": r["channels"],
                                 "group": raw.groups[r["case_id"]],
                                 "classes_present": [names[k] for k in np.nonzero(r["label_counts"])[0]],
                                 "border_black": round(r["border_black"], 4),
                                 "phash": r["phash"].hex(), "bytes_digest": r["bytes_digest"]}
        if r["channels"] == 3:
            entry["color_share"] = round(r["color_share"], 6)
        if r["case_id"] in dropped:
            entry["duplicate_of"] = dropped[r["case_id"]].kept_case_id
        per_case[r["case_id"]] = entry

    def median(col: int) -> int:
        return int(round(float(np.median(sizes[:, col])))) if n_kept else 0

    return {
        "dataset": raw.dataset.get("name", raw.raw_dir.name),
        "modality": raw.dataset.get("modality", "unknown"),
        "source_format": raw.dataset.get("source_format"),
        "num_cases": len(records),
        "num_kept": n_kept,
        "channels": stored,
        "rgb_is_gray": bool(rgb_is_gray),
        "channels_seen": seen,
        "color_evidence": {
            "gray_tolerance": GRAY_TOLERANCE, "max_color_share_for_gray": GRAY_MAX_COLOR_SHARE,
            "n_color_cases": int(sum(not r["is_gray"] for r in kept)),
            "max_color_share": round(max((r["color_share"] for r in kept), default=0.0), 6),
        },
        "sizes": {
            "median": [median(0), median(1)],
            "min": sizes.min(axis=0).tolist() if n_kept else [0, 0],
            "max": sizes.max(axis=0).tolist() if n_kept else [0, 0],
            "n_unique": int(len({tuple(s) for s in sizes.tolist()})),
        },
        "intensity": {
            "channels": seen,
            "source": "luma of the stored RGB (R=G=B)" if rgb_is_gray else ("RGB" if seen == 3 else "gray"),
            "mean": [s["mean"] for s in stats],
            "std": [s["std"] for s in stats],
            "percentile_00_5": [s["p005"] for s in stats],
            "percentile_99_5": [s["p995"] for s in stats],
            "n_pixels": int(channel_hists[0].sum()),
        },
        "labels": {
            "declared": dict(raw.labels),
            "values_found": [int(v) for v in np.nonzero(pixel_count)[0]],
            "pixel_count": {name: int(pixel_count[raw.labels[name]]) for name in names},
            "pixel_share": {name: float(pixel_count[raw.labels[name]]) / total_pixels for name in names},
            "presence": {name: (float(np.count_nonzero(label_counts[:, raw.labels[name]])) / n_kept if n_kept else 0.0)
                         for name in names},
        },
        "groups": {
            "column": raw.group_column,
            "n_groups": int(group_sizes.size),
            "max_cases_per_group": int(group_sizes.max()) if group_sizes.size else 0,
            "has_groups": bool(group_sizes.size < n_kept),
        },
        "border_black_fraction": float(np.mean([r["border_black"] for r in kept])) if n_kept else 0.0,
        "border_black_region": {"rows": CORNER_ROWS, "cols": CORNER_COLS, "level": BLACK_LEVEL},
        "duplicates": {
            "hash": hash_name, "hash_size": int(hash_size), "threshold": int(threshold),
            "policy": DUPLICATE_POLICY, "patient_aware": report.patient_aware,
            "n_dropped": len(dups), "dropped": [d.case_id for d in dups], "by_reason": by_reason,
            "decisions": {d.case_id: d.decision for d in dups},
            # near-duplicates within one patient, kept because the split is patient-aware: a
            # split that ignores patients must drop the first case of each pair as well
            "kept_within_group": [[d.kept_case_id, d.case_id, d.distance] for d in report.kept],
            "summary": report.summary(),
        },
        "arrays": None if input_size is None else {
            "input_size": [int(v) for v in input_size],
            "channels_by_case": {"1": int(sum(r["array_channels"] == 1 for r in kept)),
                                 "3": int(sum(r["array_channels"] == 3 for r in kept))},
        },
        "per_case": per_case,
        "created": datetime.now().isoformat(timespec="seconds"),
        "medplan_version": medplan.__version__,
    }
