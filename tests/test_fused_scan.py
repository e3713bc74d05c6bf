"""Fused convert + fingerprint (issue 13 item 2): where medplan_convert must decode an image
(JPEG, ITK .mhd), it computes the fingerprint record and the arrays from those pixels, and the
fingerprint pass scans only the other cases. The results are those of convert, then plan."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medplan import casescan, pipeline
from medplan.datasets import convert_dataset, load_raw_index, synthetic, writer
from medplan.errors import MedplanError
from medplan.casescan import ConvertScan
from medplan.preprocessing import CaseArrays

SIZE = [24, 32]


def _env(monkeypatch, root: Path) -> Path:
    for var, sub in (("MEDPLAN_RAW", "raw"), ("MEDPLAN_PREPROCESSED", "preprocessed"), ("MEDPLAN_RESULTS", "results")):
        monkeypatch.setenv(var, str(root / sub))
    return root


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def _isic(folder: Path) -> Path:
    return synthetic.write_isic2018(folder, n=10, size=(40, 48), seed=2)


def _camus(folder: Path) -> Path:
    return synthetic.write_camus(folder, n_patients=5, size=(40, 32), seed=3)


def _mixed(folder: Path) -> Path:
    """A plain folder of JPEGs, two of them gray: the converter stores those as RGB afterwards."""
    rng = np.random.default_rng(5)
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for i in range(6):
        shape = (30, 36) if i in (1, 4) else (30, 36, 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / "images" / f"m{i}.jpg", quality=90)
        mask = np.zeros((30, 36), np.uint8)
        mask[4:20, 3 + i:25] = 255
        Image.fromarray(mask).save(folder / "masks" / f"m{i}.png")
    return folder


DOWNLOADS = {"isic2018": (_isic, 0), "camus": (_camus, 0), "folder": (_mixed, 2)}


def _count_scans(monkeypatch) -> list[str]:
    """Case ids the fingerprint pass decodes (in-process: num_workers=1)."""
    seen: list[str] = []
    scan = casescan.scan_file

    def counting(case_id, *args):
        seen.append(case_id)
        return scan(case_id, *args)

    monkeypatch.setattr(casescan, "scan_file", counting)
    return seen


def _fused(monkeypatch, root: Path, fmt: str) -> list[str]:
    """The download lies in $MEDPLAN_RAW/NAME: medplan_plan imports it and fingerprints it at once."""
    _env(monkeypatch, root)
    DOWNLOADS[fmt][0](root / "raw" / "DS")
    seen = _count_scans(monkeypatch)
    pipeline.plan("DS", overrides={"input_size": SIZE}, num_workers=1, progress=False)
    monkeypatch.undo()
    return seen


def _separate(monkeypatch, root: Path, fmt: str) -> list[str]:
    """medplan_convert, then medplan_plan: the fingerprint pass decodes every written PNG."""
    _env(monkeypatch, root)
    convert_dataset(fmt, DOWNLOADS[fmt][0](root / "download"), "DS", progress=False, workers=1)
    seen = _count_scans(monkeypatch)
    pipeline.plan("DS", overrides={"input_size": SIZE}, num_workers=1, progress=False)
    monkeypatch.undo()
    return seen


def _results(root: Path) -> tuple[dict, bytes, dict[str, bytes], dict[str, bytes]]:
    raw = root / "raw" / "DS"
    raw = raw / "medplan" if (raw / "medplan").is_dir() else raw
    pre = root / "preprocessed" / "DS"
    fp = json.loads((pre / "fingerprint.json").read_text())
    for key in ("created", "raw_signature"):  # a time stamp; mtimes and the download's path
        fp.pop(key)
    raw_files = {k: v for k, v in _files(raw).items() if k.startswith(("images/", "labels/"))}
    return fp, (pre / "duplicates.csv").read_bytes(), _files(pre / f"data_{SIZE[0]}x{SIZE[1]}"), raw_files


@pytest.mark.parametrize("fmt, pooled", [("isic2018", False), ("isic2018", True), ("camus", False),
                                         ("folder", False)])
def test_fused_import_gives_the_results_of_convert_then_plan(fmt, pooled, tmp_path, monkeypatch):
    if pooled:  # the converter's worker processes compute the records and hand them back
        monkeypatch.setattr(writer, "POOL_MIN_CASES", 1)
    fused_scans = _fused(monkeypatch, tmp_path / "fused", fmt)
    separate_scans = _separate(monkeypatch, tmp_path / "separate", fmt)
    fused, separate = _results(tmp_path / "fused"), _results(tmp_path / "separate")
    fp = fused[0]
    assert fp["num_cases"] == len(separate_scans) and fp["arrays"]["input_size"] == SIZE
    # only the cases the converter changed after computing a record (gray stored as RGB) are decoded again
    assert len(fused_scans) == DOWNLOADS[fmt][1]
    assert fused[0] == separate[0]  # fingerprint.json, but for the time stamp and raw signature
    assert fused[1] == separate[1]  # duplicates.csv
    assert fused[2] == separate[2] and len(fused[2]) == 3 * fp["num_kept"]  # the arrays, byte for byte
    assert fused[3] == separate[3]  # the raw files
    if fmt == "isic2018":
        assert fp["duplicates"]["n_dropped"] > 0  # planted duplicates found from the fused records too


def test_a_fused_import_decodes_each_image_once(tmp_path, monkeypatch):
    _env(monkeypatch, tmp_path)
    synthetic.write_isic2018(tmp_path / "raw" / "DS", n=8, size=(40, 48), seed=4, duplicates=False)
    calls = {"convert": 0, "fingerprint": 0}

    def counted(key, fn):
        def wrapper(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(writer, "read_image_keeping_png", counted("convert", writer.read_image_keeping_png))
    monkeypatch.setattr(casescan, "decode_image", counted("fingerprint", casescan.decode_image))
    pipeline.plan("DS", overrides={"input_size": SIZE}, num_workers=1, progress=False)
    fp = json.loads((tmp_path / "preprocessed" / "DS" / "fingerprint.json").read_text())
    assert fp["num_cases"] == 8 and fp["num_kept"] == 8
    assert calls == {"convert": 8, "fingerprint": 0}
    assert len(list((tmp_path / "preprocessed" / "DS" / f"data_{SIZE[0]}x{SIZE[1]}").glob("*.json"))) == 8


def test_records_equal_the_fingerprint_pass_and_serve_only_their_dataset(tmp_path, medplan_env):
    out = tmp_path / "pre"
    arrays = CaseArrays.at(out, SIZE)
    scan = ConvertScan(out, arrays=arrays)
    try:
        dest = convert_dataset("camus", _camus(tmp_path / "dl"), "C", progress=False, scan=scan)
        raw = load_raw_index(dest)
        opt = {"channels": raw.channels, "n_classes": len(raw.labels), "hash_name": casescan.DEFAULT_HASH,
               "hash_size": casescan.DEFAULT_HASH_SIZE, "arrays": None}
        records, hists = scan.records_for(raw, {**opt, "arrays": arrays})
        assert sorted(records) == sorted(raw.case_ids)
        for case_id, (row, record) in records.items():
            expected = casescan.scan_file(case_id, raw.image_paths[case_id], raw.label_paths[case_id], opt)
            assert np.array_equal(hists[row], expected.pop("hist"))
            got = dict(record, array_channels=None)
            assert got.keys() == expected.keys()
            for key, value in expected.items():
                assert np.array_equal(got[key], value), key
        del hists
        victim = raw.case_ids[0]  # a raw file changed after the convert: that case is scanned again
        os.utime(raw.label_paths[victim], ns=(1, 1))
        records, hists = scan.records_for(raw, {**opt, "arrays": arrays})
        assert sorted(records) == sorted(set(raw.case_ids) - {victim})
        del hists
        # other options, another input size or another folder: the fingerprint pass scans everything
        assert scan.records_for(raw, {**opt, "arrays": arrays, "hash_size": 16})[0] == {}
        assert scan.records_for(raw, {**opt, "arrays": CaseArrays.at(out, [16, 16])})[0] == {}
        assert scan.records_for(raw, opt)[0] == {}
        copy = convert_dataset("camus", tmp_path / "dl" / "CAMUS_2019", "D", progress=False)
        assert scan.records_for(load_raw_index(copy), {**opt, "arrays": arrays})[0] == {}
    finally:
        scan.close()
    unfinished = ConvertScan(out, arrays=arrays)  # a convert that never completed gives nothing
    unfinished.add("x", {"case_id": "x", "hist": np.zeros((4, 256), np.uint32), "channels": 1,
                         "label_counts": np.zeros(len(raw.labels))})
    assert unfinished.records_for(raw, {**opt, "arrays": arrays})[0] == {}
    unfinished.close()


def test_a_failed_fused_import_is_one_line_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    _env(monkeypatch, tmp_path)
    src = synthetic.write_isic2018(tmp_path / "raw" / "DS", n=8, size=(40, 48), seed=4, duplicates=False)
    victim = sorted(src.rglob("*.jpg"))[5]
    victim.write_bytes(victim.read_bytes()[:40])  # a truncated download
    with pytest.raises(MedplanError) as err:
        pipeline.plan("DS", overrides={"input_size": SIZE}, num_workers=1, progress=False)
    assert victim.name in str(err.value) and len(str(err.value).splitlines()) == 1
    assert not (tmp_path / "raw" / "DS" / "medplan").exists()
    pre = tmp_path / "preprocessed" / "DS"
    assert not (pre / "fingerprint.json").exists()
    assert not [p for p in pre.rglob(".*")]  # no temporary array or histogram files
    with pytest.raises(MedplanError, match="unknown perceptual hash"):  # refused before converting
        pipeline.plan("DS", hash_name="nohash", num_workers=1, progress=False)
