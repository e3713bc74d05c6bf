"""What every synthetic layout shares: the truth kept beside it (class maps, lossless images,
planted duplicates; read back with :func:`truth_labels`, :func:`truth_images`,
:func:`planted_duplicates`) and the vectorised drawing helpers."""
from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from medplan.errors import MedplanError
from medplan.io import png_bytes, read_image

TRUTH_DIR = ".synthetic_truth"
BRIGHTEN = 8
MIN_PHASH_DISTANCE = 14  # between distinct synthetic cases (8x8 pHash, 64 bits)

DEFAULT_SIZES = {
    "camus": (256, 192),
    "isic2018": (192, 256),
    "neopolyp": (192, 240),
    "kvasir": (192, 224),
    "cvc": (160, 192),
    "busi": (176, 208),
}
DUPLICATE_KINDS = ("exact", "reencoded", "brightened")


# ----------------------------------------------------------------------------- truth files


def truth_dir(layout_dir: Path) -> Path:
    layout_dir = Path(layout_dir)
    return layout_dir.parent / TRUTH_DIR / layout_dir.name


def manifest(layout_dir: str | Path) -> dict[str, Any]:
    """What a writer recorded: dataset, cases, planted duplicates, skipped cases."""
    path = truth_dir(Path(layout_dir)) / "manifest.json"
    if not path.is_file():
        raise MedplanError("no synthetic-data manifest (was this folder written by medplan.datasets.synthetic?)",
                           path)
    return json.loads(path.read_text(encoding="utf-8"))


def planted_duplicates(layout_dir: str | Path) -> list[tuple[str, str, str]]:
    """``(original_case_id, duplicate_case_id, kind)`` with kind in exact | reencoded | brightened."""
    return [(d["original"], d["duplicate"], d["kind"]) for d in manifest(layout_dir)["duplicates"]]


def _read_truth(layout_dir: Path, sub: str) -> dict[str, np.ndarray]:
    folder = truth_dir(Path(layout_dir)) / sub
    return {p.stem: read_image(p) for p in sorted(folder.glob("*.png"))} if folder.is_dir() else {}


def truth_labels(layout_dir: str | Path) -> dict[str, np.ndarray]:
    """True class maps by the case id the importer gives (``patient0001_2CH_ED``, ``ISIC_0000000``)."""
    return _read_truth(Path(layout_dir), "labels")


def truth_images(layout_dir: str | Path) -> dict[str, np.ndarray]:
    """True images of lossless layouts (CAMUS); empty for JPEG layouts."""
    return _read_truth(Path(layout_dir), "images")


class Truth:
    def __init__(self, layout_dir: Path, dataset: str, lossless: bool):
        self.dir = truth_dir(layout_dir)
        if self.dir.exists():
            shutil.rmtree(self.dir)
        (self.dir / "labels").mkdir(parents=True)
        if lossless:
            (self.dir / "images").mkdir()
        self.lossless = lossless
        self.info: dict[str, Any] = {"dataset": dataset, "layout": layout_dir.name, "cases": [],
                                     "duplicates": [], "skipped": []}

    def add(self, case_id: str, label: np.ndarray, image: np.ndarray | None = None) -> None:
        (self.dir / "labels" / f"{case_id}.png").write_bytes(png_bytes(label))
        if self.lossless and image is not None:
            (self.dir / "images" / f"{case_id}.png").write_bytes(png_bytes(image))
        self.info["cases"].append(case_id)

    def duplicate(self, original: str, duplicate: str, kind: str) -> None:
        self.info["duplicates"].append({"original": original, "duplicate": duplicate, "kind": kind})

    def save(self) -> None:
        (self.dir / "manifest.json").write_text(json.dumps(self.info, indent=2) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- drawing helpers


def seeded_rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), *[int(k) for k in keys]])


def image_size(kind: str, size: tuple[int, int] | None, rng: np.random.Generator) -> tuple[int, int]:
    """The requested size, or the default with a little per-image jitter (real sizes vary)."""
    if size is not None:
        h, w = int(size[0]), int(size[1])
        if h < 32 or w < 32:
            raise MedplanError(f"synthetic images need at least 32x32 pixels, got {h}x{w}")
        return h, w
    h, w = DEFAULT_SIZES[kind]
    return int(round(h * rng.uniform(0.9, 1.1))), int(round(w * rng.uniform(0.9, 1.1)))


def smooth_field(rng: np.random.Generator, shape: tuple[int, int], cells: tuple[int, int], lo: float,
            hi: float) -> np.ndarray:
    """A smooth random field in [lo, hi]: a few random values upsampled bicubically."""
    small = rng.random(cells).astype(np.float32)
    field = np.asarray(Image.fromarray(small).resize((shape[1], shape[0]), Image.BICUBIC), dtype=np.float32)
    return lo + (hi - lo) * np.clip(field, 0.0, 1.0)


def ellipse_blob(shape: tuple[int, int], cy: float, cx: float, ry: float, rx: float, angle: float = 0.0,
          wobble: Iterable[tuple[int, float, float]] = ()) -> np.ndarray:
    """Boolean ellipse (semi-axes ry, rx, rotated by ``angle``) with a wobbly radius.

    ``wobble`` holds ``(k, amplitude, phase)`` terms of the radius as a function of the polar
    angle, which makes irregular lesions and polyps. Computed in the bounding box only.
    """
    wobble = list(wobble)
    h, w = shape
    reach = max(ry, rx) * (1.0 + sum(abs(a) for _, a, _ in wobble)) + 2
    y0, y1 = max(0, int(cy - reach)), min(h, int(cy + reach) + 2)
    x0, x1 = max(0, int(cx - reach)), min(w, int(cx + reach) + 2)
    mask = np.zeros(shape, dtype=bool)
    if y0 >= y1 or x0 >= x1:
        return mask
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    c, s = math.cos(angle), math.sin(angle)
    u = (dx * c - dy * s) / rx   # across the long axis
    v = (dx * s + dy * c) / ry   # along the long axis (downwards when angle = 0)
    rho = np.hypot(u, v)
    radius = np.ones_like(rho)
    if wobble:
        theta = np.arctan2(v, u)
        for k, amp, phase in wobble:
            radius += amp * np.cos(k * theta + phase)
    mask[y0:y1, x0:x1] = rho <= radius
    return mask


def bounding_box(mask: np.ndarray, pad: int) -> tuple[slice, slice]:
    """The bounding box of ``mask`` grown by ``pad`` pixels (whole image if empty)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not rows.size:
        return slice(0, mask.shape[0]), slice(0, mask.shape[1])
    return (slice(max(0, rows[0] - pad), min(mask.shape[0], rows[-1] + pad + 1)),
            slice(max(0, cols[0] - pad), min(mask.shape[1], cols[-1] + pad + 1)))


def wobble_terms(rng: np.random.Generator, ks: Iterable[int], amp: float) -> list[tuple[int, float, float]]:
    return [(k, float(rng.uniform(0, amp)), float(rng.uniform(0, 2 * math.pi))) for k in ks]


def jpeg_bytes(array: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert(img.mode))


class Distinct:
    """Redraws an image while it is a perceptual-hash near-duplicate of one drawn before.

    Random scenes of one kind share their large structures (the ultrasound sector, the
    heart), so a few draws land close in pHash; those would be dropped as duplicates by the
    fingerprint. Redrawing (deterministically: the attempt number is part of the seed) keeps
    distinct cases clearly apart, and only planted duplicates stay close.
    """

    def __init__(self, min_distance: int = MIN_PHASH_DISTANCE, max_attempts: int = 25):
        self.min_distance = min_distance
        self.max_attempts = max_attempts
        self.hashes = np.zeros((0, 64), dtype=bool)

    def draw(self, make, check: bool = True):
        import imagehash

        for attempt in range(self.max_attempts):
            result = make(attempt)
            if not check:
                return result
            bits = imagehash.phash(Image.fromarray(result[0])).hash.reshape(1, 64)
            if attempt == self.max_attempts - 1 or not len(self.hashes) or \
                    int((self.hashes != bits).sum(axis=1).min()) >= self.min_distance:
                self.hashes = np.concatenate([self.hashes, bits])
                return result
        raise AssertionError("unreachable")


def brighten(array: np.ndarray) -> np.ndarray:
    return np.clip(array.astype(np.int16) + BRIGHTEN, 0, 255).astype(np.uint8)


def clip_uint8(array: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(array), 0, 255).astype(np.uint8)


def speckle_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float = 0.7) -> np.ndarray:
    """Rayleigh speckle with mean 1, slightly correlated like real ultrasound."""
    speckle = rng.rayleigh(1.0, shape).astype(np.float32) / math.sqrt(math.pi / 2)
    if sigma > 0:
        speckle = gaussian_filter(speckle, sigma)
        speckle /= max(float(speckle.mean()), 1e-6)
    return speckle


def plant_jpeg(truth: Truth, images: Path, masks: Path, src_id: str, dup_id: str, kind: str,
                img_name: str, mask_name: str, dup_img: str, dup_mask: str, label: np.ndarray,
                quality: int = 95) -> None:
    src = images / img_name
    if kind == "exact":
        shutil.copyfile(src, images / dup_img)
    else:
        pixels = read_image(src)
        if kind == "brightened":
            pixels = brighten(pixels)
        (images / dup_img).write_bytes(jpeg_bytes(pixels, quality))
    shutil.copyfile(masks / mask_name, masks / dup_mask)
    truth.add(dup_id, label)
    truth.duplicate(src_id, dup_id, kind)


def plant_same_name_duplicates(truth: Truth, images: Path, masks: Path, suffix: str,
                               dup_id: Callable[[int, str], str]) -> None:
    """One duplicate of each kind, for layouts whose image and mask share a file name
    (NeoPolyp, Kvasir); ``dup_id(k, src)`` names the k-th copy of case ``src``."""
    originals = list(truth.info["cases"])
    for k, kind in enumerate(DUPLICATE_KINDS):
        src = originals[k % len(originals)]
        dup = dup_id(k, src)
        name, dup_name = f"{src}{suffix}", f"{dup}{suffix}"
        plant_jpeg(truth, images, masks, src, dup, kind, name, name, dup_name, dup_name,
                   read_image(truth.dir / "labels" / f"{src}.png"))
