"""The report's pictures of data (not plots): image / ground truth / prediction strips of the
worst cases, duplicate pairs side by side, and copies of the Grad-CAM panels, so the report
folder holds everything it shows. Each is redone only when its source files changed (their
sizes and modification times are the key)."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from medplan.errors import MedplanError
from medplan.io import atomic_write_bytes, paint_labels, read_image, read_label, to_uint8

#: height of each panel of a strip (pixels)
THUMB = 120


def source_key(paths: Sequence[Path]) -> list:
    """What a picture was made from: each file's name, size and modification time."""
    out = []
    for p in paths:
        st = p.stat() if p.is_file() else None
        out.append([str(p), st.st_size if st else None, st.st_mtime_ns if st else None])
    return out


def _gray_rgb(path: Path) -> np.ndarray:
    img = read_image(path)
    if img.ndim == 3 and img.shape[2] >= 3:
        img = img[..., :3]
    if img.dtype != np.uint8:
        img = to_uint8(img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return img


def _thumb(rgb: np.ndarray) -> Image.Image:
    im = Image.fromarray(rgb.astype(np.uint8))
    scale = THUMB / max(1, im.height)
    return im.resize((max(1, round(im.width * scale)), THUMB), Image.NEAREST if scale >= 1 else Image.BILINEAR)


def overlay(rgb: np.ndarray, labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Classes painted over the image (class 0 left clear) in medplan's one label palette, as
    medplan_predict's overlays and TensorBoard's pictures show them."""
    if labels.shape != rgb.shape[:2]:  # a prediction at another size: nearest-neighbour to the image's
        labels = np.asarray(Image.fromarray(labels.astype(np.uint8)).resize((rgb.shape[1], rgb.shape[0]),
                                                                            Image.NEAREST))
    return paint_labels(rgb.astype(np.float32), labels, alpha).clip(0, 255).astype(np.uint8)


def _strip(panels: list[Image.Image]) -> bytes:
    gap = 4
    width = sum(p.width for p in panels) + gap * (len(panels) - 1)
    strip = Image.new("RGB", (width, THUMB), (255, 255, 255))
    x = 0
    for p in panels:
        strip.paste(p, (x, 0))
        x += p.width + gap
    import io

    buf = io.BytesIO()
    strip.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def case_strip(image: Path, label: Path, prediction: Path) -> bytes:
    """Image | ground truth over the image | prediction over the image."""
    rgb = _gray_rgb(image)
    gt = read_label(label)
    pred = read_label(prediction)
    return _strip([_thumb(rgb), _thumb(overlay(rgb, gt)), _thumb(overlay(rgb, pred))])


def pair_strip(a: Path, b: Path) -> bytes:
    """Two images side by side (a duplicate and the case kept)."""
    return _strip([_thumb(_gray_rgb(a)), _thumb(_gray_rgb(b))])


class Pictures:
    """The pictures of one build: made (or copied) when their sources changed since the last."""

    def __init__(self, folder: Path, old: dict[str, list] | None):
        self.folder = Path(folder)
        self.old = old or {}
        self.keys: dict[str, list] = {}
        self.made = 0

    def _fresh(self, name: str, key: list) -> bool:
        self.keys[name] = key
        return self.old.get(name) == key and (self.folder / name).is_file()

    def strip(self, name: str, sources: Sequence[Path], make) -> str | None:
        """``img/NAME`` made by ``make()`` from ``sources``; None when a source is missing or unreadable."""
        if not all(p.is_file() for p in sources):
            return None
        key = source_key(sources)
        if not self._fresh(name, key):
            try:
                atomic_write_bytes(self.folder / name, make())
            except (MedplanError, OSError, ValueError):
                self.keys.pop(name, None)
                return None
            self.made += 1
        return f"{self.folder.name}/{name}"

    def copy(self, name: str, source: Path) -> str | None:
        """``img/NAME``: a copy of ``source`` (a Grad-CAM panel)."""
        if not source.is_file():
            return None
        if not self._fresh(name, source_key([source])):
            (self.folder / name).parent.mkdir(parents=True, exist_ok=True)
            tmp = self.folder / f".{Path(name).name}.tmp"
            shutil.copyfile(source, tmp)
            tmp.replace(self.folder / name)
            self.made += 1
        return f"{self.folder.name}/{name}"

    def prune(self) -> None:
        """Remove the pictures of the last build that this one no longer shows."""
        for name in set(self.old) - set(self.keys):
            (self.folder / name).unlink(missing_ok=True)
