"""Synthetic datasets: official layouts, learnable structures, planted duplicates only."""
from __future__ import annotations

import itertools

import imagehash
import numpy as np
import pytest
from PIL import Image

from medplan.datasets import convert_dataset, synthetic
from medplan.io import read_image


def _phashes(dest):
    return {p.stem: imagehash.phash(Image.open(p)) for p in sorted((dest / "images").glob("*.png"))}


WRITERS = {
    "camus": lambda root: synthetic.write_camus(root, n_patients=4, layout="2019", size=(96, 80)),
    "isic2018": lambda root: synthetic.write_isic2018(root, n=12, size=(64, 80)),
    "neopolyp": lambda root: synthetic.write_neopolyp(root, n=12, size=(64, 80)),
    "kvasir": lambda root: synthetic.write_kvasir(root, n=12, size=(64, 80)),
}


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_only_planted_duplicates_are_near_duplicates(fmt, tmp_path, medplan_env):
    src = WRITERS[fmt](tmp_path)
    dest = convert_dataset(fmt, src, fmt, progress=False)
    hashes = _phashes(dest)
    planted = synthetic.planted_duplicates(src)
    assert sorted(kind for _, _, kind in planted) == ["brightened", "exact", "reencoded"]
    pairs = {frozenset((a, b)) for a, b, _ in planted}
    for a, b, _ in planted:
        assert hashes[a] - hashes[b] <= 4
    distinct = [hashes[a] - hashes[b] for a, b in itertools.combinations(hashes, 2) if frozenset((a, b)) not in pairs]
    assert min(distinct) >= 12  # ED vs ES of one patient and view included
    exact = next((a, b) for a, b, kind in planted if kind == "exact")
    assert (dest / "images" / f"{exact[0]}.png").read_bytes() == (dest / "images" / f"{exact[1]}.png").read_bytes()


def test_truth_is_kept_outside_the_layout(tmp_path):
    src = synthetic.write_kvasir(tmp_path, n=2, size=(40, 40))
    inside = [p.name for p in src.rglob("*")]
    assert not [n for n in inside if "synthetic" in n or "truth" in n or "manifest" in n]
    assert set(synthetic.truth_labels(src)) == {p.stem for p in (src / "images").glob("*.jpg")}
    assert synthetic.truth_images(src) == {}  # JPEG layout: no lossless truth images


def test_same_seed_same_data_other_seed_other_data(tmp_path):
    a = synthetic.write_neopolyp(tmp_path / "a", n=3, size=(48, 56), duplicates=False)
    b = synthetic.write_neopolyp(tmp_path / "b", n=3, size=(48, 56), duplicates=False)
    c = synthetic.write_neopolyp(tmp_path / "c", n=3, size=(48, 56), duplicates=False, seed=1)
    ta, tb, tc = (synthetic.truth_labels(x) for x in (a, b, c))
    assert ta.keys() == tb.keys() and all(np.array_equal(ta[k], tb[k]) for k in ta)
    assert sorted(p.read_bytes() for p in (a / "train" / "train").iterdir()) == sorted(
        p.read_bytes() for p in (b / "train" / "train").iterdir())
    assert ta.keys() != tc.keys()


def test_camus_structures(tmp_path):
    src = synthetic.write_camus(tmp_path, n_patients=3, layout="2023", size=(96, 72), duplicates=False)
    labels, images = synthetic.truth_labels(src), synthetic.truth_images(src)
    for pid, view in itertools.product(("patient0001", "patient0002", "patient0003"), ("2CH", "4CH")):
        ed, es = labels[f"{pid}_{view}_ED"], labels[f"{pid}_{view}_ES"]
        assert set(np.unique(ed)) == {0, 1, 2, 3}
        assert np.count_nonzero(es == 1) < 0.9 * np.count_nonzero(ed == 1)  # systole: smaller cavity
        image = images[f"{pid}_{view}_ED"]
        assert not image[0, :5].any() and not image[0, -5:].any()  # black outside the sector
        assert image[ed == 2].mean() > 2 * image[ed == 1].mean()  # bright wall, dark blood
        assert image[ed == 3].mean() < image[(ed == 0) & (image > 0)].mean()  # dark atrium in tissue
    info = (src / "database_nifti" / "patient0001" / "Info_2CH.cfg").read_text()
    assert "ImageQuality:" in info and "NbFrame:" in info


def test_default_sizes_vary_a_little(tmp_path):
    src = synthetic.write_isic2018(tmp_path, n=6, duplicates=False)
    shapes = {read_image(p).shape[:2] for p in src.rglob("ISIC_*.jpg")}
    assert len(shapes) > 1
    h, w = synthetic.DEFAULT_SIZES["isic2018"]
    assert all(0.85 * h <= s[0] <= 1.15 * h and 0.85 * w <= s[1] <= 1.15 * w for s in shapes)
