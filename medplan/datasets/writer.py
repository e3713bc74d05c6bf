"""Write the medplan raw format from what an importer collected; find and auto-import datasets.

Every case is validated (readable image, label of the same size, values inside the declared
classes) and written as PNG inside a temporary folder that replaces ``$MEDPLAN_RAW/NAME`` only
when every case succeeded, so a failed import never damages an earlier good one. An 8-bit gray
or RGB PNG image is copied byte for byte from its header alone, not decoded (the fingerprint
pass decodes it once, and reports a corrupt one); other images are decoded and encoded as PNG
at the fastest lossless level; label maps that already hold class indices are copied too.
Decoding and PNG encoding run in a small process pool for large datasets.
Images with more than 8 bits per value share one intensity window (``intensity_window`` in
dataset.json); mask files no image was paired with are listed (``orphan_masks`` and a note).
"""
from __future__ import annotations

import csv
import io
import multiprocessing
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np
from PIL import Image

from medplan import __version__
from medplan.datasets.base import (FORMATS, PNG_SIGNATURE, Case, Collected, IndexLabels, LabelDecoder,
                                   plain_png_shape, read_label_keeping_png, value_counts)
from medplan.errors import MedplanError
from medplan.names import check_name
from medplan.io import (ITK_SUFFIXES, atomic_directory, atomic_write_json, image_suffix, os_error_from_record,
                        os_error_record, os_errors, png_bytes, read_image, read_image_keeping_png, read_json,
                        to_uint8)
from medplan.locks import exclusive_lock, remove_stale_siblings
from medplan.paths import raw_root as default_raw_root
from medplan.progress import progress_bar

RAW_FORMAT = "medplan-raw-1"
FIXED_COLUMNS = ["case_id", "group", "source_image", "source_label"]
AUTO_IMPORT_FOLDER = "medplan"
# below this many cases starting worker processes costs more than it saves
POOL_MIN_CASES = 64


class PixelRecords(Protocol):
    """Records computed from the pixels the converter decodes anyway (issue 13), handed in by
    the pipeline (:class:`medplan.casescan.ConvertScan`), so this module knows no fingerprint."""

    #: picklable; in the worker: ``scanner(case_id, uint8 image, its PNG bytes, label map or its
    #: written file, n_classes)``
    scanner: Callable[[str, np.ndarray, bytes, np.ndarray | Path, int], dict | None]

    def add(self, case_id: str, record: dict) -> None: ...

    def drop(self, case_id: str) -> None: ...

    def done(self, raw_dir: Path) -> None: ...


# ----------------------------------------------------------------------------- intensity window
# Images stored with more than 8 bits per value (16-bit PNG/TIFF, float or 16-bit ITK) are
# mapped to uint8 with ONE window for the whole dataset, so equal raw intensities stay equal
# between images. The window is estimated from a bounded random sample of every such image's
# values (memory stays flat whatever the dataset size); 8-bit images are never touched.

WINDOW_PERCENTILES = (0.5, 99.5)
WINDOW_SAMPLE = 1_000_000  # values kept for the percentiles, over all images together
WINDOW_MIN_PER_IMAGE = 256
WINDOW_SEED = 0  # the same download always gives the same window


def _is_8bit(path: Path) -> bool:
    """From the file header only (no pixels decoded): whether ``path`` holds 8-bit values."""
    try:
        if image_suffix(path) in ITK_SUFFIXES:
            import SimpleITK as sitk

            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            return reader.GetPixelID() in (sitk.sitkUInt8, sitk.sitkVectorUInt8)
        with open(path, "rb") as f:
            head = f.read(26)
        if head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR":
            # PIL reads every PNG as 8 bits per value but 16-bit gray (colour type 0), as mode "I;16"
            return not (head[24] == 16 and head[25] == 0)
        with Image.open(path) as img:
            return not (img.mode.startswith("I") or img.mode == "F")
    except Exception:  # noqa: BLE001 -- unreadable: the conversion names the file and the reason
        return True


def _channels_of(array: np.ndarray, path: Path) -> np.ndarray:
    """(H, W) or (H, W, 3): a single channel squeezed, alpha dropped."""
    if array.ndim == 3 and array.shape[2] in (1, 3, 4):
        return array[..., 0] if array.shape[2] == 1 else array[..., :3]
    if array.ndim != 2:
        raise MedplanError(f"expected a 2D gray or RGB image, got array shape {array.shape}", path)
    return array


def intensity_window(images: list[Path], *, progress: bool = False) -> dict[str, Any] | None:
    """One ``{"low", "high", "source", "images"}`` window for the images stored with more than
    8 bits per value (None when every image is 8-bit)."""
    wide = [p for p in images if not _is_8bit(p)]
    if not wide:
        return None
    rng = np.random.default_rng(WINDOW_SEED)
    per_image = max(WINDOW_MIN_PER_IMAGE, WINDOW_SAMPLE // len(wide))
    samples, small_integers = [], True
    for path in progress_bar(wide, total=len(wide), desc="intensity window", enabled=progress, unit="case"):
        array = _channels_of(read_image(path), path)
        if array.dtype == np.uint8 or array.dtype == bool:
            continue
        flat = array.reshape(-1)
        if flat.dtype.kind == "f":
            flat = flat[np.isfinite(flat)]
            small_integers = small_integers and bool(np.array_equal(np.rint(flat), flat))
        if flat.size == 0:
            continue
        small_integers = small_integers and float(flat.min()) >= 0 and float(flat.max()) <= 255
        take = flat if flat.size <= per_image else flat[rng.integers(0, flat.size, per_image)]
        samples.append(take.astype(np.float64))
    n = len(wide)
    what = f"{n} image(s) with more than 8 bits per value"
    if not samples or small_integers:
        return {"low": 0.0, "high": 255.0, "images": n,
                "source": f"{what} hold integers 0..255 only: stored unchanged"}
    values = np.concatenate(samples)
    low, high = (float(v) for v in np.percentile(values, WINDOW_PERCENTILES))
    if high <= low:
        low, high = float(values.min()), float(values.max())
    pct = "-".join(f"{q:g}" for q in WINDOW_PERCENTILES)
    return {"low": low, "high": high, "images": n,
            "source": f"{pct} percentiles of {what} ({values.size} sampled values)"}


# ----------------------------------------------------------------------------- one case (worker)


def _image_uint8(array: np.ndarray, path: Path, window: dict[str, Any] | None = None) -> np.ndarray:
    array = _channels_of(array, path)
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if window is not None:
        return to_uint8(array, (window["low"], window["high"]))
    # not announced by the file header (no window): the old per-image rules
    if array.dtype.kind in "ui" and array.size and array.min() >= 0 and array.max() <= 255:
        return array.astype(np.uint8)
    if array.dtype.kind == "f" and array.size and np.all(np.isfinite(array)) and array.min() >= 0 \
            and array.max() <= 255 and np.array_equal(np.rint(array), array):
        return array.astype(np.uint8)
    return to_uint8(array)


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _write_image(case: Case, target: Path, window: dict[str, Any] | None) -> tuple[tuple[int, ...], Any, bytes]:
    """Write the raw image of one case; returns its shape, (H, W) or (H, W, 3), and the uint8
    image with the PNG bytes written where it was encoded here (else ``None, b""``).

    An 8-bit gray or RGB PNG is copied byte for byte from its header alone (the one decode of
    the fingerprint pass checks its pixels); any other image is decoded, mapped to 8 bits and
    encoded as PNG at the fastest lossless level."""
    shape = plain_png_shape(case.image)  # 8 bits: the intensity window never applies to it
    if shape is not None:
        with os_errors(target, "write"):
            shutil.copyfile(case.image, target)  # the kernel copies; no pixels pass through here
        return shape, None, b""
    source, data = read_image_keeping_png(case.image)
    image = _image_uint8(source, case.image, window)
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise MedplanError("empty image", case.image)
    # unchanged by the writer (uint8: no window, no channel dropped): copied, not re-encoded
    encoded = data is None or image.dtype != source.dtype or image.shape != source.shape
    if encoded:
        data = png_bytes(image)
    with os_errors(target, "write"):
        target.write_bytes(data)
    return image.shape, (image if encoded else None), data


def _size_error(label_shape: tuple[int, ...], shape: tuple[int, ...], case: Case, path: Path) -> MedplanError:
    return MedplanError(f"label size {label_shape[0]}x{label_shape[1]} (HxW) differs from image size "
                        f"{shape[0]}x{shape[1]} of {case.image.name}", path)


def _write_label(case: Case, target: Path, decoder: LabelDecoder, shape: tuple[int, ...],
                 values_checked: bool) -> tuple[list[int] | None, np.ndarray | None]:
    """Write the raw label map of one case; returns the classes present and the map written
    (``None, None`` when the importer checked every value and the file was copied undecoded).

    A label file that is already an 8-bit gray PNG of exactly the class indices is copied."""
    if values_checked and len(case.labels) == 1:
        label_shape = plain_png_shape(case.labels[0])
        if label_shape is not None and len(label_shape) == 2:
            if label_shape != shape[:2]:
                raise _size_error(label_shape, shape, case, case.labels[0])
            with os_errors(target, "write"):
                shutil.copyfile(case.labels[0], target)
            return None, None
    arrays, data = [], None
    for path in case.labels:
        array, data = read_label_keeping_png(path, decoder.palette_indices)
        if array.shape[:2] != shape[:2]:
            raise _size_error(array.shape, shape, case, path)
        arrays.append(array)
    label = decoder.decode(arrays, case.labels)
    if data is None or len(arrays) != 1 or not (label is arrays[0] or np.array_equal(label, arrays[0])):
        data = png_bytes(label)
    with os_errors(target, "write"):
        target.write_bytes(data)
    counts = value_counts(label)
    return (np.nonzero(counts)[0].tolist() if counts is not None else np.unique(label).tolist()), label


def _convert_case(task: tuple) -> dict[str, Any]:
    """Check and write one case; errors come back as data so the pool stays simple (an OS error
    keeps its number, reason, file and operation across the process boundary). With a
    ``scanner``, the fingerprint record of an image encoded here comes back too, from its pixels."""
    case, decoder, out, root, window, values_checked, scanner, n_classes = task
    label_path = Path(out) / "labels" / f"{case.case_id}.png"
    try:
        shape, image, data = _write_image(case, Path(out) / "images" / f"{case.case_id}.png", window)
        classes, label = _write_label(case, label_path, decoder, shape, values_checked)
        record = None
        if scanner is not None and image is not None:  # a label copied undecoded: the scanner reads it
            record = scanner(case.case_id, image, data, label_path if label is None else label, n_classes)
    except MedplanError as exc:
        text = str(exc)
        if exc.path is not None and text.startswith(f"{exc.path}: "):
            text = text[len(exc.path) + 2:]
        return {"error": text, "path": exc.path}
    except OSError as exc:
        return {"os_error": os_error_record(exc)}
    row = {"case_id": case.case_id, "group": case.group or case.case_id,
           "source_image": _relative(case.image, Path(root)),
           "source_label": ";".join(_relative(p, Path(root)) for p in case.labels)}
    row.update(case.metadata)
    return {"row": row, "channels": 1 if len(shape) == 2 else 3, "classes": classes, "record": record}


def _in_dest(exc: OSError, tmp: Path, dest: Path) -> OSError:
    """The error naming ``dest/...`` instead of the hidden folder the import is built in."""
    name = os.fsdecode(exc.filename) if exc.filename else None
    if name is None or not (name == str(tmp) or name.startswith(str(tmp) + os.sep)):
        return exc
    number, reason, _, operation = os_error_record(exc)
    return os_error_from_record((number, reason, str(dest) + name[len(str(tmp)):], operation))


def _run(tasks: list[tuple], workers: int) -> Iterator[dict[str, Any]]:
    if workers <= 1 or len(tasks) < POOL_MIN_CASES:
        yield from map(_convert_case, tasks)
        return
    # fork on Linux: no re-import of the caller's script (a spawn would run an unguarded script
    # again in every worker); the workers only use PIL, numpy and SimpleITK (fork-safe in ITK 5)
    method = "fork" if sys.platform.startswith("linux") else None
    executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method))
    try:
        chunk = max(1, min(16, len(tasks) // (workers * 8)))
        yield from executor.map(_convert_case, tasks, chunksize=chunk)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


ORPHANS_LISTED = 20


def orphan_note(orphans: list[str]) -> str | None:
    """``3 mask file(s) not paired with any image, not imported: a.png, b.png, c.png``."""
    if not orphans:
        return None
    shown = ", ".join(orphans[:ORPHANS_LISTED])
    more = f" and {len(orphans) - ORPHANS_LISTED} more (all in dataset.json orphan_masks)" \
        if len(orphans) > ORPHANS_LISTED else ""
    return f"{len(orphans)} mask file(s) not paired with any image, not imported: {shown}{more}"


def write_raw(collected: Collected, dest: Path, name: str, source: Path, *, progress: bool = True,
              workers: int | None = None, scan: PixelRecords | None = None) -> dict[str, Any]:
    """Convert every collected case into ``dest`` (atomically); returns dataset.json. ``scan``
    gets the fingerprint records of the images decoded here, and ``dest`` once it is in place."""
    cases = collected.cases
    check_name(name, "dataset name")
    ids: dict[str, Case] = {}
    for case in cases:
        check_name(case.case_id, "case id", case.image)
        if case.case_id in ids:
            raise MedplanError(f"two source images give the same case id {case.case_id!r} "
                               f"(also {ids[case.case_id].image})", case.image)
        ids[case.case_id] = case
    if workers is None:
        workers = min(2, os.cpu_count() or 1)
    notes = list(collected.notes)
    orphans = sorted(_relative(p, collected.root) for p in collected.orphan_masks)
    if orphans:
        notes.append(orphan_note(orphans))
    window = intensity_window([case.image for case in cases], progress=progress)
    if window is not None:
        notes.append(f"{window['images']} image(s) with more than 8 bits per value mapped to 0..255 with one "
                     f"window {window['low']:g}..{window['high']:g} for the whole dataset ({window['source']})")
    with atomic_directory(dest) as tmp:
        try:
            dataset = _fill(tmp, collected, cases, name, source, notes, orphans, window, workers, progress, scan)
        except OSError as exc:
            raise _in_dest(exc, tmp, dest) from None
    if scan is not None:
        scan.done(dest)
    return dataset


def _fill(tmp: Path, collected: Collected, cases: list[Case], name: str, source: Path, notes: list[str],
          orphans: list[str], window: dict[str, Any] | None, workers: int, progress: bool,
          scan: PixelRecords | None) -> dict[str, Any]:
    """Write every case, cases.csv and dataset.json into the temporary folder ``tmp``."""
    (tmp / "images").mkdir()
    (tmp / "labels").mkdir()
    values_checked = collected.label_values is not None and isinstance(collected.decoder, IndexLabels) and all(
        0 <= v < collected.decoder.num_classes for v in collected.label_values)
    scanner = None if scan is None else scan.scanner
    tasks = [(case, collected.decoder, str(tmp), str(collected.root), window, values_checked, scanner,
              len(collected.labels)) for case in cases]
    rows, channels, present = [], [], set()
    results = _run(tasks, workers)
    bar = progress_bar(results, total=len(tasks), desc=f"convert {name}", enabled=progress, unit="case")
    try:
        for result in bar:
            if "error" in result:
                raise MedplanError(result["error"], result["path"])
            if "os_error" in result:
                raise os_error_from_record(result["os_error"])
            rows.append(result["row"])
            channels.append(result["channels"])
            present.update(result["classes"] if result["classes"] is not None else collected.label_values)
            if result["record"] is not None:
                scan.add(result["row"]["case_id"], result["record"])
    finally:
        if hasattr(bar, "close"):
            bar.close()
        results.close()  # stops the worker pool at once on the first bad case
    stored = 3 if 3 in channels else 1
    if set(channels) == {1, 3}:
        # one dataset, one channel count: store the few gray images as RGB (R = G = B)
        for row, ch in zip(rows, channels):
            if ch == 1:
                path = tmp / "images" / f"{row['case_id']}.png"
                gray = read_image(path)
                with os_errors(path, "write"):
                    path.write_bytes(png_bytes(np.repeat(gray[..., None], 3, axis=2)))
                if scan is not None:
                    scan.drop(row["case_id"])  # its record was of the gray file
        notes.append(f"{channels.count(1)} gray image(s) stored as RGB (R = G = B) to match the others")
    missing = [n for n, i in collected.labels.items() if i not in present and i != 0]
    if missing:
        notes.append(f"class(es) {', '.join(missing)} never appear in any label map")
    _write_cases_csv(tmp / "cases.csv", rows)
    dataset = {
        "name": name,
        "format": RAW_FORMAT,
        "source_format": collected.source_format,
        "source": str(source),
        "modality": collected.modality,
        "channels": stored,
        "labels": collected.labels,
        "group_column": "group" if any(c.group for c in cases) else None,
        "num_cases": len(rows),
        "intensity_window": window,
        "orphan_masks": orphans,
        "created": datetime.now().isoformat(timespec="seconds"),
        "medplan_version": __version__,
        "notes": notes,
    }
    atomic_write_json(tmp / "dataset.json", dataset)
    return dataset


def _write_cases_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns = list(FIXED_COLUMNS)
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with os_errors(path, "write"):
        path.write_text(buf.getvalue(), encoding="utf-8")


# ----------------------------------------------------------------------------- public API


def detect_format(path: str | Path) -> str | None:
    """Which official download layout ``path`` holds (``camus``, ``isic2018``, ...), or None.

    Formats are tried from the most specific to the most generic (``folder`` last): the
    built-ins in their order, then plug-ins, then generic ones.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        return None
    for fmt, importer in sorted(FORMATS.items(), key=lambda kv: kv[1].generic):  # stable: order kept otherwise
        if importer.detect(path):
            return fmt
    return None


def _resolve_format(fmt: str, source: Path) -> str:
    key = fmt.lower().replace("-", "").replace("_", "")
    aliases = {"isic": "isic2018", "isic18": "isic2018", "bkai": "neopolyp", "kvasirseg": "kvasir",
               "cvcclinicdb": "cvc"}
    key = aliases.get(key, key)
    if key == "auto":
        detected = detect_format(source)
        if detected is None:
            raise MedplanError(f"no known download layout found (known formats: {', '.join(FORMATS)})", source)
        return detected
    if key not in FORMATS:
        raise MedplanError(f"unknown format {fmt!r}{FORMATS.suggest(fmt)}; known formats: {', '.join(FORMATS)}, auto")
    return key


def convert_dataset(fmt: str, source: str | Path, name: str | None = None, *, raw_root: Path | None = None,
                    progress: bool = True, force: bool = False, workers: int | None = None,
                    scan: PixelRecords | None = None, **options: Any) -> Path:
    """Import an official download layout into ``$MEDPLAN_RAW/NAME``; returns that folder.

    The download is only read. When it lies inside ``$MEDPLAN_RAW/NAME`` itself, the
    dataset is written to ``$MEDPLAN_RAW/NAME/medplan/`` beside it. An existing dataset is
    replaced only with ``force=True``, and only once the new import has fully succeeded.
    Format options: ``value_map``, ``images``, ``masks``, ``label_names``, ``modality`` (folder).
    ``scan``: see :func:`write_raw` (the pipeline's auto-import fingerprints while converting).
    """
    source = Path(source).expanduser()
    if not source.is_dir():
        raise MedplanError("source folder not found", source)
    source = source.resolve()
    fmt = _resolve_format(fmt, source)
    importer = FORMATS[fmt]
    name = name or importer.name_for(source)
    if not name:
        raise MedplanError(f"format {fmt!r} needs a dataset name (-d NAME)")
    check_name(name, "dataset name")
    root = Path(raw_root).expanduser() if raw_root is not None else default_raw_root()
    dest = root.resolve() / name
    if source == dest or dest in source.parents:
        dest = dest / AUTO_IMPORT_FOLDER
    if source == dest or dest in source.parents:
        raise MedplanError(f"the download must not lie inside the output folder {dest}", source)
    # one convert of a dataset at a time: the lock lies beside the folder, which is swapped in whole
    with exclusive_lock(dest.parent / f".{dest.name}.lock", purpose=f"convert {name}"):
        remove_stale_siblings(dest)  # the temporary folders of a killed convert of this dataset
        if dest.exists():
            if (dest / "dataset.json").is_file():
                if not force:
                    raise MedplanError(f"dataset {name!r} already exists; use --force to replace it", dest)
            elif dest.is_dir() and any(dest.iterdir()):
                raise MedplanError("exists and is not a medplan raw dataset (no dataset.json); not replacing it", dest)
        collected = importer.collect(source, **options)
        write_raw(collected, dest, name, source, progress=progress, workers=workers, scan=scan)
    return dest


def read_dataset_json(folder: Path) -> dict[str, Any]:
    return read_json(Path(folder) / "dataset.json")
