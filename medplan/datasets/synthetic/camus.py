"""Synthetic CAMUS (2019 challenge .mhd layout or 2023 NIfTI release): echo-like sectors with
LV cavity, wall and atrium under speckle."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from medplan.datasets.synthetic.common import (Distinct, Truth, brighten, clip_uint8, decode_image, ellipse_blob,
                                               image_size, jpeg_bytes, seeded_rng, smooth_field, speckle_field,
                                               wobble_terms)
from medplan.errors import MedplanError


VIEWS = ("2CH", "4CH")
INSTANTS = ("ED", "ES")


def _camus_frame(seed: int, patient: int, view: int, instant: int, shape: tuple[int, int], attempt: int = 0,
                 same_acquisition: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One ED or ES frame: (uint8 image, uint8 label map 0..3), both (H, W) with the probe on top.

    ``same_acquisition``: ED and ES of one view share the sector, probe position, gain and
    tissue texture (as the two annotated frames of one real recording do); only the heart's
    shape and the speckle differ, so the pair can be a perceptual near-duplicate.
    """
    h, w = shape
    pr = seeded_rng(seed, 1, patient)          # patient: sector
    vr = seeded_rng(seed, 2, patient, view)    # view: heart geometry
    fr = seeded_rng(seed, 3, patient, view, instant, attempt)  # frame: sector, echogenicity, speckle
    ar = seeded_rng(seed, 4, patient, view, attempt) if same_acquisition else fr  # acquisition (shared by ED/ES)
    # the sector varies per frame too (as if re-acquired): it dominates a perceptual hash
    apex_y, apex_x = -ar.uniform(0, 0.12) * h, w / 2 + pr.uniform(-0.04, 0.04) * w + ar.uniform(-0.08, 0.08) * w
    half_angle = math.radians(pr.uniform(35, 41) + ar.uniform(-11, 11))
    depth = h * ar.uniform(0.7, 1.05)

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dist = np.hypot(yy - apex_y, xx - apex_x)
    cone = (np.abs(np.arctan2(xx - apex_x, yy - apex_y + 1e-3)) <= half_angle) & (dist <= depth)

    # the heart along a tilted long axis; 2CH and 4CH tilt in opposite directions
    tilt = math.radians(vr.uniform(-13, -3) if view == 0 else vr.uniform(3, 13))
    length = vr.uniform(0.15, 0.2) * h          # LV half length (ED)
    width = vr.uniform(0.065, 0.085) * h * (1.0 if view == 0 else 1.12)
    wall = vr.uniform(0.028, 0.04) * h
    la_ry, la_rx = vr.uniform(0.06, 0.085) * h, vr.uniform(0.075, 0.1) * h
    centre_depth = length + wall + vr.uniform(0.1, 0.16) * h
    lv_wobble = wobble_terms(vr, (1, 2, 3) if view == 1 else (2, 3), 0.08)
    la_wobble = wobble_terms(vr, (2, 3), 0.08)
    if instant == 1:  # end-systole: smaller cavity, thicker wall, larger atrium, base moves up
        shrink = vr.uniform(0.70, 0.80)
        new_length = length * (shrink ** 0.6)
        centre_depth -= (length - new_length) * 0.5
        length, width = new_length, width * shrink
        wall *= vr.uniform(1.3, 1.5)
        grow = vr.uniform(1.15, 1.3)
        la_ry, la_rx = la_ry * grow, la_rx * grow
    ay, ax = math.cos(tilt), math.sin(tilt)  # unit vector along the long axis, pointing down
    cy = apex_y + ay * centre_depth + ar.uniform(-0.04, 0.04) * h  # the probe moved a little
    cx = apex_x + ax * centre_depth + ar.uniform(-0.06, 0.06) * w
    la_dist = length + la_ry * 0.95
    la_cy, la_cx = cy + ay * la_dist, cx + ax * la_dist

    cavity = ellipse_blob(shape, cy, cx, length, width, tilt, lv_wobble)
    outer = ellipse_blob(shape, cy, cx, length + wall, width + wall, tilt, lv_wobble)
    along = (yy - cy) * ay + (xx - cx) * ax   # position along the long axis
    myo = outer & ~cavity & (along < length * 0.85)  # open at the base (mitral valve)
    atrium = ellipse_blob(shape, la_cy, la_cx, la_ry, la_rx, tilt, la_wobble) & ~outer

    label = np.zeros(shape, dtype=np.uint8)
    label[atrium] = 3
    label[myo] = 2
    label[cavity] = 1
    label[~cone] = 0

    # echogenicity: tissue with a smooth random texture (per frame), bright wall, dark blood
    tissue = ar.uniform(50, 85) * smooth_field(ar, shape, (3, 3), 0.25, 1.65)
    base = tissue
    base = np.where(myo, ar.uniform(165, 210) * smooth_field(ar, shape, (3, 3), 0.85, 1.15), base)
    base = np.where(cavity | atrium, ar.uniform(8, 22), base)
    base = gaussian_filter(base, 1.0)
    # time-gain compensation profile over depth and an acoustic shadow (a darker wedge from the
    # probe, e.g. behind a rib): both vary per frame, as they do between real acquisitions
    r = dist / depth
    gain = (1.0 + ar.uniform(-0.35, 0.35) * np.cos(math.pi * r) + ar.uniform(-0.3, 0.3) * np.cos(2 * math.pi * r))
    angle = np.arctan2(xx - apex_x, yy - apex_y + 1e-3)
    centre, spread = ar.uniform(-half_angle, half_angle), math.radians(ar.uniform(6, 14))
    gain = gain * (1.0 - ar.uniform(0.4, 0.75) * np.exp(-0.5 * ((angle - centre) / spread) ** 2))
    image = base * gain * speckle_field(fr, shape)
    image[~cone] = 0
    return clip_uint8(image), label


def _camus_plan(n_patients: int, duplicates: bool) -> list[tuple[int, int, int, str]]:
    """Planted duplicates: (source patient, view, instant, kind), each a new patient folder."""
    if not duplicates:
        return []
    kinds = ("exact", "reencoded", "brightened")
    return [(i % n_patients, (0, 1, 0)[i], (0, 1, 1)[i], kind) for i, kind in enumerate(kinds)]


def _camus_cfg(rng: np.random.Generator, layout: str, nb_frame: int) -> str:
    sex = "F" if rng.random() < 0.5 else "M"
    age = int(rng.integers(20, 90))
    quality = ("Good", "Medium", "Poor")[int(rng.choice(3, p=[0.35, 0.45, 0.2]))]
    edv = rng.uniform(60, 180)
    esv = edv * rng.uniform(0.3, 0.65)
    ef = 100 * (edv - esv) / edv
    lines = [f"ED: 1", f"ES: {nb_frame}", f"NbFrame: {nb_frame}", f"Sex: {sex}", f"Age: {age}",
             f"ImageQuality: {quality}"]
    if layout == "2019":
        lines += [f"LVedv: {edv:.2f}", f"LVesv: {esv:.2f}", f"LVef: {ef:.2f}"]
    else:
        lines += [f"EF: {ef:.1f}", f"FrameRate: {rng.uniform(25, 60):.1f}"]
    return "\n".join(lines) + "\n"


def _sitk_write(array: np.ndarray, path: Path, layout: str, spacing: float) -> None:
    """Write as the official files are: 2019 .mhd 3D (W, H, 1); 2023 NIfTI 2D (W, H) or 3D sequences."""
    import SimpleITK as sitk

    if layout == "2019" and array.ndim == 2:
        array = array[None]  # the challenge .mhd files are 3D with one slice: DimSize = W H 1
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing((spacing, spacing) + ((1.0,) if array.ndim == 3 else ()))
    sitk.WriteImage(image, str(path), useCompression=layout == "2023")


def _copy_exact(src: Path, dst: Path, layout: str) -> None:
    """Byte copy under a new name; an .mhd header must point at its own renamed .raw file."""
    if layout == "2023":
        shutil.copyfile(src, dst)
        return
    shutil.copyfile(src.with_suffix(".raw"), dst.with_suffix(".raw"))
    header = src.read_text().replace(f"ElementDataFile = {src.with_suffix('.raw').name}",
                                     f"ElementDataFile = {dst.with_suffix('.raw').name}")
    dst.write_text(header)


def write_camus(root: str | Path, n_patients: int = 6, layout: str = "2019", size: tuple[int, int] | None = None,
                seed: int = 0, duplicates: bool = True, testing: int = 1, sequences: bool = True,
                same_acquisition: bool = False) -> Path:
    """Write CAMUS in the 2019 (``training/``, ``testing/``, .mhd) or 2023 (``database_nifti/``) layout.

    Returns ``root/CAMUS_2019`` or ``root/CAMUS_public``. The same seed gives the same frames
    in both layouts. ``testing`` patients (2019 only) have no ground truth, as in the release.
    ``same_acquisition``: ED and ES of one view come from one recording (shared sector, gain,
    texture), as in the real data, so they may be perceptual near-duplicates of each other;
    frames of different patients or views are still kept apart.
    """
    layout = str(layout)
    if layout not in ("2019", "2023"):
        raise MedplanError(f"CAMUS layout must be '2019' or '2023', got {layout!r}")
    if n_patients < 1:
        raise MedplanError("n_patients must be at least 1")
    root = Path(root)
    top = root / ("CAMUS_2019" if layout == "2019" else "CAMUS_public")
    if top.exists():
        shutil.rmtree(top)
    base = top / ("training" if layout == "2019" else "database_nifti")
    base.mkdir(parents=True)
    ext = ".mhd" if layout == "2019" else ".nii.gz"
    truth = Truth(top, "camus", lossless=True)
    shapes = {}
    distinct = Distinct()
    cache: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]] = {}

    attempts: dict[tuple[int, int], int] = {}  # (patient, view) -> the attempt ED was drawn with

    def frame(p: int, v: int, i: int, shape: tuple[int, int], check: bool) -> tuple[np.ndarray, np.ndarray]:
        if (p, v, i) not in cache:
            if same_acquisition and (p, v) in attempts:  # ES of a recording whose ED is drawn
                cache[(p, v, i)] = _camus_frame(seed, p, v, i, shape, attempts[(p, v)], True)
            else:
                def make(attempt: int) -> tuple[np.ndarray, np.ndarray]:
                    attempts[(p, v)] = attempt
                    return _camus_frame(seed, p, v, i, shape, attempt, same_acquisition)

                cache[(p, v, i)] = distinct.draw(make, check)
        return cache[(p, v, i)]

    def write_patient(folder: Path, p: int, gt: bool) -> None:
        pid = folder.name
        folder.mkdir(parents=True)
        prng = seeded_rng(seed, 9, p)
        shape = image_size("camus", size, prng)
        shapes[pid] = shape
        spacing = float(prng.uniform(0.15, 0.31))
        for v, view in enumerate(VIEWS):
            nb_frame = int(prng.integers(12, 22))
            (folder / f"Info_{view}.cfg").write_text(_camus_cfg(prng, layout, nb_frame))
            frames = []
            for i, instant in enumerate(INSTANTS):
                image, label = frame(p, v, i, shape, gt)
                stem = f"{pid}_{view}_{instant}"
                _sitk_write(image, folder / f"{stem}{ext}", layout, spacing)
                if gt:
                    _sitk_write(label, folder / f"{stem}_gt{ext}", layout, spacing)
                    truth.add(stem, label, image)
                frames.append((image, label))
            if sequences:  # ignored by the importer; kept short (ED, ES) to stay small
                seq = np.stack([f[0] for f in frames])
                tag = "sequence" if layout == "2019" else "half_sequence"
                _sitk_write(seq, folder / f"{pid}_{view}_{tag}{ext}", layout, spacing)
                if layout == "2023" and gt:
                    _sitk_write(np.stack([f[1] for f in frames]), folder / f"{pid}_{view}_{tag}_gt{ext}",
                                layout, spacing)

    for p in range(n_patients):
        write_patient(base / f"patient{p + 1:04d}", p, True)

    for k, (p, v, i, kind) in enumerate(_camus_plan(n_patients, duplicates)):
        src_pid, dup_pid = f"patient{p + 1:04d}", f"patient{n_patients + k + 1:04d}"
        view, instant = VIEWS[v], INSTANTS[i]
        src, dst = base / src_pid, base / dup_pid
        dst.mkdir()
        shutil.copyfile(src / f"Info_{view}.cfg", dst / f"Info_{view}.cfg")
        src_stem, dup_stem = f"{src_pid}_{view}_{instant}", f"{dup_pid}_{view}_{instant}"
        image, label = cache[(p, v, i)]
        spacing = float(seeded_rng(seed, 9, p).uniform(0.15, 0.31))
        if kind == "exact":
            _copy_exact(src / f"{src_stem}{ext}", dst / f"{dup_stem}{ext}", layout)
        else:
            image = decode_image(jpeg_bytes(image, 95)) if kind == "reencoded" else brighten(image)
            _sitk_write(image, dst / f"{dup_stem}{ext}", layout, spacing)
        _copy_exact(src / f"{src_stem}_gt{ext}", dst / f"{dup_stem}_gt{ext}", layout)
        truth.add(dup_stem, label, image)
        truth.duplicate(src_stem, dup_stem, kind)

    if layout == "2019":
        for t in range(testing):
            write_patient(top / "testing" / f"patient{t + 1:04d}", 1000 + t, False)
            truth.info["skipped"] += [f"testing/patient{t + 1:04d}_{v}_{i}" for v in VIEWS for i in INSTANTS]
    else:
        split = top / "database_split"
        split.mkdir()
        ids = [f"patient{p + 1:04d}" for p in range(n_patients)]
        cut = max(1, int(len(ids) * 0.8))
        (split / "subgroup_training.txt").write_text("\n".join(ids[:cut]) + "\n")
        (split / "subgroup_validation.txt").write_text("\n".join(ids[cut:]) + "\n")
        (split / "subgroup_testing.txt").write_text("")
    truth.save()
    return top
