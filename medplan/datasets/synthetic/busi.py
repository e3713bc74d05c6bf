"""Synthetic BUSI (breast ultrasound): gray ultrasound with hypoechoic lesions, several mask
files for some images, ``normal`` images with empty masks."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from medplan.datasets.synthetic.common import (Truth, clip_uint8, ellipse_blob, image_size, seeded_rng, smooth_field,
                                               speckle_field, wobble_terms)
from medplan.io import png_bytes


def _busi_frame(rng: np.random.Generator, shape: tuple[int, int], n_lesions: int
                ) -> tuple[np.ndarray, list[np.ndarray]]:
    h, w = shape
    yy = np.mgrid[0:h, 0:w][0].astype(np.float32)
    base = rng.uniform(70, 110) * smooth_field(rng, shape, (4, 5), 0.5, 1.5)
    layers = 1.0 + 0.25 * np.sin(yy / rng.uniform(6, 14) + smooth_field(rng, shape, (3, 4), 0, 6))
    base = base * layers
    masks = []
    for _ in range(n_lesions):
        r0 = rng.uniform(0.08, 0.18) * min(h, w)
        cy, cx = rng.uniform(0.3, 0.75) * h, rng.uniform(0.2, 0.8) * w
        blob = ellipse_blob(shape, cy, cx, r0 * rng.uniform(0.6, 0.9), r0 * rng.uniform(1.0, 1.4), rng.uniform(-0.3, 0.3),
                     wobble_terms(rng, (2, 3, 5), 0.1))
        base = np.where(blob, rng.uniform(10, 30), base)
        masks.append(blob.astype(np.uint8) * 255)
    image = gaussian_filter(base, 1.0) * speckle_field(rng, shape)
    return clip_uint8(image), masks


def write_busi(root: str | Path, n: int = 12, size: tuple[int, int] | None = None, seed: int = 0) -> Path:
    """BUSI layout (``Dataset_BUSI_with_GT/{benign,malignant,normal}/``); some images have two masks."""
    top = Path(root) / "Dataset_BUSI_with_GT"
    if top.exists():
        shutil.rmtree(top)
    truth = Truth(top, "busi", lossless=True)
    counters = {"benign": 0, "malignant": 0, "normal": 0}
    for i in range(n):
        rng = seeded_rng(seed, 60, i)
        diagnosis = ("benign", "malignant", "normal")[i % 3]
        counters[diagnosis] += 1
        n_lesions = 0 if diagnosis == "normal" else (2 if i % 4 == 0 else 1)
        image, masks = _busi_frame(rng, image_size("busi", size, rng), n_lesions)
        folder = top / diagnosis
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{diagnosis} ({counters[diagnosis]})"
        rgb = np.repeat(image[..., None], 3, axis=2)  # BUSI stores gray ultrasound as RGB PNG
        (folder / f"{stem}.png").write_bytes(png_bytes(rgb))
        if not masks:
            masks = [np.zeros(image.shape, np.uint8)]
        for k, mask in enumerate(masks):
            name = f"{stem}_mask.png" if k == 0 else f"{stem}_mask_{k}.png"
            (folder / name).write_bytes(png_bytes(mask))
        merged = np.zeros(image.shape, np.uint8)
        for mask in masks:
            merged |= (mask > 0).astype(np.uint8)
        truth.add(f"{diagnosis}_{counters[diagnosis]}", merged, rgb)
    truth.save()
    return top
