"""Zero-copy conversion (issue 13 item 2): PNG inputs already in the raw format's encoding are
copied byte for byte without decoding, the one decode of the fingerprint pass checks them and
writes the arrays, and pixel digests are only computed where two files may hold the same pixels."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medplan.datasets import convert_dataset
from medplan.datasets.base import IndexLabels, ValueMapLabels, plain_png_shape, value_counts
from medplan.duplicates import exact_pixel_digests, pixel_digest
from medplan.errors import MedplanError
from medplan.fingerprint import fingerprint_dataset
from medplan.preprocessing import CaseArrays, load_case, prepare_image, prepare_label

SHAPE = (30, 36)


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


def _folder(root: Path, n_rgb: int = 3, n_gray: int = 0) -> Path:
    """images/ + masks/ of 8-bit PNGs: colour images, gray images, 0/1/2 class-index masks."""
    rng = np.random.default_rng(7)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n_rgb + n_gray):
        shape = (*SHAPE, 3) if i < n_rgb else SHAPE
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / "images" / f"c{i}.png")
        mask = np.zeros(SHAPE, np.uint8)
        mask[5:15, 4:20] = 1
        mask[18:25, 10:30] = 2 if i % 2 else 1
        Image.fromarray(mask).save(root / "masks" / f"c{i}.png")
    return root


def test_png_inputs_are_byte_identical_and_the_arrays_are_those_of_the_decoded_source(tmp_path, medplan_env):
    src = _folder(tmp_path / "src", n_rgb=3)
    dest = convert_dataset("folder", src, "ZC", progress=False, workers=1)
    for i in range(3):
        for sub_src, sub_raw in (("images", "images"), ("masks", "labels")):
            assert (dest / sub_raw / f"c{i}.png").read_bytes() == (src / sub_src / f"c{i}.png").read_bytes()
    out = tmp_path / "pre"
    fp = fingerprint_dataset(dest, out, arrays=CaseArrays.at(out, (16, 20)), num_workers=0, progress=False)
    assert fp["num_kept"] == 3 and fp["channels"] == 3
    assert fp["labels"]["values_found"] == [0, 1, 2]
    for i in range(3):
        image, label, props = load_case(out / "data_16x20", f"c{i}", mmap=False)
        source = _png(src / "images" / f"c{i}.png")
        assert np.array_equal(image, prepare_image(source, (16, 20), 3))
        assert np.array_equal(label, prepare_label(_png(src / "masks" / f"c{i}.png"), (16, 20)))
        assert props["original_size"] == list(SHAPE)


def test_gray_png_images_are_copied_too(tmp_path, medplan_env):
    src = _folder(tmp_path / "src", n_rgb=0, n_gray=2)
    dest = convert_dataset("folder", src, "GRAY", progress=False, workers=1)
    for i in range(2):
        assert (dest / "images" / f"c{i}.png").read_bytes() == (src / "images" / f"c{i}.png").read_bytes()
    assert plain_png_shape(dest / "images" / "c0.png") == SHAPE


def test_masks_that_must_be_mapped_are_decoded_and_reencoded(tmp_path, medplan_env):
    src = _folder(tmp_path / "src", n_rgb=2)
    for mask in (src / "masks").glob("*.png"):
        Image.fromarray((_png(mask) > 0).astype(np.uint8) * 255).save(mask)
    dest = convert_dataset("folder", src, "BIN", progress=False, workers=1)
    for i in range(2):
        raw = dest / "labels" / f"c{i}.png"
        assert raw.read_bytes() != (src / "masks" / f"c{i}.png").read_bytes()
        assert np.array_equal(_png(raw), (_png(src / "masks" / f"c{i}.png") > 0).astype(np.uint8))


def _corrupt_idat(path: Path) -> None:
    """Flip bytes inside the compressed pixel stream: header and IEND intact, the stream broken."""
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 4
    for k in range(start + 2, start + 40):
        data[k] ^= 0x5A
    path.write_bytes(bytes(data))


def test_a_corrupt_png_is_copied_and_reported_by_the_fingerprint_decode(tmp_path, medplan_env):
    src = _folder(tmp_path / "src", n_rgb=2)
    _corrupt_idat(src / "images" / "c1.png")
    dest = convert_dataset("folder", src, "BAD", progress=False, workers=1)  # header only: not decoded here
    with pytest.raises(MedplanError, match="cannot read image") as err:
        fingerprint_dataset(dest, tmp_path / "pre", num_workers=0, progress=False)
    assert str(dest / "images" / "c1.png") in str(err.value)


def test_a_truncated_png_is_decoded_at_conversion_and_named(tmp_path, medplan_env):
    src = _folder(tmp_path / "src", n_rgb=2)
    path = src / "images" / "c1.png"
    path.write_bytes(path.read_bytes()[:-40])
    assert plain_png_shape(path) is None  # no IEND: not trusted from its header
    with pytest.raises(MedplanError, match="cannot read image") as err:
        convert_dataset("folder", src, "TRUNC", progress=False, workers=1)
    assert "c1.png" in str(err.value)


def test_label_decoders_fast_paths_give_the_values_of_the_general_ones():
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 3, SHAPE, dtype=np.uint8)
    wide = mask.astype(np.int64)  # takes the general path
    p = [Path("m.png")]
    assert np.array_equal(IndexLabels(3).decode([mask], p), IndexLabels(3).decode([wide], p))
    assert IndexLabels(3).decode([mask], p).dtype == np.uint8
    with pytest.raises(MedplanError, match="label values 2 outside"):
        IndexLabels(2).decode([mask], p)
    mapping = ValueMapLabels({0: 0, 1: 1, 2: 1})
    assert np.array_equal(mapping.decode([mask], p), mapping.decode([wide], p))
    with pytest.raises(MedplanError, match="label values 2 outside"):
        ValueMapLabels({0: 0, 1: 1}).decode([mask], p)
    assert value_counts(mask).tolist()[:4] == np.bincount(mask.ravel(), minlength=256).tolist()[:4]
    assert value_counts(wide) is None


def test_pixel_digests_are_exact_where_keys_are_shared():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (8, 9, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (8, 9, 3), dtype=np.uint8)
    assert pixel_digest(Image.fromarray(a)) == pixel_digest(a)
    assert pixel_digest(Image.fromarray(a[..., 0].copy())) == pixel_digest(a[..., 0])
    images = [a, a, b, a]  # case 1: the bytes of case 0; case 3: the pixels of case 0 in other bytes
    byte_digests = ["x", "x", "y", "z"]
    keys = ["ka", "ka", "kb", "ka"]
    decoded = []

    def digest_of(i: int) -> str:
        decoded.append(i)
        return pixel_digest(images[i])

    digests = exact_pixel_digests(byte_digests, keys, digest_of)
    assert sorted(decoded) == [0, 1, 3]  # only the cases of the key that different files share
    assert digests[0] == digests[1] == digests[3] == pixel_digest(a)
    assert digests[2] == "bytes:y" and digests[2] != digests[0]

    def never(i: int) -> str:
        raise AssertionError("no key is shared: nothing to decode again")

    assert exact_pixel_digests(["x", "x", "y"], ["k1", "k1", "k2"], never) == ["bytes:x", "bytes:x", "bytes:y"]
