"""nnU-Net interop (issue 15): datasets out (medplan_export nnunet) and in (medplan_convert
nnunet), nnU-Net's own plan_and_preprocess on the export, and nnU-Net's largest-component
post-processing decided on the folds."""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from medplan import pipeline
from medplan.cli.convert import main as convert_main
from medplan.cli.export import main as export_main
from medplan.datasets import FORMATS, convert_dataset, detect_format, synthetic
from medplan.errors import MedplanError
from medplan.evaluation.aggregate import model_table
from medplan.evaluation.postprocessing import apply_postprocessing, decide_postprocessing
from medplan.evaluation.report import latex, markdown
from medplan.interop.nnunet import export_nnunet
from medplan.interop.postprocessing import keep_largest, read_postprocessing
from medplan.io import atomic_write_json, atomic_write_png
from medplan.report import build_report
from medplan.plan import make_plan
from medplan.splits import check_splits
from medplan.stagefiles import load_splits

ID = 501


@pytest.fixture(autouse=True)
def nnunet_format():
    """The ``nnunet`` format registered (importing the module registers it; a no-op once it is a
    built-in of medplan.datasets.base), imported here rather than at collection time."""
    import medplan.datasets.nnunet as module  # noqa: F401

    return module


@pytest.fixture
def nnunet_env(medplan_env, monkeypatch):
    """medplan's three folders and nnU-Net's three folders, all under tmp_path."""
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, str(medplan_env / var))
    return medplan_env


@pytest.fixture
def planned(nnunet_env):
    """Synthetic CAMUS (3 planted duplicates, patient groups) converted and planned."""
    src = synthetic.write_camus(nnunet_env / "downloads", n_patients=5, size=(48, 40), seed=3)
    assert convert_main(["camus", str(src), "-d", "CAMUS", "--no-progress"]) == 0
    plan = pipeline.plan("CAMUS", overrides={"input_size": [32, 32]}, num_workers=1, progress=False)
    assert plan.split.strategy == "group_kfold" and len(plan.excluded_cases) == 3
    return plan


def _rows(raw: Path) -> dict[str, dict[str, str]]:
    with open(raw / "cases.csv", newline="") as f:
        return {r["case_id"]: r for r in csv.DictReader(f)}


# ----------------------------------------------------------------------------- export and import


def test_export_writes_the_kept_cases_and_medplan_folds_and_reads_back_byte_for_byte(planned, nnunet_env, capsys):
    assert export_main(["nnunet", "-d", "CAMUS", "--id", str(ID), "--no-progress"]) == 0
    assert "Dataset501_CAMUS" in capsys.readouterr().out
    dest = nnunet_env / "nnUNet_raw" / "Dataset501_CAMUS"
    info = json.loads((dest / "dataset.json").read_text())
    splits = load_splits("CAMUS")
    kept = sorted(c for f in splits for c in f["val"])
    assert info["numTraining"] == len(kept) and info["file_ending"] == ".png"
    assert info["labels"] == {"background": 0, "LV": 1, "LV wall": 2, "LA": 3} and len(info["channel_names"]) == 1
    assert sorted(p.name for p in (dest / "imagesTr").iterdir()) == sorted(f"{c}_0000.png" for c in kept)
    assert not set(planned.excluded_cases) & {p.stem for p in (dest / "labelsTr").iterdir()}  # duplicates left out
    final = nnunet_env / "nnUNet_preprocessed" / "Dataset501_CAMUS" / "splits_final.json"
    assert json.loads(final.read_text()) == splits
    raw = nnunet_env / "raw" / "CAMUS"
    groups = {c: r["group"] for c, r in _rows(raw).items()}
    check_splits(json.loads(final.read_text()), kept, {c: groups[c] for c in kept})  # patient-aware

    stamp = (dest / "dataset.json").stat().st_mtime_ns
    assert export_main(["nnunet", "-d", "CAMUS", "--id", str(ID), "--no-progress"]) == 0  # up to date: untouched
    assert "up to date" in capsys.readouterr().out and (dest / "dataset.json").stat().st_mtime_ns == stamp

    assert convert_main(["nnunet", str(dest), "-d", "BACK", "--no-progress"]) == 0
    back = nnunet_env / "raw" / "BACK"
    for sub in ("images", "labels"):  # byte for byte: the PNGs are copied out and copied (or, for labels,
        names = sorted(p.name for p in (back / sub).iterdir())  # re-encoded to the same bytes) back in
        assert names == sorted(f"{c}.png" for c in kept)
        for name in names:
            assert (back / sub / name).read_bytes() == (raw / sub / name).read_bytes(), name
    rows = _rows(back)
    assert {c: r["group"] for c, r in rows.items()} == {c: groups[c] for c in kept}  # patients restored
    back_info = json.loads((back / "dataset.json").read_text())
    assert back_info["source_format"] == "nnunet-v2" and back_info["modality"] == "echocardiography"


def test_rgb_dataset_exports_as_one_rgb_file_per_case_and_round_trips(nnunet_env):
    src = synthetic.write_isic2018(nnunet_env / "downloads", n=8, size=(40, 56))
    convert_dataset("isic2018", src, "ISIC", progress=False)
    pipeline.plan("ISIC", overrides={"input_size": [32, 32]}, num_workers=1, progress=False)
    result = export_nnunet("ISIC", 12, progress=False)
    info = json.loads((result.raw_dir / "dataset.json").read_text())
    assert info["channel_names"] == {"0": "R", "1": "G", "2": "B"}  # nnU-Net's natural-image convention
    assert not any(p.name.endswith("_0001.png") for p in (result.raw_dir / "imagesTr").iterdir())
    back = convert_dataset("nnunet", result.raw_dir, "ISICBACK", progress=False)
    raw = nnunet_env / "raw" / "ISIC"
    assert json.loads((back / "dataset.json").read_text())["channels"] == 3
    for sub in ("images", "labels"):
        for path in (back / sub).iterdir():
            assert path.read_bytes() == (raw / sub / path.name).read_bytes()


def test_export_refuses_with_one_line_and_writes_nothing(planned, nnunet_env, capsys):
    nraw = nnunet_env / "nnUNet_raw"
    for argv, message in (
            (["nnunet", "-d", "NOPE", "--id", "7"], "no plan for dataset 'NOPE'"),
            (["nnunet", "-d", "CAMUS", "--id", "1000"], "id must be an integer 1..999"),
            (["zip", "-d", "CAMUS", "--id", "7"], "unknown export format"),
            (["nnunet", "-d", "../x", "--id", "7"], "invalid dataset name"),
    ):
        assert export_main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
        assert not nraw.exists()
    (nraw / "Dataset007_Other").mkdir(parents=True)
    assert export_main(["nnunet", "-d", "CAMUS", "--id", "7"]) == 2
    assert "already used by Dataset007_Other" in capsys.readouterr().err
    assert sorted(p.name for p in nraw.iterdir()) == ["Dataset007_Other"]

    final = nnunet_env / "nnUNet_preprocessed" / "Dataset501_CAMUS" / "splits_final.json"
    atomic_write_json(final, [{"train": ["a"], "val": ["b"]}])  # nnU-Net's own split of an earlier run
    assert export_main(["nnunet", "-d", "CAMUS", "--id", str(ID), "--no-progress"]) == 2
    assert "use --force" in capsys.readouterr().err and not (nraw / "Dataset501_CAMUS").exists()
    assert export_main(["nnunet", "-d", "CAMUS", "--id", str(ID), "--force", "--no-progress"]) == 0
    assert json.loads(final.read_text()) == load_splits("CAMUS")


def test_export_needs_nnunet_raw(planned, monkeypatch):
    monkeypatch.delenv("nnUNet_raw")
    with pytest.raises(MedplanError, match=r"set \$nnUNet_raw .* or give --output"):
        export_nnunet("CAMUS", ID)


def _plan_and_preprocess() -> list[str]:
    """nnU-Net's own ``nnUNetv2_plan_and_preprocess`` (its console script, else the function behind it)."""
    exe = shutil.which("nnUNetv2_plan_and_preprocess",
                       path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if exe:
        return [exe]
    return [sys.executable, "-c", "import sys; sys.argv[0] = 'nnUNetv2_plan_and_preprocess'; from nnunetv2."
            "experiment_planning.plan_and_preprocess_entrypoints import plan_and_preprocess_entry as m; m()"]


@pytest.mark.skipif(importlib.util.find_spec("nnunetv2") is None,
                    reason="nnunetv2 is not installed (pip install medplan[nnunet])")
def test_nnunet_plans_and_preprocesses_the_export_on_medplan_folds(planned, nnunet_env):
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    result = export_nnunet("CAMUS", ID, progress=False)
    run = subprocess.run([*_plan_and_preprocess(), "-d", str(ID), "-c", "2d", "--verify_dataset_integrity",
                          "-np", "1", "-npfp", "1"], env={**os.environ, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "verify_dataset_integrity Done" in run.stdout
    pre = nnunet_env / "nnUNet_preprocessed" / result.name
    assert json.loads((pre / "splits_final.json").read_text()) == load_splits("CAMUS")  # kept by nnU-Net
    data = pre / "nnUNetPlans_2d"
    identifiers = infer_dataset_class(str(data)).get_identifiers(str(data))  # what nnU-Net's trainer splits
    assert sorted(identifiers) == sorted(c for f in load_splits("CAMUS") for c in f["val"])


# ----------------------------------------------------------------------------- import of nnU-Net datasets


def _nnunet(root: Path, labels=None, channels=None, ending=".png", cases=3, files=(0,), size=(20, 24), rgb=False,
            tests=0) -> Path:
    """A small nnU-Net v2 raw dataset written as nnU-Net users write them."""
    folder = root / "Dataset042_Toy"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for i in range(cases):
        label = np.zeros(size, np.uint8)
        label[2:8, 3:9], label[12:16, 10:20] = 1, 2
        for ch in files:
            shape = (*size, 3) if rgb else size
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(
                folder / "imagesTr" / f"c{i}_{ch:04d}{ending}", format="PNG")
        Image.fromarray(label).save(folder / "labelsTr" / f"c{i}{ending}", format="PNG")
    if tests:
        (folder / "imagesTs").mkdir()
        for i in range(tests):
            Image.fromarray(np.zeros(size, np.uint8)).save(folder / "imagesTs" / f"t{i}_0000{ending}", format="PNG")
    info = {"channel_names": channels or ({"0": "R", "1": "G", "2": "B"} if rgb else {"0": "gray"}),
            "labels": labels or {"background": 0, "a": 1, "b": 2}, "numTraining": cases, "file_ending": ending}
    (folder / "dataset.json").write_text(json.dumps(info))
    return folder


def test_import_plain_nnunet_datasets_gray_and_rgb(nnunet_env):
    src = _nnunet(nnunet_env / "a", tests=2)
    assert detect_format(src) == "nnunet" and detect_format(src.parent) == "nnunet"
    dest = convert_dataset("nnunet", src, "TOY", progress=False)
    info = json.loads((dest / "dataset.json").read_text())
    assert info["labels"] == {"background": 0, "a": 1, "b": 2} and info["channels"] == 1
    assert any("imagesTs/ holds 2 case(s)" in n for n in info["notes"])
    label = np.asarray(Image.open(dest / "labels" / "c1.png"))
    assert np.array_equal(label, np.asarray(Image.open(src / "labelsTr" / "c1.png")))
    assert (dest / "images" / "c0.png").read_bytes() == (src / "imagesTr" / "c0_0000.png").read_bytes()
    rgb = convert_dataset("nnunet", _nnunet(nnunet_env / "b", rgb=True), "RGB", progress=False)
    assert json.loads((rgb / "dataset.json").read_text())["channels"] == 3
    assert FORMATS["nnunet"].name_for(src) == "Toy"


def _volume(path: Path, array: np.ndarray) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))


def _three_d(root: Path) -> Path:
    folder = _nnunet(root, ending=".png")
    for p in list((folder / "imagesTr").iterdir()) + list((folder / "labelsTr").iterdir()):
        p.unlink()
    for i in range(3):
        _volume(folder / "imagesTr" / f"c{i}_0000.nii.gz", np.zeros((5, 16, 16), np.int16))
        _volume(folder / "labelsTr" / f"c{i}.nii.gz", np.zeros((5, 16, 16), np.uint8))
    info = json.loads((folder / "dataset.json").read_text())
    (folder / "dataset.json").write_text(json.dumps({**info, "file_ending": ".nii.gz"}))
    return folder


BAD = {
    "3D": (_three_d, "3D image (size 16x16x5)"),
    "missing _0000": (lambda r: _nnunet(r, files=(1,)), "has no _0000 channel file"),
    "regions": (lambda r: _nnunet(r, labels={"background": 0, "a": 1, "ab": [1, 2]}), "is a region [1, 2]"),
    "channels disagree": (lambda r: _nnunet(r, files=(0, 1)), "declares 1 channel(s)"),
    "3 channel files": (lambda r: _nnunet(r, files=(0, 1, 2), channels={"0": "a", "1": "b", "2": "c"}),
                        "one RGB file CASE_0000"),
    "RGB file for 1 channel": (lambda r: _nnunet(r, rgb=True, channels={"0": "x"}), "is an RGB image"),
    "two channels": (lambda r: _nnunet(r, channels={"0": "T1", "1": "T2"}), "1 (gray) or 3 (RGB) channels"),
    "unknown ending": (lambda r: _nnunet(r, ending=".gipl"), "not a format medplan reads"),
    "jpeg": (lambda r: _nnunet(r, ending=".jpg"), "is lossy"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_import_refuses_what_medplan_cannot_represent_with_one_line(case, nnunet_env, capsys):
    make, message = BAD[case]
    src = make(nnunet_env / "src")
    assert convert_main(["nnunet", str(src), "-d", "BAD", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
    assert not (nnunet_env / "raw" / "BAD").exists() and not any((nnunet_env / "raw").glob(".BAD*tmp"))


# ----------------------------------------------------------------------------- post-processing


def _disc(shape, cy, cx, r) -> np.ndarray:
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _fold(model_dir: Path, fold: int, plan, preds: dict[str, np.ndarray]) -> None:
    run = model_dir / f"fold_{fold}"
    for case, pred in preds.items():
        atomic_write_png(run / "validation" / f"{case}.png", pred)
    atomic_write_json(run / "validation" / "summary.json", {})
    atomic_write_json(run / "config.json", {"arch": "toy", "fold": fold, "plan": plan.to_json(),
                                            "val_cases": sorted(preds)})
    (run / "checkpoint_final.pt").write_bytes(b"")


def test_postprocessing_keeps_the_largest_component_only_where_it_helps(nnunet_env):
    """Class 'blob' is one disc, predicted with small spurious blobs; class 'pair' is truly two
    squares: only 'blob' gets the largest-component rule, and foreground-as-one is refused."""
    shape = (40, 48)
    labels = {"background": 0, "blob": 1, "pair": 2}
    raw = nnunet_env / "raw" / "PP"
    atomic_write_json(raw / "dataset.json", {"name": "PP", "channels": 1, "labels": labels})
    plan = make_plan(dataset="PP", labels=labels, split={"n_folds": 2, "seed": 1}, input_size=[32, 32],
                     batch_size=2, normalization={"mean": [100.0], "std": [50.0]})
    model_dir = nnunet_env / "results" / "PP" / "toy"
    rng = np.random.default_rng(1)
    for fold in (0, 1):
        preds = {}
        for i in range(3):
            case = f"case{fold}{i}"
            gt = np.zeros(shape, np.uint8)
            gt[_disc(shape, 12, 12, 6 + i)] = 1
            gt[25:33, 20:26] = 2
            gt[25:33, 36:44] = 2
            atomic_write_png(raw / "labels" / f"{case}.png", gt)
            pred = gt.copy()
            pred[_disc(shape, 12, 12, 7 + i) & (gt == 0)] = 1  # a slightly larger disc: some FP
            for _ in range(2):  # spurious 2x2 blobs of class 1, away from everything
                y, x = int(rng.integers(2, 8)), int(rng.integers(28, 44))
                pred[y:y + 2, x:x + 2] = 1
            pred[25:33, 37:44] = 2  # the second square slightly too small: it still helps class 2
            preds[case] = pred
        _fold(model_dir, fold, plan, preds)

    decision = decide_postprocessing("PP", "toy")
    assert decision["largest_component_classes"] == [1]
    steps = decision["steps"]
    assert steps["classes"]["blob"]["largest_component"] and \
        steps["classes"]["blob"]["mDSC_after"] > steps["classes"]["blob"]["mDSC_before"]
    assert not steps["classes"]["pair"]["largest_component"]
    assert steps["classes"]["pair"]["dice_after"] < steps["classes"]["pair"]["dice_before"]
    assert steps["foreground"]["largest_component"] is False and decision["foreground_largest_component"] is False
    assert decision["postprocessed"]["mDSC"] > decision["raw"]["mDSC"] and decision["n_cases"] == 6
    assert set(decision["per_fold"]) == {"0", "1"}
    assert read_postprocessing(model_dir, num_classes=3) == json.loads(json.dumps(decision))

    pred = np.asarray(Image.open(model_dir / "fold_0" / "validation" / "case00.png"))
    out = apply_postprocessing(pred, decision)
    assert (out == 1).sum() == _disc(shape, 12, 12, 7).sum()  # the spurious blobs are gone, the disc stays
    assert np.array_equal(out == 2, pred == 2) and np.array_equal(pred, np.asarray(Image.open(
        model_dir / "fold_0" / "validation" / "case00.png")))  # input untouched
    assert np.array_equal(keep_largest(pred, None) > 0, keep_largest(pred > 0, None))

    # Table 3 shows raw and post-processed mDSC side by side (the latter never marked best)
    table = model_table("PP", "toy", recompute=True)  # the folds here hold maps, not summaries
    assert list(table["mDSC_pp"]) == pytest.approx([decision["per_fold"][k]["postprocessed"]["mDSC"]
                                                    for k in ("0", "1")])
    assert list(table["mDSC"]) == pytest.approx([decision["per_fold"][k]["raw"]["mDSC"] for k in ("0", "1")])
    md, tex = markdown(table), latex(table)
    assert "| mDSC | mDSC pp | mIoU |" in md and "largest-component" in md
    assert "mDSC & mDSC pp & mIoU" in tex
    html = build_report(nnunet_env / "results", table=table, num_workers=0).read_text()
    assert ">mDSC pp<" in html


def test_postprocessing_bad_inputs(nnunet_env):
    with pytest.raises(MedplanError, match="no cross-validation folds of toy on PP"):
        decide_postprocessing("PP", "toy")
    with pytest.raises(MedplanError, match="largest_component_classes"):
        apply_postprocessing(np.zeros((4, 4), np.uint8), {"largest_component_classes": [0]})
    ties = np.zeros((5, 9), np.uint8)
    ties[1:3, 1:3] = ties[1:3, 6:8] = 1
    assert np.array_equal(apply_postprocessing(ties, {"largest_component_classes": [1]}), ties)  # ties both kept
