"""Importers: official layouts (written by medplan.datasets.synthetic) -> medplan raw format."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from medplan.cli.convert import main as convert_main
from medplan.datasets import FORMATS, convert_dataset, detect_format, resolve_raw_dataset, synthetic
from medplan.datasets import writer
from medplan.errors import MedplanError

SMALL = (64, 48)


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


def _rows(dest: Path) -> list[dict[str, str]]:
    with open(dest / "cases.csv", newline="") as f:
        return list(csv.DictReader(f))


def _agreement(dest: Path, truth: dict[str, np.ndarray]) -> list[float]:
    return [float((_png(dest / "labels" / f"{cid}.png") == label).mean()) for cid, label in truth.items()]


@pytest.fixture(scope="module")
def camus(tmp_path_factory):
    root = tmp_path_factory.mktemp("camus")
    return (synthetic.write_camus(root, n_patients=2, layout="2019", size=SMALL, seed=3),
            synthetic.write_camus(root, n_patients=2, layout="2023", size=SMALL, seed=3))


def test_camus_both_layouts_convert_exactly_and_identically(camus, medplan_env):
    old, new = camus
    d19 = convert_dataset("camus", old, "C19", progress=False)
    d23 = convert_dataset("camus", new, "C23", progress=False)
    labels, images = synthetic.truth_labels(old), synthetic.truth_images(old)
    assert len(labels) == 2 * 4 + 3  # 2 patients x 2 views x ED/ES + 3 planted duplicates
    for cid in labels:
        for dest in (d19, d23):
            assert np.array_equal(_png(dest / "labels" / f"{cid}.png"), labels[cid])
            assert np.array_equal(_png(dest / "images" / f"{cid}.png"), images[cid])
            assert _png(dest / "images" / f"{cid}.png").shape == SMALL  # rows = depth, probe on top
    info19, info23 = (json.loads((d / "dataset.json").read_text()) for d in (d19, d23))
    assert info19["source_format"] == "camus-2019" and info23["source_format"] == "camus-2023"
    assert info19["labels"] == {"background": 0, "LV": 1, "LV wall": 2, "LA": 3}
    assert info19["channels"] == 1 and info19["group_column"] == "group" and info19["num_cases"] == len(labels)
    assert any("testing" in note for note in info19["notes"])  # testing/ has no gt: skipped, and said so
    rows = _rows(d19)
    assert list(rows[0])[:4] == ["case_id", "group", "source_image", "source_label"]
    row = next(r for r in rows if r["case_id"] == "patient0002_4CH_ES")
    assert row["group"] == "patient0002" and row["view"] == "4CH" and row["frame"] == "ES"
    assert row["image_quality"] in ("Good", "Medium", "Poor") and row["age"] and row["lv_ef"]
    assert row["source_label"] == "training/patient0002/patient0002_4CH_ES_gt.mhd"
    assert {r["case_id"] for r in _rows(d23)} == {r["case_id"] for r in rows}


def test_camus_files_are_oriented_like_the_official_releases(camus):
    old, new = camus
    header = (old / "training" / "patient0001" / "patient0001_2CH_ED.mhd").read_text()
    assert f"DimSize = {SMALL[1]} {SMALL[0]} 1" in header  # x = width, y = depth, one slice
    img = sitk.ReadImage(str(new / "database_nifti" / "patient0001" / "patient0001_2CH_ED.nii.gz"))
    assert img.GetSize() == (SMALL[1], SMALL[0])  # nibabel would index this (x, y): "transposed"


def test_isic_pools_splits_maps_255_and_follows_nested_folders(tmp_path, medplan_env):
    src = synthetic.write_isic2018(tmp_path, n=8, size=(40, 56), nested=True, test_ground_truth=False)
    dest = convert_dataset("isic2018", src, progress=False)
    assert dest.name == "ISIC2018"
    truth = synthetic.truth_labels(src)
    rows = _rows(dest)
    assert {r["case_id"] for r in rows} == set(truth)  # training + validation + duplicates, not test
    assert {r["split"] for r in rows} == {"training", "validation"}
    assert all(r["group"] == r["case_id"] for r in rows)
    for cid, label in truth.items():
        assert np.array_equal(_png(dest / "labels" / f"{cid}.png"), label)
    info = json.loads((dest / "dataset.json").read_text())
    assert info["labels"] == {"background": 0, "lesion": 1} and info["channels"] == 3
    assert info["group_column"] is None
    assert any("Test" in note for note in info["notes"])


def test_neopolyp_colour_jpeg_masks_decode_robustly(tmp_path, medplan_env):
    src = synthetic.write_neopolyp(tmp_path, n=8, size=(96, 112), mask_quality=75)
    dest = convert_dataset("neopolyp", src, progress=False)
    truth = synthetic.truth_labels(src)
    assert min(_agreement(dest, truth)) >= 0.99
    classes = set()
    for cid in truth:
        classes |= set(np.unique(_png(dest / "labels" / f"{cid}.png")).tolist())
    assert classes == {0, 1, 2}


def test_kvasir_jpeg_masks_threshold(tmp_path, medplan_env):
    src = synthetic.write_kvasir(tmp_path, n=6, size=(80, 96))
    dest = convert_dataset("kvasir", src, "KV", progress=False)
    assert min(_agreement(dest, synthetic.truth_labels(src))) >= 0.99


def test_busi_merges_masks_and_keeps_diagnosis(tmp_path, medplan_env):
    src = synthetic.write_busi(tmp_path, n=6, size=(48, 64))
    dest = convert_dataset("busi", src, progress=False)
    truth = synthetic.truth_labels(src)
    assert (src / "benign" / "benign (1)_mask_1.png").is_file()  # a two-lesion case exists
    for cid, label in truth.items():
        assert np.array_equal(_png(dest / "labels" / f"{cid}.png"), label)
    row = next(r for r in _rows(dest) if r["case_id"] == "benign_1")
    assert row["diagnosis"] == "benign" and row["source_label"].count(";") == 1
    assert np.count_nonzero(truth["benign_1"]) > np.count_nonzero(_png(src / "benign" / "benign (1)_mask.png"))


def test_cvc_tif(tmp_path, medplan_env):
    src = synthetic.write_cvc(tmp_path, n=3, size=(40, 48))
    dest = convert_dataset("cvc", src, progress=False)
    for cid, label in synthetic.truth_labels(src).items():
        assert np.array_equal(_png(dest / "labels" / f"{cid}.png"), label)


def _folder(tmp_path: Path, values: list[int]) -> Path:
    src = tmp_path / "plain"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 24), dtype=np.uint8)).save(src / "images" / f"img{i}.png")
        mask = np.zeros((20, 24), np.uint8)
        for k, v in enumerate(values):
            mask[k * 4:(k + 1) * 4] = v
        Image.fromarray(mask).save(src / "masks" / f"img{i}_mask.png")
    return src


def test_folder_map_and_defaults(tmp_path, medplan_env):
    src = _folder(tmp_path, [0, 100, 200])
    dest = convert_dataset("folder", src, "F", value_map="0:0,100:1,200:2", progress=False)
    assert np.unique(_png(dest / "labels" / "img0.png")).tolist() == [0, 1, 2]
    assert json.loads((dest / "dataset.json").read_text())["labels"] == {"background": 0, "class_1": 1, "class_2": 2}
    binary = convert_dataset("folder", _folder(tmp_path / "b", [0, 255]), "B", progress=False)
    assert np.unique(_png(binary / "labels" / "img0.png")).tolist() == [0, 1]
    indices = convert_dataset("folder", _folder(tmp_path / "c", [0, 1, 2, 3]), "C", progress=False)
    assert json.loads((indices / "dataset.json").read_text())["labels"]["class_3"] == 3
    with pytest.raises(MedplanError, match="outside the declared classes"):
        convert_dataset("folder", src, "G", value_map="0:0,100:1", progress=False)
    with pytest.raises(MedplanError, match="-d NAME"):
        convert_dataset("folder", src, progress=False)


def test_detect_format(tmp_path, camus):
    assert detect_format(camus[0]) == "camus" and detect_format(camus[1]) == "camus"
    assert detect_format(camus[1].parent) == "camus"  # one level above CAMUS_public
    assert detect_format(synthetic.write_isic2018(tmp_path, n=3, size=(32, 32), duplicates=False)) == "isic2018"
    assert detect_format(synthetic.write_neopolyp(tmp_path, n=1, size=(32, 32), duplicates=False)) == "neopolyp"
    assert detect_format(synthetic.write_kvasir(tmp_path, n=1, size=(32, 32), duplicates=False)) == "kvasir"
    assert detect_format(synthetic.write_busi(tmp_path, n=2, size=(32, 32))) == "busi"
    assert detect_format(synthetic.write_cvc(tmp_path, n=1, size=(32, 32))) == "cvc"
    (tmp_path / "empty").mkdir()
    assert detect_format(tmp_path / "empty") is None
    assert set(FORMATS) == {"camus", "isic2018", "neopolyp", "kvasir", "cvc", "busi", "nnunet", "folder"}


# ----------------------------------------------------------------------------- bad input


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _resize(path: Path) -> Path:
    with Image.open(path) as img:
        img.load()
        img.resize((img.width + 3, img.height)).save(path, format="JPEG")
    return path


def _remove(path: Path) -> Path:
    path.unlink()
    return path


BAD_KVASIR = {
    "truncated image": (lambda s: _truncate(next((s / "images").glob("*.jpg"))), "cannot read image"),
    "label size": (lambda s: _resize(next((s / "masks").glob("*.jpg"))), "differs from image size"),
    "missing label": (lambda s: _remove(next((s / "masks").glob("*.jpg"))), "missing label"),
}


@pytest.mark.parametrize("kind", list(BAD_KVASIR))
def test_bad_input_names_the_file_and_keeps_the_earlier_import(kind, tmp_path, medplan_env):
    good = synthetic.write_kvasir(tmp_path / "good", n=3, size=(40, 48), duplicates=False)
    dest = convert_dataset("kvasir", good, "KV", progress=False)
    before = {p.name: p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    bad = synthetic.write_kvasir(tmp_path / "bad", n=3, size=(40, 48), duplicates=False, seed=1)
    damage, reason = BAD_KVASIR[kind]
    culprit = damage(bad)
    with pytest.raises(MedplanError, match=reason) as err:
        convert_dataset("kvasir", bad, "KV", progress=False, force=True)
    named = Path(err.value.path) if err.value.path else None
    assert named is not None and (named.name == culprit.name or named.stem == culprit.stem)
    after = {p.name: p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert after == before
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_label_value_outside_classes(tmp_path, medplan_env):
    src = synthetic.write_camus(tmp_path, n_patients=1, layout="2023", size=(40, 32), duplicates=False)
    gt = src / "database_nifti" / "patient0001" / "patient0001_4CH_ES_gt.nii.gz"
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(gt)))
    array[0, 0] = 5
    sitk.WriteImage(sitk.GetImageFromArray(array), str(gt))
    with pytest.raises(MedplanError, match=r"label values 5 outside the declared classes 0\.\.3") as err:
        convert_dataset("camus", src, progress=False)
    assert err.value.path == str(gt)


def test_empty_unknown_and_existing(tmp_path, medplan_env):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MedplanError, match="no CAMUS layout"):
        convert_dataset("camus", tmp_path / "empty", progress=False)
    with pytest.raises(MedplanError, match="unknown format 'nope'"):
        convert_dataset("nope", tmp_path / "empty", progress=False)
    with pytest.raises(MedplanError, match="no known download layout"):
        convert_dataset("auto", tmp_path / "empty", progress=False)
    with pytest.raises(MedplanError, match="source folder not found"):
        convert_dataset("camus", tmp_path / "missing", progress=False)
    src = synthetic.write_busi(tmp_path, n=3, size=(32, 32))
    convert_dataset("busi", src, progress=False)
    with pytest.raises(MedplanError, match="already exists; use --force"):
        convert_dataset("busi", src, progress=False)


def test_cli_summary_and_one_line_errors(tmp_path, medplan_env, capsys):
    src = synthetic.write_busi(tmp_path, n=3, size=(32, 32))
    assert convert_main(["busi", str(src), "-d", "B", "--no-progress"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "B: 3 cases, 2 classes" in out[0] and str(medplan_env / "raw" / "B") in out[0]
    _truncate(src / "malignant" / "malignant (1).png")
    assert convert_main(["busi", str(src), "-d", "B", "--force", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "malignant (1).png" in err[0] and "Traceback" not in err[0]
    assert convert_main(["unknown", str(src)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


# ----------------------------------------------------------------------------- auto-import


def test_resolve_raw_dataset_imports_an_official_layout(medplan_env, capsys):
    raw = medplan_env / "raw"
    synthetic.write_camus(raw / "CAMUS", n_patients=1, layout="2023", size=(40, 32), duplicates=False)
    download = {p: p.stat().st_mtime_ns for p in (raw / "CAMUS").rglob("*")}
    folder = resolve_raw_dataset("CAMUS")
    assert folder == raw / "CAMUS" / "medplan" and (folder / "dataset.json").is_file()
    assert "importing" in capsys.readouterr().out
    assert json.loads((folder / "dataset.json").read_text())["num_cases"] == 4
    assert {p: p.stat().st_mtime_ns for p in download} == download  # the download is untouched
    assert resolve_raw_dataset("CAMUS") == folder and capsys.readouterr().out == ""  # imported once
    with pytest.raises(MedplanError, match=r"dataset 'NOPE' not found in \$MEDPLAN_RAW.*CAMUS.*medplan_convert"):
        resolve_raw_dataset("NOPE")


def test_converting_a_download_inside_raw_writes_beside_it(medplan_env):
    raw = medplan_env / "raw"
    src = synthetic.write_busi(raw / "BUSI", n=3, size=(32, 32))
    dest = convert_dataset("busi", src, "BUSI", progress=False)
    assert dest == raw / "BUSI" / "medplan" and src.is_dir()
    assert resolve_raw_dataset("BUSI") == dest


def test_process_pool_gives_the_same_result(tmp_path, medplan_env, monkeypatch):
    src = synthetic.write_kvasir(tmp_path, n=4, size=(40, 48), duplicates=False)
    serial = convert_dataset("kvasir", src, "S", progress=False, workers=1)
    monkeypatch.setattr(writer, "POOL_MIN_CASES", 1)
    pooled = convert_dataset("kvasir", src, "P", progress=False, workers=2)
    for p in sorted((serial / "labels").glob("*.png")) + sorted((serial / "images").glob("*.png")):
        assert p.read_bytes() == (pooled / p.parent.name / p.name).read_bytes()
    assert (serial / "cases.csv").read_text() == (pooled / "cases.csv").read_text()


def test_folder_palette_masks_keep_their_indices(tmp_path, medplan_env):
    src = _folder(tmp_path, [0, 1, 2])
    for mask in (src / "masks").glob("*.png"):
        with Image.open(mask) as img:
            pal = img.convert("P")
            pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
            pal.save(mask)
    dest = convert_dataset("folder", src, "PAL", progress=False)
    assert np.unique(_png(dest / "labels" / "img0.png")).tolist() == [0, 1, 2]


def _png16_rgb(array: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (Pillow opens it as 8-bit mode "RGB" but cannot write one)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    h, w, _ = array.shape
    rows = b"".join(b"\0" + array[y].astype(">u2").tobytes() for y in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_plain_png_images_are_copied_byte_for_byte(tmp_path, medplan_env):
    src = tmp_path / "pngs"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    rng = np.random.default_rng(0)
    shape = (20, 24)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(src / "images" / f"rgb{i}.png")
    Image.fromarray(rng.integers(0, 256, (*shape, 4), dtype=np.uint8)).save(src / "images" / "rgba.png")
    wide = rng.integers(0, 65536, (*shape, 3), dtype=np.uint16)
    (src / "images" / "rgb16.png").write_bytes(_png16_rgb(wide))
    for image in (src / "images").glob("*.png"):
        mask = np.zeros(shape, np.uint8)
        mask[4:12, 6:18] = 255
        Image.fromarray(mask).save(src / "masks" / image.name)
    dest = convert_dataset("folder", src, "PNGS", progress=False)
    for i in range(4):
        source, raw = src / "images" / f"rgb{i}.png", dest / "images" / f"rgb{i}.png"
        assert raw.read_bytes() == source.read_bytes()
        assert np.array_equal(_png(raw), _png(source)) and _png(raw).shape == (*shape, 3)
    # not plain 8-bit RGB: converted (alpha dropped; 16 bits read as their high byte) and re-encoded
    rgba = dest / "images" / "rgba.png"
    assert rgba.read_bytes() != (src / "images" / "rgba.png").read_bytes()
    assert np.array_equal(_png(rgba), _png(src / "images" / "rgba.png")[..., :3])
    rgb16 = dest / "images" / "rgb16.png"
    assert rgb16.read_bytes() != (src / "images" / "rgb16.png").read_bytes()
    with Image.open(rgb16) as img:
        assert img.mode == "RGB" and img.tile[0][3] == "RGB"  # stored with 8 bits per value
    assert np.array_equal(_png(rgb16), (wide >> 8).astype(np.uint8))
    for image in (src / "images").glob("*.png"):  # labels still decoded (255 -> 1) and re-encoded
        assert np.unique(_png(dest / "labels" / image.name)).tolist() == [0, 1]
