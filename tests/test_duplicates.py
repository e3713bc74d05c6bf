"""Planted duplicates are found with the right reason; distinct images are kept."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from medplan.duplicates import (DEFAULT_THRESHOLD, Duplicate, find_duplicates, hamming, hamming_pairs,
                                pack_hashes, perceptual_hash, read_duplicates_csv)
from medplan.errors import MedplanError
from medplan.fingerprint import fingerprint_dataset
from medplan.preprocessing import CaseArrays
from test_fingerprint import blob_label, jpeg_roundtrip, png_with, structured_image, write_raw


def _brighten(a: np.ndarray, k: int) -> np.ndarray:
    return np.clip(a.astype(np.int16) + k, 0, 255).astype(np.uint8)


def test_hamming_pairs_match_brute_force():
    rng = np.random.default_rng(0)
    bits = rng.random((70, 100)) < 0.5  # 100 bits: two 64-bit words, the second padded
    bits[5] = bits[3]
    bits[9] = bits[3] ^ (np.arange(100) < 3)
    packed = pack_hashes([np.packbits(b).tobytes() for b in bits])
    assert packed.shape == (70, 2) and packed.dtype == np.uint64
    full = (bits[:, None, :] != bits[None, :, :]).sum(-1)
    for threshold in (3, 40):
        i, j, d = hamming_pairs(packed, threshold, max_block_elements=64)  # forces many blocks
        iu, ju = np.triu_indices(70, 1)
        expect = full[iu, ju] <= threshold
        assert sorted(zip(i.tolist(), j.tolist())) == sorted(zip(iu[expect].tolist(), ju[expect].tolist()))
        assert d.tolist() == full[i, j].tolist()
    assert hamming(np.packbits(bits[3]).tobytes(), np.packbits(bits[9]).tobytes()) == 3


def test_planted_copies_found_and_distinct_images_kept():
    """Re-encoded and brightened copies stay within the default threshold; distinct images do not."""
    rng = np.random.default_rng(1)
    originals = [structured_image(rng, 64, 80, rgb=bool(i % 2)) for i in range(60)]
    hashes = [perceptual_hash(a) for a in originals]
    packed = pack_hashes(hashes)
    i, j, d = hamming_pairs(packed, 64)
    assert d.min() > 2 * DEFAULT_THRESHOLD  # a wide margin between distinct images and the threshold
    for a, h in zip(originals[:30], hashes):
        for copy in (jpeg_roundtrip(a, 75), jpeg_roundtrip(a, 90), _brighten(a, 5), _brighten(a, 10),
                     jpeg_roundtrip(_brighten(a, 8), 85)):
            assert hamming(perceptual_hash(copy), h) <= DEFAULT_THRESHOLD


def test_find_duplicates_groups_and_keeps_first_sorted():
    h = [bytes([0] * 8), bytes([0] * 7 + [1]), bytes([255] * 8), bytes([0] * 7 + [3]), bytes([15] * 8)]
    ids = ["e", "b", "c", "a", "d"]
    dups = find_duplicates(ids, ["x", "y", "z", "w", "x"], ["p", "q", "r", "s", "t"], h, threshold=1)
    # e~b (1 bit), b~a (1 bit) -> one group {a, b, e} by chaining; d has e's bytes -> joins it too
    assert dups == [Duplicate("b", "a", "phash", 1), Duplicate("d", "a", "phash", hamming(h[4], h[3])),
                    Duplicate("e", "a", "phash", 2)]
    assert find_duplicates(["a"], ["x"], ["p"], [h[0]]) == []
    dups = find_duplicates(["k", "j"], ["x", "x"], ["p", "p"], [h[0], h[2]], threshold=0)
    assert dups == [Duplicate("k", "j", "identical_bytes", 0)]


def test_fingerprint_finds_planted_duplicates_and_writes_csv(tmp_path):
    rng = np.random.default_rng(2)
    images = {f"img{i:02d}": structured_image(rng, 48, 64, rgb=True) for i in range(10)}
    labels = {c: blob_label(rng, 48, 64, 2) for c in images}
    base = images["img03"]
    images["z_bytes"] = base.copy()                       # same file bytes
    images["z_pixels"] = base.copy()                      # same pixels, other PNG compression
    images["z_jpeg"] = jpeg_roundtrip(images["img05"], 80)
    images["z_bright"] = _brighten(images["img07"], 8)
    for c in ("z_bytes", "z_pixels", "z_jpeg", "z_bright"):
        labels[c] = blob_label(rng, 48, 64, 2)
    groups = {c: f"p{i}" for i, c in enumerate(images)}  # copies under other patients: still dropped
    raw = write_raw(tmp_path / "raw", images, labels, groups=groups,
                    image_bytes={"img03": png_with(base, compress_level=6), "z_bytes": png_with(base, compress_level=6),
                                 "z_pixels": png_with(base, compress_level=1)})
    assert (raw / "images" / "z_pixels.png").read_bytes() != (raw / "images" / "img03.png").read_bytes()
    fp = fingerprint_dataset(raw, tmp_path / "pre", arrays=CaseArrays.at(tmp_path / "pre", (16, 16)),
                             num_workers=0, progress=False)

    dup = fp["duplicates"]
    assert dup["dropped"] == ["z_bright", "z_bytes", "z_jpeg", "z_pixels"]
    assert dup["by_reason"] == {"identical_bytes": 1, "identical_pixels": 1, "phash": 2}
    assert dup["hash"] == "phash" and dup["hash_size"] == 8 and dup["threshold"] == DEFAULT_THRESHOLD
    assert fp["num_cases"] == 14 and fp["num_kept"] == 10
    with open(tmp_path / "pre" / "duplicates.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["case_id"] for r in rows] == dup["dropped"]
    by_case = {r["case_id"]: (r["kept_case_id"], r["reason"]) for r in rows}
    assert by_case == {"z_bright": ("img07", "phash"), "z_bytes": ("img03", "identical_bytes"),
                       "z_jpeg": ("img05", "phash"), "z_pixels": ("img03", "identical_pixels")}
    assert all(int(r["distance"]) <= DEFAULT_THRESHOLD for r in rows)
    assert {d.case_id for d in read_duplicates_csv(tmp_path / "pre" / "duplicates.csv")} == set(dup["dropped"])
    # the statistics cover kept cases only, and no arrays are left for dropped ones
    kept = np.concatenate([images[c].reshape(-1, 3) for c in images if not c.startswith("z_")])
    np.testing.assert_allclose(fp["intensity"]["mean"], kept.mean(0), rtol=1e-12)
    assert not list((tmp_path / "pre" / "data_16x16").glob("z_*"))
    assert len(list((tmp_path / "pre" / "data_16x16").glob("*.json"))) == 10

    # the threshold is an option; exact copies are found by bytes/pixels whatever it is
    fp0 = fingerprint_dataset(raw, tmp_path / "pre0", threshold=0, num_workers=0, progress=False)
    assert set(fp0["duplicates"]["dropped"]) >= {"z_bytes", "z_pixels"}
    assert fp0["duplicates"]["threshold"] == 0


def test_no_duplicates_gives_header_only_csv_and_bad_options_fail(tmp_path):
    rng = np.random.default_rng(3)
    images = {f"c{i}": structured_image(rng, 32, 32) for i in range(4)}
    raw = write_raw(tmp_path / "raw", images, {c: np.zeros((32, 32), np.uint8) for c in images})
    fp = fingerprint_dataset(raw, tmp_path / "pre", hash_name="dhash", num_workers=0,
                             progress=False)
    assert fp["duplicates"]["n_dropped"] == 0 and fp["duplicates"]["hash"] == "dhash"
    assert (tmp_path / "pre" / "duplicates.csv").read_text() == "case_id,kept_case_id,reason,distance,decision\n"
    with pytest.raises(MedplanError, match="unknown perceptual hash 'md5'"):
        fingerprint_dataset(raw, tmp_path / "pre", hash_name="md5", progress=False)
    with pytest.raises(MedplanError, match="threshold must be in 0..64"):
        fingerprint_dataset(raw, tmp_path / "pre", threshold=65, progress=False)
