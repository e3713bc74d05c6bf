"""Small fake datasets written exactly in the official download layouts, with learnable structures.

Tests and the demo use these instead of real data (which never ships), so the real importers
are what gets exercised. Every writer returns the folder a user would pass to
``medplan_convert``. The truth (class maps, lossless images, planted duplicates) is kept
*outside* that folder, in ``<parent>/.synthetic_truth/<folder name>/``, and read back with
:func:`truth_labels`, :func:`truth_images`, :func:`planted_duplicates`.

Structures, all drawn with vectorised numpy (no per-pixel Python):

* CAMUS: an ultrasound sector (apex at the top centre, black outside) filled with speckle;
  a dark LV cavity (1) inside a bright myocardium ring open at the base (2) and a dark atrium
  below it (3). Geometry is random per patient and view; ES has a smaller cavity, a thicker
  wall and a larger atrium. Each frame also gets its own smooth tissue-echogenicity field, so
  that distinct frames are never perceptual-hash near-duplicates of each other.
* ISIC 2018: skin-coloured RGB with a darker irregular lesion (1), optional hairs.
* NeoPolyp: pink mucosa with folds and 1-3 polyps, non-neoplastic (1, pale, smooth, green in
  the mask) or neoplastic (2, red, pitted texture, red in the mask); masks are colour JPEGs.
* Kvasir-SEG / CVC-ClinicDB: the same polyps, binary masks. BUSI: gray ultrasound with
  hypoechoic lesions, several mask files for some images, ``normal`` images with empty masks.

Planted duplicates (``duplicates=True``): an exact byte copy, a re-encoded copy (JPEG
quality 95 round trip) and a brightened copy (+8 intensity), each under a new case name with
its ground truth.
"""
from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image, ImageDraw
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


# ----------------------------------------------------------------------------- truth files


def _truth_dir(layout_dir: Path) -> Path:
    layout_dir = Path(layout_dir)
    return layout_dir.parent / TRUTH_DIR / layout_dir.name


def manifest(layout_dir: str | Path) -> dict[str, Any]:
    """What a writer recorded: dataset, cases, planted duplicates, skipped cases."""
    path = _truth_dir(Path(layout_dir)) / "manifest.json"
    if not path.is_file():
        raise MedplanError("no synthetic-data manifest (was this folder written by medplan.datasets.synthetic?)",
                           path)
    return json.loads(path.read_text(encoding="utf-8"))


def planted_duplicates(layout_dir: str | Path) -> list[tuple[str, str, str]]:
    """``(original_case_id, duplicate_case_id, kind)`` with kind in exact | reencoded | brightened."""
    return [(d["original"], d["duplicate"], d["kind"]) for d in manifest(layout_dir)["duplicates"]]


def _read_truth(layout_dir: Path, sub: str) -> dict[str, np.ndarray]:
    folder = _truth_dir(Path(layout_dir)) / sub
    return {p.stem: read_image(p) for p in sorted(folder.glob("*.png"))} if folder.is_dir() else {}


def truth_labels(layout_dir: str | Path) -> dict[str, np.ndarray]:
    """True class maps by the case id the importer gives (``patient0001_2CH_ED``, ``ISIC_0000000``)."""
    return _read_truth(Path(layout_dir), "labels")


def truth_images(layout_dir: str | Path) -> dict[str, np.ndarray]:
    """True images of lossless layouts (CAMUS); empty for JPEG layouts."""
    return _read_truth(Path(layout_dir), "images")


class _Truth:
    def __init__(self, layout_dir: Path, dataset: str, lossless: bool):
        self.dir = _truth_dir(layout_dir)
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


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), *[int(k) for k in keys]])


def _size(kind: str, size: tuple[int, int] | None, rng: np.random.Generator) -> tuple[int, int]:
    """The requested size, or the default with a little per-image jitter (real sizes vary)."""
    if size is not None:
        h, w = int(size[0]), int(size[1])
        if h < 32 or w < 32:
            raise MedplanError(f"synthetic images need at least 32x32 pixels, got {h}x{w}")
        return h, w
    h, w = DEFAULT_SIZES[kind]
    return int(round(h * rng.uniform(0.9, 1.1))), int(round(w * rng.uniform(0.9, 1.1)))


def _smooth(rng: np.random.Generator, shape: tuple[int, int], cells: tuple[int, int], lo: float,
            hi: float) -> np.ndarray:
    """A smooth random field in [lo, hi]: a few random values upsampled bicubically."""
    small = rng.random(cells).astype(np.float32)
    field = np.asarray(Image.fromarray(small).resize((shape[1], shape[0]), Image.BICUBIC), dtype=np.float32)
    return lo + (hi - lo) * np.clip(field, 0.0, 1.0)


def _blob(shape: tuple[int, int], cy: float, cx: float, ry: float, rx: float, angle: float = 0.0,
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


def _box(mask: np.ndarray, pad: int) -> tuple[slice, slice]:
    """The bounding box of ``mask`` grown by ``pad`` pixels (whole image if empty)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not rows.size:
        return slice(0, mask.shape[0]), slice(0, mask.shape[1])
    return (slice(max(0, rows[0] - pad), min(mask.shape[0], rows[-1] + pad + 1)),
            slice(max(0, cols[0] - pad), min(mask.shape[1], cols[-1] + pad + 1)))


def _wobble(rng: np.random.Generator, ks: Iterable[int], amp: float) -> list[tuple[int, float, float]]:
    return [(k, float(rng.uniform(0, amp)), float(rng.uniform(0, 2 * math.pi))) for k in ks]


def _jpeg(array: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert(img.mode))


class _Distinct:
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


def _brighten(array: np.ndarray) -> np.ndarray:
    return np.clip(array.astype(np.int16) + BRIGHTEN, 0, 255).astype(np.uint8)


def _to_uint8(array: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(array), 0, 255).astype(np.uint8)


def _speckle(rng: np.random.Generator, shape: tuple[int, int], sigma: float = 0.7) -> np.ndarray:
    """Rayleigh speckle with mean 1, slightly correlated like real ultrasound."""
    speckle = rng.rayleigh(1.0, shape).astype(np.float32) / math.sqrt(math.pi / 2)
    if sigma > 0:
        speckle = gaussian_filter(speckle, sigma)
        speckle /= max(float(speckle.mean()), 1e-6)
    return speckle


# ----------------------------------------------------------------------------- CAMUS


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
    pr = _rng(seed, 1, patient)          # patient: sector
    vr = _rng(seed, 2, patient, view)    # view: heart geometry
    fr = _rng(seed, 3, patient, view, instant, attempt)  # frame: sector, echogenicity, speckle
    ar = _rng(seed, 4, patient, view, attempt) if same_acquisition else fr  # acquisition (shared by ED/ES)
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
    lv_wobble = _wobble(vr, (1, 2, 3) if view == 1 else (2, 3), 0.08)
    la_wobble = _wobble(vr, (2, 3), 0.08)
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

    cavity = _blob(shape, cy, cx, length, width, tilt, lv_wobble)
    outer = _blob(shape, cy, cx, length + wall, width + wall, tilt, lv_wobble)
    along = (yy - cy) * ay + (xx - cx) * ax   # position along the long axis
    myo = outer & ~cavity & (along < length * 0.85)  # open at the base (mitral valve)
    atrium = _blob(shape, la_cy, la_cx, la_ry, la_rx, tilt, la_wobble) & ~outer

    label = np.zeros(shape, dtype=np.uint8)
    label[atrium] = 3
    label[myo] = 2
    label[cavity] = 1
    label[~cone] = 0

    # echogenicity: tissue with a smooth random texture (per frame), bright wall, dark blood
    tissue = ar.uniform(50, 85) * _smooth(ar, shape, (3, 3), 0.25, 1.65)
    base = tissue
    base = np.where(myo, ar.uniform(165, 210) * _smooth(ar, shape, (3, 3), 0.85, 1.15), base)
    base = np.where(cavity | atrium, ar.uniform(8, 22), base)
    base = gaussian_filter(base, 1.0)
    # time-gain compensation profile over depth and an acoustic shadow (a darker wedge from the
    # probe, e.g. behind a rib): both vary per frame, as they do between real acquisitions
    r = dist / depth
    gain = (1.0 + ar.uniform(-0.35, 0.35) * np.cos(math.pi * r) + ar.uniform(-0.3, 0.3) * np.cos(2 * math.pi * r))
    angle = np.arctan2(xx - apex_x, yy - apex_y + 1e-3)
    centre, spread = ar.uniform(-half_angle, half_angle), math.radians(ar.uniform(6, 14))
    gain = gain * (1.0 - ar.uniform(0.4, 0.75) * np.exp(-0.5 * ((angle - centre) / spread) ** 2))
    image = base * gain * _speckle(fr, shape)
    image[~cone] = 0
    return _to_uint8(image), label


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
    truth = _Truth(top, "camus", lossless=True)
    shapes = {}
    distinct = _Distinct()
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
        prng = _rng(seed, 9, p)
        shape = _size("camus", size, prng)
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
        spacing = float(_rng(seed, 9, p).uniform(0.15, 0.31))
        if kind == "exact":
            _copy_exact(src / f"{src_stem}{ext}", dst / f"{dup_stem}{ext}", layout)
        else:
            image = _decode(_jpeg(image, 95)) if kind == "reencoded" else _brighten(image)
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


# ----------------------------------------------------------------------------- RGB scenes


def _skin_frame(rng: np.random.Generator, shape: tuple[int, int], hairs: bool) -> tuple[np.ndarray, np.ndarray]:
    h, w = shape
    red = rng.uniform(185, 240)
    green = red * rng.uniform(0.68, 0.84)
    skin = np.array([red, green, green * rng.uniform(0.78, 0.95)], np.float32)
    light = _smooth(rng, shape, (3, 4), 0.78, 1.12)
    tint = _smooth(rng, shape, (3, 3), 0.94, 1.06)
    img = skin[None, None, :] * light[..., None]
    img[..., 0] *= tint
    m = min(h, w)
    r0 = rng.uniform(0.14, 0.3) * m
    cy, cx = rng.uniform(0.32, 0.68) * h, rng.uniform(0.32, 0.68) * w
    mask = _blob(shape, cy, cx, r0 * rng.uniform(0.75, 1.25), r0 * rng.uniform(0.75, 1.25),
                 rng.uniform(0, math.pi), _wobble(rng, (2, 3, 4, 5), 0.1))
    lesion = np.array([rng.uniform(70, 140), rng.uniform(40, 90), rng.uniform(25, 70)], np.float32)
    texture = _smooth(rng, shape, (7, 7), 0.65, 1.2)
    sigma = max(1.0, m / 150)
    box = _box(mask, int(3 * sigma) + 2)
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
    return _to_uint8(img), mask.astype(np.uint8)


def _polyp_frame(rng: np.random.Generator, shape: tuple[int, int], n_polyps: tuple[int, int],
                 two_classes: bool) -> tuple[np.ndarray, np.ndarray]:
    """Endoscopy-like RGB scene; label 1 = non-neoplastic, 2 = neoplastic (1 only if not two_classes)."""
    h, w = shape
    m = min(h, w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    mucosa = np.array([rng.uniform(165, 215), rng.uniform(75, 120), rng.uniform(65, 105)], np.float32)
    light = _smooth(rng, shape, (3, 4), 0.65, 1.15)
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
            blob = _blob(shape, cy, cx, r0 * rng.uniform(0.8, 1.2), r0 * rng.uniform(0.8, 1.2),
                         rng.uniform(0, math.pi), _wobble(rng, (2, 3), 0.08))
            if not (blob & (label > 0)).any() and blob.any():
                break
        else:
            continue
        cls = int(rng.integers(1, 3)) if two_classes else 1
        sigma = max(0.8, m / 200)
        box = _box(blob, int(3 * sigma) + 2)  # draw in the polyp's bounding box only
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
    return _to_uint8(img), label


def _busi_frame(rng: np.random.Generator, shape: tuple[int, int], n_lesions: int
                ) -> tuple[np.ndarray, list[np.ndarray]]:
    h, w = shape
    yy = np.mgrid[0:h, 0:w][0].astype(np.float32)
    base = rng.uniform(70, 110) * _smooth(rng, shape, (4, 5), 0.5, 1.5)
    layers = 1.0 + 0.25 * np.sin(yy / rng.uniform(6, 14) + _smooth(rng, shape, (3, 4), 0, 6))
    base = base * layers
    masks = []
    for _ in range(n_lesions):
        r0 = rng.uniform(0.08, 0.18) * min(h, w)
        cy, cx = rng.uniform(0.3, 0.75) * h, rng.uniform(0.2, 0.8) * w
        blob = _blob(shape, cy, cx, r0 * rng.uniform(0.6, 0.9), r0 * rng.uniform(1.0, 1.4), rng.uniform(-0.3, 0.3),
                     _wobble(rng, (2, 3, 5), 0.1))
        base = np.where(blob, rng.uniform(10, 30), base)
        masks.append(blob.astype(np.uint8) * 255)
    image = gaussian_filter(base, 1.0) * _speckle(rng, shape)
    return _to_uint8(image), masks


# ----------------------------------------------------------------------------- JPEG layouts


def _plant_jpeg(truth: _Truth, images: Path, masks: Path, src_id: str, dup_id: str, kind: str,
                img_name: str, mask_name: str, dup_img: str, dup_mask: str, label: np.ndarray,
                quality: int = 95) -> None:
    src = images / img_name
    if kind == "exact":
        shutil.copyfile(src, images / dup_img)
    else:
        pixels = read_image(src)
        if kind == "brightened":
            pixels = _brighten(pixels)
        (images / dup_img).write_bytes(_jpeg(pixels, quality))
    shutil.copyfile(masks / mask_name, masks / dup_mask)
    truth.add(dup_id, label)
    truth.duplicate(src_id, dup_id, kind)


DUPLICATE_KINDS = ("exact", "reencoded", "brightened")


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
    truth = _Truth(top, "isic2018", lossless=False)
    n_val = max(1, n // 6) if n >= 3 else 0
    n_test = max(1, n // 4) if n >= 3 else 0
    splits = [("Training", n - n_val - n_test), ("Validation", n_val), ("Test", n_test)]
    index = 0
    dirs: dict[str, tuple[Path, Path]] = {}
    distinct = _Distinct()
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
            shape = _size("isic2018", size, _rng(seed, 21, index))
            image, label = distinct.draw(lambda a: _skin_frame(_rng(seed, 20, index, a), shape, hairs))
            case_id = f"ISIC_{index:07d}"
            (inp / f"{case_id}.jpg").write_bytes(_jpeg(image, 92))
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
            _plant_jpeg(truth, inp, gt, src, dup, kind, f"{src}.jpg", f"{src}_segmentation.png", f"{dup}.jpg",
                        f"{dup}_segmentation.png", read_image(gt / f"{src}_segmentation.png") // 255)
    if not test_ground_truth:
        shutil.rmtree(dirs["Test"][1] if not nested else dirs["Test"][1].parent)
        truth.info["skipped"] += [p.stem for p in sorted(dirs["Test"][0].glob("ISIC_*.jpg"))]
    truth.save()
    return top


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
    truth = _Truth(top, "neopolyp", lossless=False)
    images = top / "train" / ("train" if nested else "")
    masks = top / "train_gt" / ("train_gt" if nested else "")
    test = top / "test" / ("test" if nested else "")
    for folder in (images, masks, test):
        folder.mkdir(parents=True, exist_ok=True)
    distinct = _Distinct()
    for i in range(n):
        rng = _rng(seed, 31, i)
        shape = _size("neopolyp", size, rng)
        image, label = distinct.draw(lambda a: _polyp_frame(_rng(seed, 30, i, a), shape, (1, 3), two_classes=True))
        case_id = f"{int(rng.integers(16 ** 11, 16 ** 12)):012x}{i:04d}"
        (images / f"{case_id}.jpeg").write_bytes(_jpeg(image, 90))
        (masks / f"{case_id}.jpeg").write_bytes(_jpeg(_colour_mask(label), mask_quality))
        truth.add(case_id, label)
    for i in range(2):  # test images have no ground truth
        rng = _rng(seed, 32, i)
        image, _ = _polyp_frame(rng, _size("neopolyp", size, rng), (1, 2), two_classes=True)
        (test / f"test_{i:04d}.jpeg").write_bytes(_jpeg(image, 90))
    (top / "sample_submission.csv").write_text("Id,Expected\n")
    if duplicates and n >= 1:
        originals = list(truth.info["cases"])
        for k, kind in enumerate(DUPLICATE_KINDS):
            src = originals[k % len(originals)]
            dup = f"dup{k}{src[4:]}"
            _plant_jpeg(truth, images, masks, src, dup, kind, f"{src}.jpeg", f"{src}.jpeg", f"{dup}.jpeg",
                        f"{dup}.jpeg", read_image(truth.dir / "labels" / f"{src}.png"))
    truth.save()
    return top


def write_kvasir(root: str | Path, n: int = 24, size: tuple[int, int] | None = None, seed: int = 0,
                 duplicates: bool = True, mask_quality: int = 85) -> Path:
    """Kvasir-SEG layout (``images/``, ``masks/`` JPEG, ``kavsir_bboxes.json``); returns ``root/Kvasir-SEG``."""
    top = Path(root) / "Kvasir-SEG"
    if top.exists():
        shutil.rmtree(top)
    truth = _Truth(top, "kvasir", lossless=False)
    images, masks = top / "images", top / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    boxes = {}
    distinct = _Distinct()
    for i in range(n):
        rng = _rng(seed, 41, i)
        shape = _size("kvasir", size, rng)
        image, label = distinct.draw(lambda a: _polyp_frame(_rng(seed, 40, i, a), shape, (1, 2), two_classes=False))
        case_id = f"cju{int(rng.integers(36 ** 8, 36 ** 9)):x}{i:04d}"[:25]
        (images / f"{case_id}.jpg").write_bytes(_jpeg(image, 90))
        (masks / f"{case_id}.jpg").write_bytes(_jpeg(np.repeat(label[..., None] * 255, 3, axis=2), mask_quality))
        ys, xs = np.nonzero(label)
        boxes[case_id] = {"height": int(label.shape[0]), "width": int(label.shape[1]), "bbox": [] if not len(ys) else [
            {"label": "polyp", "xmin": int(xs.min()), "ymin": int(ys.min()), "xmax": int(xs.max()),
             "ymax": int(ys.max())}]}
        truth.add(case_id, label)
    (top / "kavsir_bboxes.json").write_text(json.dumps(boxes) + "\n")
    if duplicates and n >= 1:
        originals = list(truth.info["cases"])
        for k, kind in enumerate(DUPLICATE_KINDS):
            src = originals[k % len(originals)]
            dup = f"cjd{k}{src[3:]}"
            _plant_jpeg(truth, images, masks, src, dup, kind, f"{src}.jpg", f"{src}.jpg", f"{dup}.jpg",
                        f"{dup}.jpg", read_image(truth.dir / "labels" / f"{src}.png"))
    truth.save()
    return top


def write_cvc(root: str | Path, n: int = 12, size: tuple[int, int] | None = None, seed: int = 0,
              suffix: str = ".tif") -> Path:
    """CVC-ClinicDB layout (``Original/N.tif``, ``Ground Truth/N.tif``); returns ``root/CVC-ClinicDB``."""
    top = Path(root) / "CVC-ClinicDB"
    if top.exists():
        shutil.rmtree(top)
    truth = _Truth(top, "cvc", lossless=True)
    original, gt = top / "Original", top / "Ground Truth"
    original.mkdir(parents=True)
    gt.mkdir()
    for i in range(n):
        rng = _rng(seed, 50, i)
        image, label = _polyp_frame(rng, _size("cvc", size, rng), (1, 1), two_classes=False)
        Image.fromarray(image).save(original / f"{i + 1}{suffix}")
        Image.fromarray(label * 255).save(gt / f"{i + 1}{suffix}")
        truth.add(f"cvc_{i + 1:04d}", label, image)
    truth.save()
    return top


def write_busi(root: str | Path, n: int = 12, size: tuple[int, int] | None = None, seed: int = 0) -> Path:
    """BUSI layout (``Dataset_BUSI_with_GT/{benign,malignant,normal}/``); some images have two masks."""
    top = Path(root) / "Dataset_BUSI_with_GT"
    if top.exists():
        shutil.rmtree(top)
    truth = _Truth(top, "busi", lossless=True)
    counters = {"benign": 0, "malignant": 0, "normal": 0}
    for i in range(n):
        rng = _rng(seed, 60, i)
        diagnosis = ("benign", "malignant", "normal")[i % 3]
        counters[diagnosis] += 1
        n_lesions = 0 if diagnosis == "normal" else (2 if i % 4 == 0 else 1)
        image, masks = _busi_frame(rng, _size("busi", size, rng), n_lesions)
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
