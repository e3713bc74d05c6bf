"""Issue 11, data items: orphan masks reported, one intensity window for >8-bit images,
palette label maps read as indices, near-duplicates dropped only where they could leak."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medplan.datasets import FORMATS, convert_dataset, synthetic
from medplan.duplicates import find_duplicates
from medplan.fingerprint import fingerprint_dataset
from medplan.io import read_image, to_uint8

SMALL = (48, 56)


# ----------------------------------------------------------------------------- orphan masks

WRITERS = {
    "camus": lambda root: synthetic.write_camus(root, n_patients=2, size=SMALL, duplicates=False, testing=0,
                                                sequences=False),
    "isic2018": lambda root: synthetic.write_isic2018(root, n=4, size=SMALL, duplicates=False, hairs=False),
    "neopolyp": lambda root: synthetic.write_neopolyp(root, n=4, size=SMALL, duplicates=False),
    "kvasir": lambda root: synthetic.write_kvasir(root, n=4, size=SMALL, duplicates=False),
    "cvc": lambda root: synthetic.write_cvc(root, n=4, size=SMALL),
    "busi": lambda root: synthetic.write_busi(root, n=6, size=SMALL),
}


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_orphan_masks_are_listed_not_dropped_silently(tmp_path, fmt):
    src = WRITERS[fmt](tmp_path / "dl")
    first = FORMATS[fmt].collect(src).cases[0]
    first.image.unlink()  # its mask(s) now have no image
    dest = convert_dataset(fmt, src, "D", raw_root=tmp_path / "raw", progress=False)
    dataset = json.loads((dest / "dataset.json").read_text())
    orphans = [src / p for p in dataset["orphan_masks"]]
    assert sorted(orphans) == sorted(first.labels)
    note = next(n for n in dataset["notes"] if "not paired with any image" in n)
    assert note.startswith(f"{len(first.labels)} mask file(s)") and first.labels[0].name in note


def test_folder_orphans_and_unused_second_mask(tmp_path):
    src = tmp_path / "dl"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(src / "images" / f"c{i}.png")
        Image.fromarray(np.eye(8, dtype=np.uint8)).save(src / "masks" / f"c{i}.png")
    Image.fromarray(np.eye(8, dtype=np.uint8)).save(src / "masks" / "lost.png")
    Image.fromarray(np.eye(8, dtype=np.uint8)).save(src / "masks" / "c1_mask.png")  # c1 already has c1.png
    dest = convert_dataset("folder", src, "F", raw_root=tmp_path / "raw", progress=False)
    dataset = json.loads((dest / "dataset.json").read_text())
    assert dataset["orphan_masks"] == ["masks/c1_mask.png", "masks/lost.png"] and dataset["num_cases"] == 3
    note = "2 mask file(s) not paired with any image, not imported: masks/c1_mask.png, masks/lost.png"
    assert note in dataset["notes"]


# ----------------------------------------------------------------------------- intensity window


def _folder_dataset(root: Path, images: dict[str, np.ndarray], suffix: str = ".png") -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for name, array in images.items():
        Image.fromarray(array).save(root / "images" / f"{name}{suffix}")
        mask = np.zeros(array.shape[:2], np.uint8)
        mask[2:5, 2:5] = 255
        Image.fromarray(mask).save(root / "masks" / f"{name}.png")
    return root


def test_16bit_images_share_one_dataset_window(tmp_path):
    rng = np.random.default_rng(0)
    dim = rng.integers(1000, 2000, (32, 40)).astype(np.uint16)
    bright = rng.integers(1000, 4000, (32, 40)).astype(np.uint16)
    dim[:4, :4] = bright[:4, :4] = 1500  # the same raw intensity in both images
    src = _folder_dataset(tmp_path / "dl", {"dim": dim, "bright": bright})
    assert read_image(src / "images" / "dim.png").dtype != np.uint8  # really stored with 16 bits
    dest = convert_dataset("folder", src, "W", raw_root=tmp_path / "raw", progress=False)
    dataset = json.loads((dest / "dataset.json").read_text())
    window = dataset["intensity_window"]
    both = np.concatenate([dim.ravel(), bright.ravel()]).astype(np.float64)
    assert window["low"] == pytest.approx(np.percentile(both, 0.5), rel=0.02)
    assert window["high"] == pytest.approx(np.percentile(both, 99.5), rel=0.02)
    assert window["source"].startswith("0.5-99.5 percentiles of 2 image(s)")
    a, b = read_image(dest / "images" / "dim.png"), read_image(dest / "images" / "bright.png")
    assert a.dtype == np.uint8 and b.dtype == np.uint8
    assert np.all(a[:4, :4] == b[0, 0]) and np.all(b[:4, :4] == b[0, 0])  # comparable between images
    assert a.max() < 200 < b.max()  # the dim image stays dim (a per-image min-max would stretch it)
    assert any("one window" in n for n in dataset["notes"])


def test_float_images_windowed_and_uint8_untouched(tmp_path):
    rng = np.random.default_rng(1)
    floats = {f"f{i}": (rng.random((24, 24)) * (i + 1)).astype(np.float32) for i in range(3)}
    src = _folder_dataset(tmp_path / "f", floats, suffix=".tif")
    dest = convert_dataset("folder", src, "FL", raw_root=tmp_path / "raw", progress=False)
    window = json.loads((dest / "dataset.json").read_text())["intensity_window"]
    assert 0 <= window["low"] < 0.1 and 2.5 < window["high"] <= 3.0
    f0 = read_image(dest / "images" / "f0.png")
    np.testing.assert_array_equal(f0, to_uint8(floats["f0"], (window["low"], window["high"])))

    gray = {f"g{i}": rng.integers(0, 256, (24, 24)).astype(np.uint8) for i in range(2)}
    src8 = _folder_dataset(tmp_path / "u8", gray)
    dest8 = convert_dataset("folder", src8, "U8", raw_root=tmp_path / "raw", progress=False)
    assert json.loads((dest8 / "dataset.json").read_text())["intensity_window"] is None
    np.testing.assert_array_equal(read_image(dest8 / "images" / "g0.png"), gray["g0"])


def test_window_sample_is_bounded(tmp_path, monkeypatch):
    import medplan.datasets.writer as writer
    from medplan.datasets.writer import intensity_window

    monkeypatch.setattr(writer, "WINDOW_SAMPLE", 1000)
    monkeypatch.setattr(writer, "WINDOW_MIN_PER_IMAGE", 10)
    rng = np.random.default_rng(2)
    paths = []
    for i in range(5):
        path = tmp_path / f"i{i}.png"
        Image.fromarray(rng.integers(0, 60000, (64, 64)).astype(np.uint16)).save(path)
        paths.append(path)
    window = intensity_window(paths)
    assert "(1000 sampled values)" in window["source"]  # 5 x 200, not 5 x 4096


# ----------------------------------------------------------------------------- palette label maps


def _palette_png(path: Path, indices: np.ndarray) -> None:
    img = Image.fromarray(indices.astype(np.uint8), mode="P")
    palette = [0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 12)
    img.putpalette(palette)
    img.save(path)


def test_read_label_keeps_palette_indices(tmp_path):
    from medplan.io import read_label

    idx = np.zeros((6, 7), np.uint8)
    idx[1:3, 1:4] = 1
    idx[4:, 5:] = 2
    _palette_png(tmp_path / "p.png", idx)
    assert Image.open(tmp_path / "p.png").mode == "P"
    np.testing.assert_array_equal(read_label(tmp_path / "p.png"), idx)
    assert read_image(tmp_path / "p.png").shape == (6, 7, 3)  # images keep their colours


def test_folder_importer_and_evaluate_read_palette_indices(tmp_path, capsys):
    from medplan.cli.evaluate import main as evaluate_main

    src = tmp_path / "dl"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    rng = np.random.default_rng(3)
    truth = {}
    for i in range(3):
        idx = np.zeros((16, 16), np.uint8)
        idx[2 + i:8, 3:9] = 1
        idx[10:14, 9 + i:15] = 2
        truth[f"c{i}"] = idx
        Image.fromarray(rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)).save(src / "images" / f"c{i}.png")
        _palette_png(src / "masks" / f"c{i}.png", idx)
    dest = convert_dataset("folder", src, "PAL", raw_root=tmp_path / "raw", progress=False)
    for case, idx in truth.items():
        np.testing.assert_array_equal(read_image(dest / "labels" / f"{case}.png"), idx)

    pred = tmp_path / "pred"
    pred.mkdir()
    for case, idx in truth.items():
        _palette_png(pred / f"{case}.png", idx)
    out = tmp_path / "summary.json"
    code = evaluate_main(["--pred", str(pred), "--gt", str(src / "masks"), "--labels", "0,1,2", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    summary = json.loads(out.read_text())
    assert summary["mDSC"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- near-duplicates


def test_decisions_with_and_without_patient_groups():
    from medplan.duplicates import DuplicateReport, duplicate_decisions

    h = [bytes([0] * 8), bytes([0] * 7 + [1]), bytes([255] * 8), bytes([0] * 7 + [3]), bytes([15] * 8)]
    ids = ["a", "b", "c", "d", "e"]
    byte_d, pix_d = ["1", "2", "3", "4", "3"], ["p1", "p2", "p3", "p4", "p5"]
    # a~b (1 bit) within patient P; a~d, b~d near across patients; c == e (bytes) within patient Q
    groups = ["P", "P", "Q", "R", "Q"]
    report = duplicate_decisions(ids, byte_d, pix_d, h, threshold=2, groups=groups)
    assert isinstance(report, DuplicateReport) and report.patient_aware
    assert [(d.case_id, d.kept_case_id, d.decision) for d in report.dropped] == [
        ("d", "a", "dropped: near-duplicate across patients"), ("e", "c", "dropped: identical bytes")]
    assert [(d.case_id, d.kept_case_id, d.decision) for d in report.kept] == [
        ("b", "a", "kept: near-duplicate within patient P")]
    assert report.summary() == ("duplicates: 2 dropped (1 near-duplicate across patients, 1 identical bytes), "
                                "1 near-duplicate pair(s) within a patient kept (same fold; see duplicates.csv)")
    # no groups: every near-duplicate dropped, as before
    blind = find_duplicates(ids, byte_d, pix_d, h, threshold=2)
    assert [d.case_id for d in blind] == ["b", "d", "e"]


def _convert_and_fingerprint(src: Path, tmp_path: Path, name: str) -> tuple[dict, list[dict]]:
    raw = convert_dataset("auto", src, name, raw_root=tmp_path / "raw", progress=False)
    fp = fingerprint_dataset(raw, tmp_path / "pre" / name, num_workers=0, progress=False)
    with open(tmp_path / "pre" / name / "duplicates.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return fp, rows


def test_camus_frames_of_one_recording_are_kept_planted_copies_dropped(tmp_path):
    """ED and ES of one recording are near-duplicates (as in real CAMUS): they share a patient
    and therefore a fold, so they are kept; the planted copies under other patients go."""
    src = synthetic.write_camus(tmp_path / "dl", n_patients=6, size=(96, 80), seed=0, same_acquisition=True)
    fp, rows = _convert_and_fingerprint(src, tmp_path, "CAMUS")
    planted = {dup for _, dup, _ in synthetic.planted_duplicates(src)}
    dup = fp["duplicates"]
    assert set(dup["dropped"]) == planted  # no distinct frame dropped
    assert dup["patient_aware"] and dup["kept_within_group"]
    kept_rows = [r for r in rows if r["decision"].startswith("kept")]
    assert kept_rows and all(r["decision"] == f"kept: near-duplicate within patient {r['case_id'].rsplit('_', 2)[0]}"
                             for r in kept_rows)
    assert {r["case_id"] for r in rows if r["decision"].startswith("dropped")} == planted
    assert "dropped: identical bytes" in {r["decision"] for r in rows}
    assert dup["summary"].startswith("duplicates: 3 dropped (1 identical bytes, 2 near-duplicate across patients)")
    assert f"{len(kept_rows)} near-duplicate pair(s) within a patient kept" in dup["summary"]


def test_camus_without_planted_copies_drops_nothing(tmp_path):
    src = synthetic.write_camus(tmp_path / "dl", n_patients=6, size=(96, 80), seed=1, duplicates=False,
                                same_acquisition=True)
    fp, _ = _convert_and_fingerprint(src, tmp_path, "CAMUS")
    assert fp["num_cases"] == 24 and fp["duplicates"]["dropped"] == []


def test_isic_planted_duplicates_still_dropped(tmp_path):
    src = synthetic.write_isic2018(tmp_path / "dl", n=12, size=(64, 80), seed=0)
    fp, rows = _convert_and_fingerprint(src, tmp_path, "ISIC")
    planted = {dup for _, dup, _ in synthetic.planted_duplicates(src)}
    assert set(fp["duplicates"]["dropped"]) == planted and not fp["duplicates"]["patient_aware"]
    assert all(r["decision"].startswith("dropped: ") for r in rows) and len(rows) == len(planted)


def test_plan_and_preprocess_print_the_duplicates_line(medplan_env, capsys):
    from medplan.cli.plan import main as plan_main
    from medplan.cli.preprocess import main as preprocess_main

    src = synthetic.write_camus(medplan_env / "dl", n_patients=6, size=(96, 80), seed=0, same_acquisition=True)
    convert_dataset("camus", src, "CAMUS", progress=False)
    assert plan_main(["-d", "CAMUS", "--no-progress", "-j", "0", "--set", "input_size=[32,32]"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("duplicates:")]
    assert len(lines) == 1 and lines[0].startswith("duplicates: 3 dropped (1 identical bytes, 2 near-duplicate")
    assert preprocess_main(["-d", "CAMUS", "--no-progress", "-j", "0"]) == 0
    again = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("duplicates:")]
    assert again == lines


# ----------------------------------------------------------------------------- permissions

def test_folders_built_atomically_get_normal_permissions_not_0700(tmp_path):
    """The raw dataset (and validation/, built the same way) was created by mkdtemp with mode
    0700, so colleagues sharing the folder could not read it."""
    import os

    old = os.umask(0o022)
    try:
        src = WRITERS["kvasir"](tmp_path / "dl")
        dest = convert_dataset("kvasir", src, "D", raw_root=tmp_path / "raw", progress=False)
    finally:
        os.umask(old)
    assert (dest.stat().st_mode & 0o777) == 0o755
