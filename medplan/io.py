"""File I/O shared by every stage: image reading with clear errors, atomic writes.

Every file another stage will trust is written to a temporary name in the same folder and
then renamed, so a kill at any moment leaves either the old file or the new one.
"""
from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from medplan.errors import MedplanError
from medplan.names import check_name

ITK_SUFFIXES = (".mhd", ".nii.gz", ".nii", ".nrrd", ".mha")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
IMAGE_SUFFIXES = PIL_SUFFIXES + ITK_SUFFIXES


def image_suffix(path: str | Path) -> str:
    """Lower-case suffix, treating ``.nii.gz`` as one suffix."""
    name = str(path).lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return Path(name).suffix


def case_stem(path: str | Path) -> str:
    """File name without its image suffix (``a.nii.gz`` -> ``a``)."""
    name = Path(path).name
    suffix = image_suffix(name)
    return name[: len(name) - len(suffix)] if suffix else name


def is_image_file(path: str | Path) -> bool:
    return Path(path).is_file() and image_suffix(path) in IMAGE_SUFFIXES and not Path(path).name.startswith(".")


def images_by_case(folder: str | Path, what: str = "image", *, skip: Callable | None = None) -> dict[str, Path]:
    """Case id (name without image suffix) -> image file of ``folder``, sorted: the one rule by which
    raw data, predictions and inputs pair up. Two files of one case are an error naming both."""
    found: dict[str, Path] = {}
    for path in sorted(Path(folder).iterdir()):
        if not is_image_file(path) or (skip is not None and skip(path)):
            continue
        stem = case_stem(path)
        if stem in found:
            raise MedplanError(f"two {what} files for case {stem!r} ({found[stem].name}, {path.name})", path)
        found[stem] = path
    return found


def read_image(path: str | Path) -> np.ndarray:
    """Decode a 2D image to ``(H, W)`` or ``(H, W, C)``; raise MedplanError if unreadable.

    PIL formats keep their dtype (uint8 for 8-bit files). ITK formats (.mhd, .nii.gz) are
    read with SimpleITK, whose array order is (z, y, x): a single slice is squeezed to (y, x).
    """
    path = Path(path)
    if not path.is_file():
        raise MedplanError("file not found", path)
    suffix = image_suffix(path)
    try:
        if suffix in ITK_SUFFIXES:
            import SimpleITK as sitk

            array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
            if array.ndim == 3 and array.shape[0] == 1:
                array = array[0]
            if array.ndim not in (2, 3):
                raise ValueError(f"expected a 2D image, got array shape {array.shape}")
            return np.ascontiguousarray(array)
        with Image.open(path) as img:
            return _pil_array(img)
    except MedplanError:
        raise
    except Exception as exc:  # PIL/ITK raise many types for corrupt files
        raise _unreadable(exc, path) from None


def _unreadable(exc: Exception, path: Path) -> MedplanError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return MedplanError(f"cannot read image ({reason})", path)


def _pil_array(img: Image.Image) -> np.ndarray:
    """The pixels of an opened PIL image as :func:`read_image` returns them."""
    img.load()
    if img.mode in ("P", "PA", "LA", "RGBA", "CMYK", "YCbCr", "1"):
        img = img.convert("RGB" if img.mode not in ("LA", "1") else "L")
    elif img.mode == "I;16" or img.mode.startswith("I;16"):
        return np.asarray(img, dtype=np.uint16)
    return np.asarray(img)


def plain_png(img: Image.Image) -> bool:
    """From the header of an opened, not yet loaded image: an 8-bit gray or RGB PNG (no alpha,
    palette, transparency chunk, lower or higher bit depth, animation), i.e. a file whose bytes
    are already a valid raw-format image of exactly the array :func:`read_image` returns."""
    if img.format != "PNG" or img.mode not in ("L", "RGB") or len(img.tile) != 1:
        return False
    rawmode = img.tile[0][3]  # "L" / "RGB" for 8 bits; "L;4", "RGB;16B", ... otherwise
    return rawmode == img.mode and "transparency" not in img.info and not getattr(img, "is_animated", False)


def decode_image(data: bytes, path: str | Path) -> Image.Image | np.ndarray:
    """The image in ``data`` (the bytes of ``path``, already read), as :func:`read_image` reads it,
    but as a loaded PIL image when it is 8-bit gray or RGB: the fingerprint pass computes its
    histograms, hashes and resized arrays on that image without copying the pixels to numpy and
    back. Any other image comes as :func:`read_image`'s array; ITK files are read from ``path``.
    """
    path = Path(path)
    if image_suffix(path) in ITK_SUFFIXES:
        return read_image(path)
    try:
        img = Image.open(io.BytesIO(data))  # in memory: no file handle to close
        img.load()
        return img if img.mode in ("L", "RGB") else _pil_array(img)
    except Exception as exc:  # PIL raises many types for corrupt files
        raise _unreadable(exc, path) from None


def read_image_keeping_png(path: str | Path) -> tuple[np.ndarray, bytes | None]:
    """:func:`read_image` plus the file's bytes when it is an 8-bit gray or RGB PNG.

    The bytes are the ones decoded (the file is read once), so writing them elsewhere gives a
    file that decodes to exactly the returned array; ``None`` for every other file.
    """
    path = Path(path)
    if image_suffix(path) in ITK_SUFFIXES or not path.is_file():
        return read_image(path), None
    try:
        data = path.read_bytes()
    except OSError:
        return read_image(path), None  # names the file and the reason, as for every unreadable file
    try:
        with Image.open(io.BytesIO(data)) as img:
            keep = plain_png(img)
            array = _pil_array(img)
    except Exception as exc:  # PIL raises many types for corrupt files
        raise _unreadable(exc, path) from None
    return array, (data if keep else None)


# PIL modes whose pixel values are the stored numbers (class indices in a label map): a
# palette ("P") PNG's indices are its labels in many public datasets, its colours only a view.
_INDEX_MODES = ("P", "PA", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "1")


def read_label(path: str | Path) -> np.ndarray:
    """Decode a label map to ``(H, W)`` class values (or ``(H, W, C)`` for a colour file).

    Unlike :func:`read_image`, a palette PNG gives its palette *indices*, not its colours;
    16/32-bit integer maps keep their values. Colour (RGB) files and ITK formats are read as
    :func:`read_image` reads them; callers decide whether colours mean classes.
    """
    path = Path(path)
    if image_suffix(path) in PIL_SUFFIXES and path.is_file():
        try:
            with Image.open(path) as img:
                mode = img.mode
                if mode in _INDEX_MODES:
                    img.load()
                    if mode in ("PA", "LA"):
                        img = img.getchannel(0)  # drop the alpha band, keep the index/gray band
                    elif mode == "1":
                        img = img.convert("L")
                    array = np.asarray(img)
                    if mode.startswith("I;16"):
                        array = array.astype(np.uint16)
                    return np.ascontiguousarray(array)
        except (OSError, SyntaxError, ValueError):
            pass  # read_image below names the file and the reason
    return read_image(path)


#: fixed overlay colours per class index (0 = background stays unpainted); one table for
#: medplan_predict's overlays and TensorBoard's validation pictures, so a class keeps its colour
LABEL_PALETTE = np.array([
    (0, 0, 0), (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
    (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0),
], dtype=np.uint8)


def paint_labels(rgb: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Float ``rgb`` (H, W, 3) with each foreground class blended in its palette colour."""
    colours = LABEL_PALETTE[np.asarray(labels, dtype=np.int64) % len(LABEL_PALETTE)].astype(np.float32)
    mask = (np.asarray(labels) > 0)[:, :, None]
    return np.where(mask, (1 - alpha) * rgb + alpha * colours, rgb)


def to_uint8(array: np.ndarray, window: tuple[float, float] | None = None) -> np.ndarray:
    """Map intensities to uint8, leaving uint8 input untouched.

    With ``window=(low, high)`` (one dataset-wide window, see ``intensity_window`` in
    dataset.json) values are clipped to it and scaled linearly, so equal raw intensities give
    equal stored values in every image. Without it, the image's own min-max range is used.
    Non-finite values (NaN) map to 0.
    """
    if array.dtype == np.uint8:
        return array
    a = array.astype(np.float64)
    finite = np.isfinite(a)
    if window is not None:
        lo, hi = float(window[0]), float(window[1])
    elif finite.any():
        lo, hi = float(a[finite].min()), float(a[finite].max())
    else:
        lo, hi = 0.0, 0.0
    if hi <= lo:
        out = np.where(finite & (a > lo), 255, 0) if window is not None else np.zeros(a.shape)
        return out.astype(np.uint8)
    scaled = np.clip((np.where(finite, a, lo) - lo) / (hi - lo), 0.0, 1.0)
    return np.round(scaled * 255.0).astype(np.uint8)


# ----------------------------------------------------------------------------- OS errors
# A full disk, a read-only folder or a missing permission is the user's to fix, not a bug:
# the CLI prints one line naming the path and the operation (medplan.cli.entry_point).

_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
_SPACE_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def with_path(exc: OSError, path: str | Path, operation: str) -> OSError:
    """The same OS error, naming ``path`` and the ``operation`` ("write", "read", ...).

    A failing ``write()`` raises an OSError without a file name, and an atomic write fails on
    its hidden temporary name: the user needs the file they asked for.
    """
    name = exc.filename if exc.filename and not _is_temporary(exc.filename) else path
    if exc.errno is not None:
        new = OSError(exc.errno, exc.strerror or str(exc), os.fsdecode(name))
    else:
        new = OSError(errno.EIO, str(exc) or type(exc).__name__, os.fsdecode(name))
    new.operation = operation  # type: ignore[attr-defined]
    return new


def find_os_error(exc: BaseException | None) -> OSError | None:
    """The OSError behind ``exc`` (itself, or one in its cause/context chain), if any.

    ``torch.save`` on a full disk raises a RuntimeError whose context is the OSError. A
    MedplanError is already a message, and a context its raiser suppressed is not followed.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        if isinstance(exc, MedplanError):
            return None
        seen.add(id(exc))
        exc = exc.__cause__ if exc.__cause__ is not None else (None if exc.__suppress_context__ else exc.__context__)
    return None


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} bytes"


def free_space(path: str | Path) -> int | None:
    """Free bytes on the filesystem of ``path`` (or its nearest existing parent)."""
    p = Path(path)
    for candidate in (p, *p.parents):
        try:
            if candidate.exists():
                return shutil.disk_usage(candidate).free
        except OSError:
            return None
    return None


def describe_os_error(exc: OSError) -> str:
    """One line: ``PATH: could not write (No space left on device; 1.2 MB free)``."""
    filename = exc.filename2 if getattr(exc, "filename2", None) and _is_temporary(exc.filename) else exc.filename
    operation = getattr(exc, "operation", None)
    if operation is None:
        operation = "write" if exc.errno in _WRITE_ERRNOS else "access"
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno in _SPACE_ERRNOS and filename:
        free = free_space(os.fsdecode(filename))
        if free is not None:
            reason += f"; {_human_bytes(free)} free now"
    where = f"{os.fsdecode(filename)}: " if filename else ""
    return f"{where}could not {operation} ({reason})"


def _is_temporary(name: Any) -> bool:
    base = os.path.basename(os.fsdecode(name)) if name else ""
    return base.startswith(".") and (base.endswith(".tmp") or base.endswith(".old"))


def os_error_record(exc: OSError) -> tuple:
    """A worker's OSError as plain data: pickling an OSError keeps its number, reason and file
    but drops the operation :func:`with_path` attached."""
    return (exc.errno, exc.strerror or str(exc), exc.filename, getattr(exc, "operation", None))


def os_error_from_record(record: Sequence[Any]) -> OSError:
    """The OSError :func:`os_error_record` described, to raise in the parent process."""
    number, reason, filename, operation = record
    exc = OSError(number, reason, filename) if filename else OSError(number, reason)
    if operation:
        exc.operation = operation  # type: ignore[attr-defined]
    return exc


@contextlib.contextmanager
def os_errors(path: str | Path, operation: str) -> Iterator[None]:
    """Re-raise any OSError of the block (also one hidden in a wrapping exception) as
    :func:`with_path` of ``path``."""
    try:
        yield
    except BaseException as exc:
        if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        os_error = find_os_error(exc)
        if os_error is None or os_error is exc and getattr(exc, "operation", None) is not None:
            raise
        if getattr(os_error, "operation", None) is not None:  # named further down: unwrap only
            raise os_error from None
        raise with_path(os_error, path, operation) from None


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def remove_stale_temporaries(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Remove the hidden ``.NAME.XXXXXXXX.tmp`` / ``.old`` files and folders that a killed
    atomic write leaves behind; returns what was removed.

    Call it only while holding the lock of the stage that writes ``folder`` (medplan.locks),
    so a temporary of a run still in progress is never taken for a leftover."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    entries = folder.rglob(".*") if recursive else folder.glob(".*")
    return [entry for entry in sorted(entries, key=lambda p: len(p.parts), reverse=True)
            if (entry.name.endswith(".tmp") or entry.name.endswith(".old")) and remove_entry(entry)]


def remove_entry(entry: Path) -> bool:
    """Remove a file, link or whole folder; False when it was already gone."""
    try:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    except FileNotFoundError:
        return False
    return True


def read_cases_csv(path: Path, group_column: str | None = None) -> tuple[list[str], dict[str, str], list[str]]:
    """A raw dataset's ``cases.csv``: case ids in file order (each a checked name, none twice),
    each case's group (its ``group_column`` value, else the case itself) and the column names;
    MedplanError naming the file and line on the first problem."""
    if not path.is_file():
        raise MedplanError("file not found (the raw dataset's case list)", path)
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        columns = list(reader.fieldnames or [])
    if "case_id" not in columns:
        raise MedplanError("missing column 'case_id'", path)
    if group_column is not None and group_column not in columns:
        raise MedplanError(f"group column {group_column!r} is not a column", path)
    case_ids: list[str] = []
    groups: dict[str, str] = {}
    for line, row in enumerate(rows, start=2):
        case_id = (row.get("case_id") or "").strip()
        check_name(case_id, f"case id (line {line})", path)  # it becomes a file name
        if case_id in groups:
            raise MedplanError(f"case_id {case_id!r} appears twice (line {line})", path)
        groups[case_id] = ((row.get(group_column) or "").strip() or case_id) if group_column else case_id
        case_ids.append(case_id)
    return case_ids, groups, columns


@contextlib.contextmanager
def atomic_open(path: str | Path, fsync: bool = True) -> Iterator[BinaryIO]:
    """A binary file handle whose content replaces ``path`` only when the block succeeds."""
    path = Path(path)
    with os_errors(path.parent, "create folder"):
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        with os_errors(path, "write"):
            with open(tmp, "wb") as f:
                yield f
                if fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            if tmp.exists():
                tmp.unlink()


def atomic_write_bytes(path: str | Path, data: bytes, fsync: bool = True) -> None:
    with atomic_open(path, fsync=fsync) as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str, fsync: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def atomic_write_json(path: str | Path, obj: Any, fsync: bool = True) -> None:
    """``fsync=False`` for small per-item files whose loss in a crash only means redoing the
    item (a preprocessed case's marker: its arrays are not synced either)."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n", fsync=fsync)


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise MedplanError("file not found", path)
    try:
        with os_errors(path, "read"):
            text = path.read_text(encoding="utf-8")
        return json.loads(text)
    except UnicodeDecodeError:
        raise MedplanError("not valid JSON (not UTF-8 text)", path) from None
    except json.JSONDecodeError as exc:
        raise MedplanError(f"not valid JSON ({exc.msg} at line {exc.lineno})", path) from None


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def atomic_write_png(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 (H, W) or (H, W, 3) array as PNG, atomically."""
    atomic_write_bytes(path, png_bytes(array))


def atomic_save_npy(path: str | Path, array: np.ndarray) -> None:
    with atomic_open(path, fsync=False) as f:
        np.save(f, np.ascontiguousarray(array))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Build a folder under a temporary name and swap it in only if the block succeeds.

    On any error the temporary folder is removed and an existing ``final`` stays intact.
    """
    final = Path(final)
    with os_errors(final, "create folder"):
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the final folder gets normal permissions
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.old")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
