"""File I/O shared by every stage: image reading with clear errors, atomic writes.

Every file another stage will trust is written to a temporary name in the same folder and
then renamed, so a kill at any moment leaves either the old file or the new one.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np
from PIL import Image

from medplan.errors import MedplanError

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
            img.load()
            if img.mode in ("P", "PA", "LA", "RGBA", "CMYK", "YCbCr", "1"):
                img = img.convert("RGB" if img.mode not in ("LA", "1") else "L")
            elif img.mode == "I;16" or img.mode.startswith("I;16"):
                return np.asarray(img, dtype=np.uint16)
            return np.asarray(img)
    except MedplanError:
        raise
    except Exception as exc:  # PIL/ITK raise many types for corrupt files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MedplanError(f"cannot read image ({reason})", path) from None


def to_uint8(array: np.ndarray) -> np.ndarray:
    """Map any intensity range to uint8 (min-max), leaving uint8 input untouched."""
    if array.dtype == np.uint8:
        return array
    a = array.astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    return np.round((a - lo) / (hi - lo) * 255.0).astype(np.uint8)


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
    removed: list[Path] = []
    entries = folder.rglob(".*") if recursive else folder.glob(".*")
    for entry in sorted(entries, key=lambda p: len(p.parts), reverse=True):
        if not (entry.name.endswith(".tmp") or entry.name.endswith(".old")):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except FileNotFoundError:
            continue
        removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_open(path: str | Path, fsync: bool = True) -> Iterator[BinaryIO]:
    """A binary file handle whose content replaces ``path`` only when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise MedplanError("file not found", path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
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
