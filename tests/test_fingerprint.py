"""Fingerprint values on hand-made raw datasets, and errors that name the bad file."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from medplan.errors import MedplanError
from medplan.fingerprint import fingerprint_dataset, load_raw_index
from medplan.preprocessing import CaseArrays


# --- raw-format fixtures (shared by test_duplicates.py and test_preprocessing.py) ----------

def structured_image(rng: np.random.Generator, h: int = 48, w: int = 56, rgb: bool = False) -> np.ndarray:
    """Blurred random shapes plus mild noise: images a perceptual hash can tell apart."""
    img = Image.new("RGB" if rgb else "L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 9))):
        x0, y0 = int(rng.integers(-w // 4, w)), int(rng.integers(-h // 4, h))
        x1, y1 = x0 + int(rng.integers(w // 6, w * 2 // 3)), y0 + int(rng.integers(h // 6, h * 2 // 3))
        colour = tuple(int(c) for c in rng.integers(20, 256, 3)) if rgb else int(rng.integers(20, 256))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    a = np.asarray(img.filter(ImageFilter.GaussianBlur(1.5))).astype(np.int16)
    return np.clip(a + rng.integers(-6, 7, a.shape), 0, 255).astype(np.uint8)


def blob_label(rng: np.random.Generator, h: int, w: int, n_classes: int) -> np.ndarray:
    lab = np.zeros((h, w), np.uint8)
    for k in range(1, n_classes):
        y, x = int(rng.integers(0, h - 8)), int(rng.integers(0, w - 8))
        lab[y:y + 8, x:x + 8] = k
    return lab


def write_raw(root: Path, images: dict, labels: dict, *, classes=("background", "lesion"), groups=None,
              channels: int | None = None, image_bytes: dict | None = None, name: str = "TEST") -> Path:
    """Write a medplan raw dataset; ``image_bytes`` overrides a case's PNG with given file bytes."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    (root / "labels").mkdir(exist_ok=True)
    for case_id, img in images.items():
        if image_bytes and case_id in image_bytes:
            (root / "images" / f"{case_id}.png").write_bytes(image_bytes[case_id])
        else:
            Image.fromarray(img).save(root / "images" / f"{case_id}.png")
        Image.fromarray(labels[case_id]).save(root / "labels" / f"{case_id}.png")
    if channels is None:
        channels = 3 if next(iter(images.values())).ndim == 3 else 1
    with open(root / "cases.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case_id", "group", "source_image", "source_label"])
        for case_id in images:
            w.writerow([case_id, (groups or {}).get(case_id, case_id), f"src/{case_id}.png", f"src/{case_id}_m.png"])
    (root / "dataset.json").write_text(json.dumps({
        "name": name, "format": "medplan-raw-1", "source_format": "test", "source": "/nowhere",
        "modality": "unknown", "channels": channels, "labels": {c: i for i, c in enumerate(classes)},
        "group_column": "group" if groups else None, "num_cases": len(images)}))
    return root


def png_with(array: np.ndarray, **save_args) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", **save_args)
    return buf.getvalue()


def jpeg_roundtrip(array: np.ndarray, quality: int = 85) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert(Image.fromarray(array).mode))


def small_set(rng, n=6, h=40, w=48, rgb=False, n_classes=3):
    images = {f"case_{i:03d}": structured_image(rng, h + 2 * (i % 3), w, rgb=rgb) for i in range(n)}
    labels = {c: blob_label(rng, im.shape[0], im.shape[1], n_classes) for c, im in images.items()}
    return images, labels


# --- fingerprint values ---------------------------------------------------------------------

def test_fingerprint_values_match_numpy(tmp_path):
    rng = np.random.default_rng(1)
    images, labels = small_set(rng, n=6, rgb=True)
    labels["case_000"][:] = 0  # a case without foreground: presence < 1
    groups = {c: f"patient_{i // 2}" for i, c in enumerate(images)}
    raw = write_raw(tmp_path / "raw", images, labels, classes=("background", "a", "b"), groups=groups)
    fp = fingerprint_dataset(raw, tmp_path / "pre", num_workers=0, progress=False)

    assert fp["num_cases"] == fp["num_kept"] == 6
    assert fp["channels"] == 3 and fp["rgb_is_gray"] is False and fp["channels_seen"] == 3
    heights = sorted(im.shape[0] for im in images.values())
    assert fp["sizes"]["min"] == [heights[0], 48] and fp["sizes"]["max"] == [heights[-1], 48]
    assert fp["sizes"]["median"] == [int(round(float(np.median(heights)))), 48]
    assert fp["sizes"]["n_unique"] == 3
    pixels = np.concatenate([im.reshape(-1, 3) for im in images.values()]).astype(np.float64)
    np.testing.assert_allclose(fp["intensity"]["mean"], pixels.mean(0), rtol=1e-12)
    np.testing.assert_allclose(fp["intensity"]["std"], pixels.std(0), rtol=1e-9)
    lo = np.percentile(pixels, 0.5, axis=0, method="inverted_cdf")
    hi = np.percentile(pixels, 99.5, axis=0, method="inverted_cdf")
    assert fp["intensity"]["percentile_00_5"] == lo.tolist()
    assert fp["intensity"]["percentile_99_5"] == hi.tolist()

    lab = np.concatenate([l.ravel() for l in labels.values()])
    share = fp["labels"]["pixel_share"]
    assert share["a"] == pytest.approx(np.mean(lab == 1)) and share["b"] == pytest.approx(np.mean(lab == 2))
    assert fp["labels"]["presence"] == {"background": 1.0, "a": 5 / 6, "b": 5 / 6}
    assert fp["labels"]["values_found"] == [0, 1, 2]
    assert fp["groups"] == {"column": "group", "n_groups": 3, "max_cases_per_group": 2, "has_groups": True}
    assert fp["per_case"]["case_001"]["size"] == list(images["case_001"].shape[:2])
    assert fp["per_case"]["case_001"]["channels"] == 3
    on_disk = json.loads((tmp_path / "pre" / "fingerprint.json").read_text())
    assert on_disk["intensity"] == fp["intensity"] and on_disk["per_case"].keys() == fp["per_case"].keys()


def test_rgb_stored_gray_set_is_detected(tmp_path):
    rng = np.random.default_rng(2)
    gray, labels = small_set(rng, n=4)
    # RGB PNGs of gray pictures; in one the channels differ by up to 3 levels (a lossy re-save)
    images = {c: np.repeat(g[:, :, None], 3, axis=2) for c, g in gray.items()}
    images["case_001"][:, :, 0] = np.clip(images["case_001"][:, :, 0].astype(int) + rng.integers(0, 4, (42, 48)),
                                          0, 255).astype(np.uint8)
    raw = write_raw(tmp_path / "raw", images, labels, classes=("background", "a", "b"))
    fp = fingerprint_dataset(raw, tmp_path / "pre", num_workers=0, progress=False)
    assert fp["channels"] == 3 and fp["rgb_is_gray"] is True and fp["channels_seen"] == 1
    assert len(fp["intensity"]["mean"]) == 1
    luma = np.concatenate([np.asarray(Image.fromarray(im).convert("L")).ravel() for im in images.values()])
    assert fp["intensity"]["mean"][0] == pytest.approx(luma.mean())
    assert fp["groups"]["has_groups"] is False and fp["groups"]["n_groups"] == 4

    # one truly coloured image makes the set RGB
    images["case_002"] = structured_image(rng, 40, 48, rgb=True)
    labels["case_002"] = blob_label(rng, 40, 48, 3)
    raw = write_raw(tmp_path / "raw2", images, labels, classes=("background", "a", "b"))
    fp = fingerprint_dataset(raw, tmp_path / "pre2", num_workers=0, progress=False)
    assert fp["rgb_is_gray"] is False and len(fp["intensity"]["mean"]) == 3


def test_gray_set_with_sector_corners_and_workers(tmp_path):
    """Gray echo-like images: black top corners; the pool path gives the same result as in-process."""
    rng = np.random.default_rng(3)
    images, labels = small_set(rng, n=5, h=40, w=50)
    for im in images.values():
        h, w = im.shape
        yy, xx = np.mgrid[:h, :w]
        im[np.abs(xx - w / 2) > yy * 0.7] = 0  # a cone with its apex at the top centre
    raw = write_raw(tmp_path / "raw", images, labels, classes=("background", "a", "b"))
    fp0 = fingerprint_dataset(raw, tmp_path / "pre0", arrays=CaseArrays.at(tmp_path / "pre0", (16, 16)),
                              num_workers=0, progress=False)
    fp2 = fingerprint_dataset(raw, tmp_path / "pre2", arrays=CaseArrays.at(tmp_path / "pre2", (16, 16)),
                              num_workers=2, progress=False)
    assert fp0["border_black_fraction"] > 0.9
    assert fp0["channels"] == 1 and fp0["rgb_is_gray"] is False
    for key in ("intensity", "sizes", "labels", "duplicates", "border_black_fraction"):
        assert fp0[key] == fp2[key]
    arrays = sorted(p.name for p in (tmp_path / "pre2" / "data_16x16").iterdir())
    assert arrays == sorted(f"{c}{s}" for c in images for s in (".json", ".npy", "_seg.npy"))

    flat = {c: np.full((40, 50), 128, np.uint8) for c in ["x1", "x2"]}
    flat_labels = {c: np.zeros((40, 50), np.uint8) for c in flat}
    flat_labels["x2"][:5] = 1
    flat["x2"] = flat["x2"] + 1
    raw = write_raw(tmp_path / "raw_flat", flat, flat_labels)
    fp = fingerprint_dataset(raw, tmp_path / "pre_flat", num_workers=0, progress=False)
    assert fp["border_black_fraction"] == 0.0


# --- bad input -------------------------------------------------------------------------------

def _one_case_raw(tmp_path: Path) -> Path:
    rng = np.random.default_rng(4)
    images, labels = small_set(rng, n=3)
    return write_raw(tmp_path / "raw", images, labels, classes=("background", "a", "b"))


def _fp(raw: Path, tmp_path: Path) -> dict:
    return fingerprint_dataset(raw, tmp_path / "pre", num_workers=0, progress=False)


def test_corrupt_image_names_the_file(tmp_path):
    raw = _one_case_raw(tmp_path)
    (raw / "images" / "case_001.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(MedplanError, match=r"images/case_001\.png.*cannot read"):
        _fp(raw, tmp_path)
    assert not (tmp_path / "pre" / "fingerprint.json").exists()


def test_missing_label_names_the_file(tmp_path):
    raw = _one_case_raw(tmp_path)
    (raw / "labels" / "case_002.png").unlink()
    with pytest.raises(MedplanError, match=r"labels/case_002\.png.*label missing"):
        _fp(raw, tmp_path)


def test_label_size_mismatch_names_the_file(tmp_path):
    raw = _one_case_raw(tmp_path)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(raw / "labels" / "case_000.png")
    with pytest.raises(MedplanError, match=r"labels/case_000\.png.*label size \[10, 10\] != image size"):
        _fp(raw, tmp_path)


def test_undeclared_label_value_names_the_file(tmp_path):
    raw = _one_case_raw(tmp_path)
    lab = np.zeros((40, 48), np.uint8)
    lab[3, 3] = 7
    Image.fromarray(lab).save(raw / "labels" / "case_000.png")
    with pytest.raises(MedplanError, match=r"labels/case_000\.png.*label values \[7\] are not declared"):
        _fp(raw, tmp_path)


def test_inconsistent_metadata_names_the_file(tmp_path):
    raw = _one_case_raw(tmp_path)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(raw / "images" / "stray.png")
    with pytest.raises(MedplanError, match=r"images/stray\.png.*not listed in cases\.csv"):
        _fp(raw, tmp_path)
    (raw / "images" / "stray.png").unlink()

    ds = json.loads((raw / "dataset.json").read_text())
    (raw / "dataset.json").write_text(json.dumps({**ds, "num_cases": 5}))
    with pytest.raises(MedplanError, match=r"dataset\.json.*num_cases is 5 but cases\.csv lists 3"):
        _fp(raw, tmp_path)
    (raw / "dataset.json").write_text(json.dumps({**ds, "channels": 3}))
    with pytest.raises(MedplanError, match=r"images/case_000\.png.*1 channel\(s\) but dataset\.json declares 3"):
        _fp(raw, tmp_path)
    (raw / "dataset.json").write_text(json.dumps(ds))
    assert load_raw_index(raw).case_ids == ["case_000", "case_001", "case_002"]
    (raw / "cases.csv").rename(raw / "cases.bak")
    with pytest.raises(MedplanError, match=r"cases\.csv.*file not found"):
        _fp(raw, tmp_path)
    (raw / "dataset.json").unlink()
    with pytest.raises(MedplanError, match=r"dataset\.json.*file not found"):
        _fp(raw, tmp_path)
