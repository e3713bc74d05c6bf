"""Synthetic ISIC 2018 (Task 1 layout): skin-coloured RGB with a darker irregular lesion and
optional hairs."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter

from medplan.datasets.synthetic.common import (DUPLICATE_KINDS, Distinct, Truth, bounding_box, clip_uint8,
                                               ellipse_blob, image_size, jpeg_bytes, plant_jpeg, seeded_rng,
                                               smooth_field, wobble_terms)
from medplan.io import png_bytes, read_image


def _skin_frame(rng: np.random.Generator, shape: tuple[int, int], hairs: bool) -> tuple[np.ndarray, np.ndarray]:
    h, w = shape
    red = rng.uniform(185, 240)
    green = red * rng.uniform(0.68, 0.84)
    skin = np.array([red, green, green * rng.uniform(0.78, 0.95)], np.float32)
    light = smooth_field(rng, shape, (3, 4), 0.78, 1.12)
    tint = smooth_field(rng, shape, (3, 3), 0.94, 1.06)
    img = skin[None, None, :] * light[..., None]
    img[..., 0] *= tint
    m = min(h, w)
    r0 = rng.uniform(0.14, 0.3) * m
    cy, cx = rng.uniform(0.32, 0.68) * h, rng.uniform(0.32, 0.68) * w
    mask = ellipse_blob(shape, cy, cx, r0 * rng.uniform(0.75, 1.25), r0 * rng.uniform(0.75, 1.25),
                 rng.uniform(0, math.pi), wobble_terms(rng, (2, 3, 4, 5), 0.1))
    lesion = np.array([rng.uniform(70, 140), rng.uniform(40, 90), rng.uniform(25, 70)], np.float32)
    texture = smooth_field(rng, shape, (7, 7), 0.65, 1.2)
    sigma = max(1.0, m / 150)
    box = bounding_box(mask, int(3 * sigma) + 2)
    alpha = gaussian_filter(mask[box].astype(np.float32), sigma)[..., None]
    img[box] = img[box] * (1 - alpha) + (lesion[None, None, :] * texture[box][..., None]) * alpha
    if hairs and rng.random() < 0.6:
        layer = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(layer)
        for _ in range(int(rng.integers(1, 5))):
            x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
            ang = rng.uniform(0, 2 * math.pi)
            pts = [(x0 + t * math.cos(ang + 0.3 * math.sin(t / 20)), y0 + t * math.sin(ang + 0.3 * math.sin(t / 20)))
                   for t in np.linspace(0, rng.uniform(0.3, 0.8) * m, 12)]
            draw.line(pts, fill=255, width=max(1, m // 150))
        hair = np.asarray(layer, np.float32)[..., None] / 255.0
        img = img * (1 - 0.75 * hair) + 30 * 0.75 * hair
    img += rng.standard_normal(img.shape, dtype=np.float32) * 3.0
    return clip_uint8(img), mask.astype(np.uint8)


def write_isic2018(root: str | Path, n: int = 24, size: tuple[int, int] | None = None, seed: int = 0,
                   duplicates: bool = True, nested: bool = False, hairs: bool = True,
                   test_ground_truth: bool = True) -> Path:
    """ISIC 2018 Task 1 layout (Training / Validation / Test splits); returns ``root/ISIC2018``.

    ``nested=True`` writes doubly nested extraction folders (``X_Input/X_Input/``).
    ``test_ground_truth=False`` leaves out the Test ground truth (that split is then skipped).
    """
    top = Path(root) / "ISIC2018"
    if top.exists():
        shutil.rmtree(top)
    truth = Truth(top, "isic2018", lossless=False)
    n_val = max(1, n // 6) if n >= 3 else 0
    n_test = max(1, n // 4) if n >= 3 else 0
    splits = [("Training", n - n_val - n_test), ("Validation", n_val), ("Test", n_test)]
    index = 0
    dirs: dict[str, tuple[Path, Path]] = {}
    distinct = Distinct()
    for split, count in splits:
        inp = top / f"ISIC2018_Task1-2_{split}_Input"
        gt = top / f"ISIC2018_Task1_{split}_GroundTruth"
        if nested:
            inp, gt = inp / inp.name, gt / gt.name
        inp.mkdir(parents=True)
        gt.mkdir(parents=True)
        for folder in (inp, gt):
            (folder / "LICENSE.txt").write_text("CC-BY-NC (synthetic stand-in)\n")
            (folder / "ATTRIBUTION.txt").write_text("synthetic data written by medplan\n")
        dirs[split] = (inp, gt)
        for _ in range(count):
            shape = image_size("isic2018", size, seeded_rng(seed, 21, index))
            image, label = distinct.draw(lambda a: _skin_frame(seeded_rng(seed, 20, index, a), shape, hairs))
            case_id = f"ISIC_{index:07d}"
            (inp / f"{case_id}.jpg").write_bytes(jpeg_bytes(image, 92))
            (gt / f"{case_id}_segmentation.png").write_bytes(png_bytes(label * 255))
            if split != "Test" or test_ground_truth:
                truth.add(case_id, label)
            index += 1
    if duplicates and index >= 1:
        inp, gt = dirs["Training"]
        originals = [p.stem for p in sorted(inp.glob("ISIC_*.jpg"))]
        for k, kind in enumerate(DUPLICATE_KINDS):
            src = originals[k % len(originals)]
            dup = f"ISIC_{9000000 + k:07d}"
            plant_jpeg(truth, inp, gt, src, dup, kind, f"{src}.jpg", f"{src}_segmentation.png", f"{dup}.jpg",
                        f"{dup}_segmentation.png", read_image(gt / f"{src}_segmentation.png") // 255)
    if not test_ground_truth:
        shutil.rmtree(dirs["Test"][1] if not nested else dirs["Test"][1].parent)
        truth.info["skipped"] += [p.stem for p in sorted(dirs["Test"][0].glob("ISIC_*.jpg"))]
    truth.save()
    return top
