"""Plan -> arrays: one memory-mappable uint8 file per case at the planned input size.

Images are resized with an antialiased filter (PIL's resampling widens its kernel when it
shrinks, so downsampling does not alias), labels with nearest neighbour (no invented class
values). Arrays stay uint8 (4x smaller than float32, and intensity/colour augmentation must
see raw intensities); :func:`normalize` applies the plan's normalization on the fly and is
the one function training, validation and prediction use.

Per case, in ``data_HxW/``: ``CASE.npy`` (C, h, w), ``CASE_seg.npy`` (h, w) and, written
last, ``CASE.json`` with the original size. A case counts as done only when its ``.json``
exists with the current :func:`plan_key`, so a rerun after a kill redoes exactly the cases
that were not finished and never trusts a half-written file.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

from medplan.datasets.raw import load_raw_index
from medplan.errors import MedplanError
from medplan.io import atomic_save_npy, atomic_write_json, read_image, read_label, remove_stale_temporaries
from medplan.plan import Normalization, Plan
from medplan.parallel import resolve_workers, run_tasks  # noqa: F401 - also imported from here
from medplan.progress import progress_bar  # noqa: F401 - also imported from here

# Bump when the array layout or the resampling changes: every array is then redone.
ARRAY_FORMAT_VERSION = 1
IMAGE_RESAMPLE = Image.BILINEAR  # antialiased on downsampling (kernel support scales with the factor)
LABEL_RESAMPLE = Image.NEAREST


def as_input_size(input_size: Sequence[int]) -> tuple[int, int]:
    """``(h, w)`` as ints; a clear error for anything else (plans come from files users edit)."""
    if input_size is None or len(input_size) != 2 or any(int(s) < 1 for s in input_size):
        raise MedplanError(f"input_size must be two positive integers (h, w), got {input_size!r}")
    return int(input_size[0]), int(input_size[1])


def data_dir(out_dir: str | Path, input_size: Sequence[int]) -> Path:
    """Folder of the arrays for one input size: ``out_dir/data_{h}x{w}``."""
    h, w = as_input_size(input_size)
    return Path(out_dir) / f"data_{h}x{w}"


def plan_key(input_size: Sequence[int], channels: int) -> str:
    """What an array depends on besides the raw image: size, channels, array format version."""
    h, w = as_input_size(input_size)
    return f"v{ARRAY_FORMAT_VERSION}-{h}x{w}-c{int(channels)}"


def _to_pil(image: np.ndarray) -> Image.Image:
    if image.dtype != np.uint8:
        raise MedplanError(f"expected a uint8 image, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(image), mode="L")
    if image.ndim == 3 and image.shape[2] in (3, 4):
        return Image.fromarray(np.ascontiguousarray(image[:, :, :3]), mode="RGB")
    raise MedplanError(f"expected an (H, W) or (H, W, 3) image, got shape {image.shape}")


def prepare_image(image: np.ndarray | Image.Image, input_size: Sequence[int], channels: int) -> np.ndarray:
    """Any uint8 (H, W[, C]) image -> (channels, h, w) uint8, antialiased resize.

    RGB -> gray uses ITU-R 601 luma (PIL ``convert("L")``); gray -> RGB repeats the channel.
    """
    h, w = as_input_size(input_size)
    if channels not in (1, 3):
        raise MedplanError(f"channels must be 1 or 3, got {channels}")
    pil = image if isinstance(image, Image.Image) else _to_pil(image)
    mode = "L" if channels == 1 else "RGB"
    if pil.mode != mode:
        pil = pil.convert(mode)
    if pil.size != (w, h):
        pil = pil.resize((w, h), IMAGE_RESAMPLE)
    out = np.asarray(pil)
    out = out[None] if out.ndim == 2 else out.transpose(2, 0, 1)
    return np.ascontiguousarray(out, dtype=np.uint8)


def prepare_label(label: np.ndarray, input_size: Sequence[int]) -> np.ndarray:
    """(H, W) class-index map -> (h, w) uint8, nearest neighbour (only values that were there)."""
    h, w = as_input_size(input_size)
    if label.ndim != 2:
        raise MedplanError(f"expected an (H, W) label map, got shape {label.shape}")
    if label.dtype != np.uint8:
        if label.size and (label.min() < 0 or label.max() > 255):
            raise MedplanError("label values must be in 0..255")
        label = label.astype(np.uint8)
    if label.shape == (h, w):
        return np.ascontiguousarray(label)
    pil = Image.fromarray(np.ascontiguousarray(label), mode="L").resize((w, h), LABEL_RESAMPLE)
    return np.ascontiguousarray(np.asarray(pil), dtype=np.uint8)


def normalize(x: Any, normalization: Normalization) -> Any:
    """Apply the plan's intensity normalization (``plan.normalization``) to 0..255-scale images
    (torch or numpy).

    ``x`` is (C, H, W) or (B, C, H, W); returns float32 of the same kind and device.
    ``zscore``: (x - mean[c]) / std[c] with the plan's per-channel statistics (0..255 scale);
    ``minmax``: x / 255.
    """
    scheme = normalization.scheme
    is_torch = type(x).__module__.startswith("torch")
    if x.ndim not in (3, 4):
        raise MedplanError(f"normalize expects (C, H, W) or (B, C, H, W), got shape {tuple(x.shape)}")
    if is_torch:
        import torch

        x = x.to(torch.float32)
    else:
        x = np.asarray(x, dtype=np.float32)
    if scheme == "minmax":
        return x / 255.0
    c = x.shape[-3]
    mean, std = list(normalization.mean), list(normalization.std)
    if len(mean) != c or len(std) != c:
        raise MedplanError(f"normalization has {len(mean)} mean(s) and {len(std)} std(s) "
                           f"but the image has {c} channel(s)")
    mean_a = np.asarray(mean, dtype=np.float32).reshape(c, 1, 1)
    inv_a = (1.0 / np.maximum(np.asarray(std, dtype=np.float32), 1e-6)).reshape(c, 1, 1)
    if is_torch:
        import torch

        mean_t = torch.as_tensor(mean_a, device=x.device)
        inv_t = torch.as_tensor(inv_a, device=x.device)
        return (x - mean_t) * inv_t
    return ((x - mean_a) * inv_a).astype(np.float32, copy=False)


def _case_paths(ddir: Path, case_id: str) -> tuple[Path, Path, Path]:
    return ddir / f"{case_id}.npy", ddir / f"{case_id}_seg.npy", ddir / f"{case_id}.json"


def write_case(data_dir: str | Path, case_id: str, image: np.ndarray | Image.Image, label: np.ndarray,
               input_size: Sequence[int], channels: int) -> None:
    """Resize and write one case; ``CASE.json`` goes last and marks the case complete.

    An existing ``CASE.json`` is removed first, so a kill while rewriting leaves the case
    marked incomplete rather than pairing a new image with an old label. ``image`` may be the
    8-bit PIL image the fingerprint pass decoded (no copy to numpy and back).
    """
    ddir = Path(data_dir)
    ddir.mkdir(parents=True, exist_ok=True)
    size = (image.size[1], image.size[0]) if isinstance(image, Image.Image) else tuple(image.shape[:2])
    if size != label.shape[:2]:
        raise MedplanError(f"case {case_id}: label size {list(label.shape[:2])} != image size {list(size)}")
    img_path, seg_path, json_path = _case_paths(ddir, case_id)
    if json_path.exists():
        json_path.unlink()
    atomic_save_npy(img_path, prepare_image(image, input_size, channels))
    atomic_save_npy(seg_path, prepare_label(label, input_size))
    # not synced, like the arrays: after a crash a lost marker only means the case is redone
    atomic_write_json(json_path, {
        "case_id": case_id,
        "original_size": [int(size[0]), int(size[1])],
        "channels": int(channels),
        "plan_key": plan_key(input_size, channels),
    }, fsync=False)


def load_case(data_dir: str | Path, case_id: str, mmap: bool = True) -> tuple[np.ndarray, np.ndarray, dict]:
    """(image (C, h, w) uint8, label (h, w) uint8, properties) of one preprocessed case."""
    img_path, seg_path, json_path = _case_paths(Path(data_dir), case_id)
    if not json_path.is_file():
        raise MedplanError(f"case {case_id} is not preprocessed (run medplan_preprocess)", json_path)
    props = json.loads(json_path.read_text(encoding="utf-8"))
    mode = "r" if mmap else None
    try:
        image = np.load(img_path, mmap_mode=mode)
        label = np.load(seg_path, mmap_mode=mode)
    except (OSError, ValueError) as exc:
        raise MedplanError(f"cannot read preprocessed arrays of case {case_id} ({exc})", img_path) from None
    return image, label, props


def case_is_done(data_dir: str | Path, case_id: str, key: str) -> bool:
    """True when the case's properties exist with ``key`` and both arrays are present."""
    img_path, seg_path, json_path = _case_paths(Path(data_dir), case_id)
    try:
        props = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return props.get("plan_key") == key and img_path.is_file() and seg_path.is_file()


def remove_case(data_dir: str | Path, case_id: str) -> None:
    """Delete a case's files, properties first (so it is never seen half-removed as done)."""
    img_path, seg_path, json_path = _case_paths(Path(data_dir), case_id)
    for p in (json_path, img_path, seg_path):
        if p.exists():
            p.unlink()


def _array_case_ids(ddir: Path) -> set[str]:
    ids = set()
    for name in os.listdir(ddir):
        if name.startswith("."):
            continue
        if name.endswith("_seg.npy"):
            ids.add(name[: -len("_seg.npy")])
        elif name.endswith(".npy") or name.endswith(".json"):
            ids.add(name.rsplit(".", 1)[0])
    return ids


def clean_data_dir(ddir: str | Path, keep_case_ids: Iterable[str]) -> int:
    """Remove leftover temporary files and the files of cases not in ``keep_case_ids``."""
    ddir = Path(ddir)
    if not ddir.is_dir():
        return 0
    removed = 0
    for name in os.listdir(ddir):
        if name.startswith(".") and name.endswith(".tmp"):
            (ddir / name).unlink(missing_ok=True)
            removed += 1
    keep = set(keep_case_ids)
    for case_id in sorted(_array_case_ids(ddir) - keep):
        remove_case(ddir, case_id)
        removed += 1
    return removed


@dataclass(frozen=True)
class CaseArrays:
    """The arrays of one input size, as a writer the fingerprint pass is handed (by the pipeline),
    so that it writes them from its one decode of each image
    (:class:`medplan.casescan.ArrayWriter`); picklable, for the worker processes."""

    data_dir: Path
    input_size: tuple[int, int]

    @classmethod
    def at(cls, out_dir: str | Path, input_size: Sequence[int]) -> CaseArrays:
        """The writer of ``out_dir/data_{h}x{w}``."""
        return cls(data_dir(out_dir, input_size), as_input_size(input_size))

    def prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def write(self, case_id: str, image: np.ndarray | Image.Image, label: np.ndarray, channels: int) -> None:
        write_case(self.data_dir, case_id, image, label, self.input_size, channels)

    def keep_only(self, case_ids: Iterable[str]) -> None:
        clean_data_dir(self.data_dir, case_ids)

    def discard_partial(self) -> None:
        remove_stale_temporaries(self.data_dir)


def _preprocess_one(task: tuple) -> tuple[str, str | None]:
    """Worker: read, check, resize and write one case. Returns (case_id, error message or None)."""
    case_id, image_path, label_path, ddir, input_size, channels = task
    try:
        image = read_image(image_path)
        label = read_label(label_path)  # a palette PNG's indices are its classes
        if label.ndim != 2:
            raise MedplanError(f"label must be a single-channel (class index) image, got shape {label.shape}",
                               label_path)
        if label.shape != image.shape[:2]:
            raise MedplanError(f"label size {list(label.shape)} != image size {list(image.shape[:2])}", label_path)
        if image.dtype != np.uint8:
            raise MedplanError(f"expected an 8-bit image, got {image.dtype}", image_path)
        write_case(ddir, case_id, image, label, input_size, channels)
    except MedplanError as exc:  # handed back as text: the parent raises it after stopping the pool
        return case_id, str(exc)
    return case_id, None


def preprocess_dataset(raw_dir: str | Path, out_dir: str | Path, plan: Plan, *, num_workers: int | None = None,
                       progress: bool = True) -> Path:
    """Write arrays for every case not in ``plan.excluded_cases``; returns the data folder.

    Idempotent: cases already done with the same :func:`plan_key` are skipped; leftover
    temporary files, cases without their ``.json`` and arrays of excluded or unknown cases are
    removed or redone.
    """
    raw = load_raw_index(raw_dir)
    input_size = as_input_size(plan.input_size)
    channels = plan.channels
    excluded = set(plan.excluded_cases)
    unknown = sorted(excluded - set(raw.case_ids))
    if unknown:
        raise MedplanError(f"plan excludes cases that are not in the raw dataset: {', '.join(unknown[:5])}"
                           f"{' ...' if len(unknown) > 5 else ''}", Path(raw_dir) / "cases.csv")
    wanted = [c for c in raw.case_ids if c not in excluded]
    ddir = data_dir(out_dir, input_size)
    ddir.mkdir(parents=True, exist_ok=True)
    clean_data_dir(ddir, wanted)
    key = plan_key(input_size, channels)
    todo = [c for c in wanted if not case_is_done(ddir, c, key)]
    tasks = [(c, str(raw.image_paths[c]), str(raw.label_paths[c]), str(ddir), input_size, channels) for c in todo]
    try:
        with contextlib.closing(run_tasks(_preprocess_one, tasks, num_workers=num_workers, desc="preprocess",
                                          progress=progress)) as results:
            for _, error in results:
                if error is not None:
                    raise MedplanError(error)
    except BaseException:
        remove_stale_temporaries(ddir)  # of the workers the pool stopped mid-write (they are joined by now)
        raise
    return ddir
