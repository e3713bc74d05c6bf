"""Synthetic polyp datasets (NeoPolyp, Kvasir-SEG, CVC-ClinicDB): endoscopy-like RGB scenes
with 1-3 polyps, non-neoplastic (pale, smooth) or neoplastic (red, pitted)."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from medplan.datasets.synthetic.common import (Distinct, Truth, bounding_box, clip_uint8, ellipse_blob,
                                               image_size, jpeg_bytes, plant_same_name_duplicates, seeded_rng,
                                               smooth_field, wobble_terms)


def _polyp_frame(rng: np.random.Generator, shape: tuple[int, int], n_polyps: tuple[int, int],
                 two_classes: bool) -> tuple[np.ndarray, np.ndarray]:
    """Endoscopy-like RGB scene; label 1 = non-neoplastic, 2 = neoplastic (1 only if not two_classes)."""
    h, w = shape
    m = min(h, w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    mucosa = np.array([rng.uniform(165, 215), rng.uniform(75, 120), rng.uniform(65, 105)], np.float32)
    light = smooth_field(rng, shape, (3, 4), 0.65, 1.15)
    vy, vx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    vignette = 1.0 - rng.uniform(0.3, 0.6) * (np.hypot(yy - vy, xx - vx) / math.hypot(h, w)) ** 1.5 * 2
    phi, period = rng.uniform(0, math.pi), rng.uniform(0.12, 0.3) * m
    folds = 1.0 - rng.uniform(0.1, 0.25) * np.maximum(
        0.0, np.sin(2 * math.pi * (xx * math.cos(phi) + yy * math.sin(phi)) / period + rng.uniform(0, 6))) ** 6
    shade = np.clip(light * vignette * folds, 0.15, 1.4)
    img = mucosa[None, None, :] * shade[..., None]
    label = np.zeros(shape, dtype=np.uint8)
    count = int(rng.integers(n_polyps[0], n_polyps[1] + 1))
    for _ in range(count):
        for _attempt in range(12):
            r0 = rng.uniform(0.09, 0.2) * m
            cy, cx = rng.uniform(r0, h - r0), rng.uniform(r0, w - r0)
            blob = ellipse_blob(shape, cy, cx, r0 * rng.uniform(0.8, 1.2), r0 * rng.uniform(0.8, 1.2),
                         rng.uniform(0, math.pi), wobble_terms(rng, (2, 3), 0.08))
            if not (blob & (label > 0)).any() and blob.any():
                break
        else:
            continue
        cls = int(rng.integers(1, 3)) if two_classes else 1
        sigma = max(0.8, m / 200)
        box = bounding_box(blob, int(3 * sigma) + 2)  # draw in the polyp's bounding box only
        y, x = yy[box], xx[box]
        dome = 1.0 + 0.3 * np.clip(1 - np.hypot(y - cy, x - cx) / r0, 0, 1)
        if cls == 2 or not two_classes:  # neoplastic: red, pitted surface
            colour = np.array([rng.uniform(150, 195), rng.uniform(40, 70), rng.uniform(45, 75)], np.float32)
            pits = 1.0 + 0.16 * np.sin(x / rng.uniform(1.6, 2.4)) * np.sin(y / rng.uniform(1.6, 2.4))
        else:  # non-neoplastic: pale, smooth
            colour = np.array([rng.uniform(215, 240), rng.uniform(155, 190), rng.uniform(140, 175)], np.float32)
            pits = 1.0
        alpha = gaussian_filter(blob[box].astype(np.float32), sigma)[..., None]
        polyp = colour[None, None, :] * (shade[box] * dome * pits)[..., None]
        img[box] = img[box] * (1 - alpha) + polyp * alpha
        label[blob] = cls
    img += rng.standard_normal(img.shape, dtype=np.float32) * 2.5
    return clip_uint8(img), label


def _colour_mask(label: np.ndarray) -> np.ndarray:
    rgb = np.zeros(label.shape + (3,), dtype=np.uint8)
    rgb[label == 1] = (0, 255, 0)
    rgb[label == 2] = (255, 0, 0)
    return rgb


def write_neopolyp(root: str | Path, n: int = 24, size: tuple[int, int] | None = None, seed: int = 0,
                   duplicates: bool = True, nested: bool = True, mask_quality: int = 80) -> Path:
    """BKAI-IGH NeoPolyp layout (``train/train``, ``train_gt/train_gt``, ``test/test``), colour JPEG masks."""
    top = Path(root) / "bkai-igh-neopolyp"
    if top.exists():
        shutil.rmtree(top)
    truth = Truth(top, "neopolyp", lossless=False)
    images = top / "train" / ("train" if nested else "")
    masks = top / "train_gt" / ("train_gt" if nested else "")
    test = top / "test" / ("test" if nested else "")
    for folder in (images, masks, test):
        folder.mkdir(parents=True, exist_ok=True)
    distinct = Distinct()
    for i in range(n):
        rng = seeded_rng(seed, 31, i)
        shape = image_size("neopolyp", size, rng)
        image, label = distinct.draw(lambda a: _polyp_frame(seeded_rng(seed, 30, i, a), shape, (1, 3), two_classes=True))
        case_id = f"{int(rng.integers(16 ** 11, 16 ** 12)):012x}{i:04d}"
        (images / f"{case_id}.jpeg").write_bytes(jpeg_bytes(image, 90))
        (masks / f"{case_id}.jpeg").write_bytes(jpeg_bytes(_colour_mask(label), mask_quality))
        truth.add(case_id, label)
    for i in range(2):  # test images have no ground truth
        rng = seeded_rng(seed, 32, i)
        image, _ = _polyp_frame(rng, image_size("neopolyp", size, rng), (1, 2), two_classes=True)
        (test / f"test_{i:04d}.jpeg").write_bytes(jpeg_bytes(image, 90))
    (top / "sample_submission.csv").write_text("Id,Expected\n")
    if duplicates and n >= 1:
        plant_same_name_duplicates(truth, images, masks, ".jpeg", lambda k, src: f"dup{k}{src[4:]}")
    truth.save()
    return top


def write_kvasir(root: str | Path, n: int = 24, size: tuple[int, int] | None = None, seed: int = 0,
                 duplicates: bool = True, mask_quality: int = 85) -> Path:
    """Kvasir-SEG layout (``images/``, ``masks/`` JPEG, ``kavsir_bboxes.json``); returns ``root/Kvasir-SEG``."""
    top = Path(root) / "Kvasir-SEG"
    if top.exists():
        shutil.rmtree(top)
    truth = Truth(top, "kvasir", lossless=False)
    images, masks = top / "images", top / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    boxes = {}
    distinct = Distinct()
    for i in range(n):
        rng = seeded_rng(seed, 41, i)
        shape = image_size("kvasir", size, rng)
        image, label = distinct.draw(lambda a: _polyp_frame(seeded_rng(seed, 40, i, a), shape, (1, 2), two_classes=False))
        case_id = f"cju{int(rng.integers(36 ** 8, 36 ** 9)):x}{i:04d}"[:25]
        (images / f"{case_id}.jpg").write_bytes(jpeg_bytes(image, 90))
        (masks / f"{case_id}.jpg").write_bytes(jpeg_bytes(np.repeat(label[..., None] * 255, 3, axis=2), mask_quality))
        ys, xs = np.nonzero(label)
        boxes[case_id] = {"height": int(label.shape[0]), "width": int(label.shape[1]), "bbox": [] if not len(ys) else [
            {"label": "polyp", "xmin": int(xs.min()), "ymin": int(ys.min()), "xmax": int(xs.max()),
             "ymax": int(ys.max())}]}
        truth.add(case_id, label)
    (top / "kavsir_bboxes.json").write_text(json.dumps(boxes) + "\n")
    if duplicates and n >= 1:
        plant_same_name_duplicates(truth, images, masks, ".jpg", lambda k, src: f"cjd{k}{src[3:]}")
    truth.save()
    return top


def write_cvc(root: str | Path, n: int = 12, size: tuple[int, int] | None = None, seed: int = 0,
              suffix: str = ".tif") -> Path:
    """CVC-ClinicDB layout (``Original/N.tif``, ``Ground Truth/N.tif``); returns ``root/CVC-ClinicDB``."""
    top = Path(root) / "CVC-ClinicDB"
    if top.exists():
        shutil.rmtree(top)
    truth = Truth(top, "cvc", lossless=True)
    original, gt = top / "Original", top / "Ground Truth"
    original.mkdir(parents=True)
    gt.mkdir()
    for i in range(n):
        rng = seeded_rng(seed, 50, i)
        image, label = _polyp_frame(rng, image_size("cvc", size, rng), (1, 1), two_classes=False)
        Image.fromarray(image).save(original / f"{i + 1}{suffix}")
        Image.fromarray(label * 255).save(gt / f"{i + 1}{suffix}")
        truth.add(f"cvc_{i + 1:04d}", label, image)
    truth.save()
    return top
