"""Arrays: shapes, resampling, channel conversion, normalization, idempotent and atomic reruns."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image

from medplan.errors import MedplanError
from medplan.fingerprint import fingerprint_dataset
from medplan.plan import Normalization, make_plan
from medplan.preprocessing import (CaseArrays, data_dir, load_case, normalize, plan_key, prepare_image, prepare_label,
                                   preprocess_dataset, write_case)
from test_fingerprint import blob_label, structured_image, write_raw


def test_prepare_image_shapes_channels_and_antialiasing():
    rng = np.random.default_rng(0)
    rgb = structured_image(rng, 60, 80, rgb=True)
    out = prepare_image(rgb, (30, 40), 3)
    assert out.shape == (3, 30, 40) and out.dtype == np.uint8
    gray = prepare_image(rgb, (30, 40), 1)
    assert gray.shape == (1, 30, 40)
    expect = np.asarray(Image.fromarray(rgb).convert("L").resize((40, 30), Image.BILINEAR))
    np.testing.assert_array_equal(gray[0], expect)
    g3 = prepare_image(rgb[:, :, 0], (30, 40), 3)
    assert g3.shape == (3, 30, 40) and np.array_equal(g3[0], g3[1]) and np.array_equal(g3[1], g3[2])
    # a one-pixel checkerboard shrunk 4x averages to mid-gray instead of aliasing to black/white
    checker = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)
    small = prepare_image(checker, (16, 16), 1)
    assert np.all(np.abs(small.astype(int) - 127) <= 2)
    assert prepare_image(checker, (64, 64), 1)[0].tolist() == checker.tolist()  # same size: untouched


def test_prepare_label_nearest_keeps_values():
    rng = np.random.default_rng(1)
    lab = rng.choice(np.array([0, 2, 5], np.uint8), size=(50, 70))
    for size in ((17, 23), (120, 90)):
        out = prepare_label(lab, size)
        assert out.shape == size and out.dtype == np.uint8
        assert set(np.unique(out)) <= {0, 2, 5}
    big = np.zeros((40, 40), np.uint8)
    big[:20] = 1
    assert prepare_label(big, (10, 10))[:5].min() == 1 and prepare_label(big, (10, 10))[5:].max() == 0


def test_normalize_numpy_and_torch_match_hand_computation():
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (2, 3, 4, 5)).astype(np.float32)
    norm = make_plan(channels=3, normalization={"mean": [10.0, 100.0, 200.0], "std": [2.0, 50.0, 25.0]}).normalization
    expect = np.stack([(x[:, c] - m) / s for c, (m, s) in enumerate([(10, 2), (100, 50), (200, 25)])], axis=1)
    out = normalize(x, norm)
    assert out.dtype == np.float32 and out.shape == x.shape
    np.testing.assert_allclose(out, expect, rtol=1e-6)
    np.testing.assert_allclose(normalize(x[0], norm), expect[0], rtol=1e-6)
    t = normalize(torch.from_numpy(x), norm)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    np.testing.assert_allclose(t.numpy(), expect, rtol=1e-6)
    u8 = torch.from_numpy(x.astype(np.uint8))
    minmax = Normalization.from_json({"scheme": "minmax"})
    np.testing.assert_allclose(normalize(u8, minmax).numpy(), x / 255.0, rtol=1e-6)
    with pytest.raises(MedplanError, match="1 channel"):
        normalize(x[:, :1], norm)


def test_write_and_load_case_record_original_size(tmp_path):
    rng = np.random.default_rng(3)
    img = structured_image(rng, 45, 61, rgb=True)
    lab = blob_label(rng, 45, 61, 3)
    write_case(tmp_path / "d", "c1", img, lab, (32, 32), 3)
    image, seg, props = load_case(tmp_path / "d", "c1")
    assert isinstance(image, np.memmap) and image.shape == (3, 32, 32) and image.dtype == np.uint8
    assert seg.shape == (32, 32) and seg.dtype == np.uint8 and set(np.unique(seg)) <= {0, 1, 2}
    assert props == {"case_id": "c1", "original_size": [45, 61], "channels": 3, "plan_key": plan_key((32, 32), 3)}
    assert plan_key((32, 32), 3) != plan_key((32, 32), 1) != plan_key((64, 32), 1)
    assert data_dir(tmp_path, (32, 48)) == tmp_path / "data_32x48"
    with pytest.raises(MedplanError, match="not preprocessed"):
        load_case(tmp_path / "d", "missing")


def _raw(tmp_path, n=5, rgb=False):
    rng = np.random.default_rng(4)
    images = {f"c{i}": structured_image(rng, 30 + i, 40, rgb=rgb) for i in range(n)}
    labels = {c: blob_label(rng, im.shape[0], im.shape[1], 2) for c, im in images.items()}
    return write_raw(tmp_path / "raw", images, labels), images


def _mtimes(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_preprocess_dataset_idempotent_recovers_and_excludes(tmp_path):
    raw, images = _raw(tmp_path)
    plan = make_plan(input_size=[24, 20], channels=1, excluded_cases=["c3"])
    ddir = preprocess_dataset(raw, tmp_path / "pre", plan, num_workers=0, progress=False)
    assert ddir == tmp_path / "pre" / "data_24x20"
    assert sorted(p.name for p in ddir.glob("*.json")) == ["c0.json", "c1.json", "c2.json", "c4.json"]
    image, seg, props = load_case(ddir, "c4", mmap=False)
    assert image.shape == (1, 24, 20) and props["original_size"] == [34, 40]
    np.testing.assert_array_equal(image, prepare_image(images["c4"], (24, 20), 1))

    before = _mtimes(ddir)
    time.sleep(0.01)
    preprocess_dataset(raw, tmp_path / "pre", plan, num_workers=0, progress=False)
    assert _mtimes(ddir) == before  # nothing rewritten

    # a kill mid-case: c0 lost its .json, c1 has only a half-written temp file and no .json,
    # and c3 (excluded) has stale arrays
    (ddir / "c0.json").unlink()
    (ddir / "c1.json").unlink()
    (ddir / "c1_seg.npy").unlink()
    (ddir / ".c1.npy.1234abcd.tmp").write_bytes(b"half")
    write_case(ddir, "c3", images["c3"], np.zeros((33, 40), np.uint8), (24, 20), 1)
    preprocess_dataset(raw, tmp_path / "pre", plan, num_workers=2, progress=False)
    after = _mtimes(ddir)
    assert sorted(after) == sorted(f"{c}{s}" for c in ("c0", "c1", "c2", "c4") for s in (".json", ".npy", "_seg.npy"))
    assert after["c2.npy"] == before["c2.npy"] and after["c0.npy"] != before["c0.npy"]
    assert load_case(ddir, "c1")[1].shape == (24, 20)

    # another channel count changes the plan key: every case is redone
    preprocess_dataset(raw, tmp_path / "pre", make_plan(input_size=[24, 20], channels=3, excluded_cases=["c3"]),
                       num_workers=0, progress=False)
    assert load_case(ddir, "c2")[0].shape == (3, 24, 20)


def test_fingerprint_pass_leaves_nothing_for_preprocess(tmp_path):
    raw, _ = _raw(tmp_path, rgb=False)
    fp = fingerprint_dataset(raw, tmp_path / "pre", arrays=CaseArrays.at(tmp_path / "pre", (16, 16)),
                             num_workers=0, progress=False)
    ddir = data_dir(tmp_path / "pre", (16, 16))
    before = _mtimes(ddir)
    plan = make_plan(input_size=[16, 16], channels=1, excluded_cases=fp["duplicates"]["dropped"])
    preprocess_dataset(raw, tmp_path / "pre", plan, num_workers=0, progress=False)
    assert _mtimes(ddir) == before and len(before) == 15


def test_preprocess_bad_input_names_the_file(tmp_path):
    raw, _ = _raw(tmp_path)
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(raw / "labels" / "c2.png")
    with pytest.raises(MedplanError, match=r"labels/c2\.png.*label size \[5, 5\] != image size"):
        preprocess_dataset(raw, tmp_path / "pre", make_plan(input_size=[8, 8]), num_workers=0, progress=False)
    with pytest.raises(MedplanError, match="'input_size' must be"):  # checked with the plan (medplan.plan)
        make_plan(input_size=[8])
    with pytest.raises(MedplanError, match=r"cases\.csv.*excludes cases that are not in the raw dataset: nope"):
        preprocess_dataset(raw, tmp_path / "pre", make_plan(input_size=[8, 8], excluded_cases=["nope"]),
                           progress=False)
    ddir = tmp_path / "pre" / "data_8x8"
    assert (ddir / "c0.json").is_file() and not (ddir / "c2.json").exists()  # the bad case is never marked done


def test_gray_case_in_colour_set_is_redone_with_three_channels(tmp_path):
    """The fingerprint pass guesses 1 channel for a gray-looking image; preprocess fixes it for an RGB plan."""
    rng = np.random.default_rng(5)
    images = {f"c{i}": structured_image(rng, 30, 40, rgb=True) for i in range(3)}
    images["c1"] = np.repeat(images["c1"][:, :, :1], 3, axis=2)  # R = G = B
    raw = write_raw(tmp_path / "raw", images, {c: blob_label(rng, 30, 40, 2) for c in images})
    fp = fingerprint_dataset(raw, tmp_path / "pre", arrays=CaseArrays.at(tmp_path / "pre", (16, 16)),
                             num_workers=0, progress=False)
    assert fp["rgb_is_gray"] is False and fp["arrays"]["channels_by_case"] == {"1": 1, "3": 2}
    ddir = data_dir(tmp_path / "pre", (16, 16))
    assert load_case(ddir, "c1")[0].shape == (1, 16, 16)
    before = _mtimes(ddir)
    preprocess_dataset(raw, tmp_path / "pre", make_plan(input_size=[16, 16], channels=3), num_workers=0,
                       progress=False)
    after = _mtimes(ddir)
    assert load_case(ddir, "c1")[0].shape == (3, 16, 16)
    assert after["c1.npy"] != before["c1.npy"] and after["c2.npy"] == before["c2.npy"] and after["c0.npy"] == before["c0.npy"]
