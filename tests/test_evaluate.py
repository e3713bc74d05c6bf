"""Evaluation of saved label maps: equal to a direct hand computation; bad input; cross-dataset."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medplan.errors import MedplanError
from medplan.evaluation.evaluate import cross_dataset_evaluation, evaluate_folders, parse_mapping
from medplan.io import atomic_write_json, atomic_write_png, read_image


def by_hand(preds: list[np.ndarray], gts: list[np.ndarray], k: int) -> dict:
    """Global micro-averaged metrics, background excluded, counted pixel by pixel."""
    tp = fp = fn = 0
    dice = {}
    for c in range(1, k):
        t = sum(int(((p == c) & (g == c)).sum()) for p, g in zip(preds, gts))
        f_p = sum(int(((p == c) & (g != c)).sum()) for p, g in zip(preds, gts))
        f_n = sum(int(((p != c) & (g == c)).sum()) for p, g in zip(preds, gts))
        tp, fp, fn = tp + t, fp + f_p, fn + f_n
        dice[c] = 2 * t / (2 * t + f_p + f_n)
    return {"mDSC": 2 * tp / (2 * tp + fp + fn), "mIoU": tp / (tp + fp + fn), "mRec": tp / (tp + fn),
            "mPrec": tp / (tp + fp), "dice": dice}


def write_pair(root: Path, rng, shapes, k=4, noise=0.3):
    preds, gts = [], []
    for i, shape in enumerate(shapes):
        gt = rng.integers(0, k, size=shape).astype(np.uint8)
        pred = np.where(rng.random(shape) < noise, rng.integers(0, k, size=shape), gt).astype(np.uint8)
        atomic_write_png(root / "gt" / f"c{i}.png", gt)
        atomic_write_png(root / "pred" / f"c{i}.png", pred)
        preds.append(pred)
        gts.append(gt)
    return preds, gts


def test_folder_evaluation_equals_a_direct_computation(tmp_path):
    preds, gts = write_pair(tmp_path, np.random.default_rng(0), [(17, 23), (30, 11), (8, 9)])
    s = evaluate_folders(tmp_path / "pred", tmp_path / "gt", "0,1,2,3", "background,LV,LV wall,LA")
    ref = by_hand(preds, gts, 4)
    for m in ("mDSC", "mIoU", "mRec", "mPrec"):
        assert s[m] == pytest.approx(ref[m])
    assert [s["per_class"][n]["dice"] for n in ("LV", "LV wall", "LA")] == pytest.approx([ref["dice"][c] for c in (1, 2, 3)])
    assert s["n_cases"] == 3 and set(s["per_case"]) == {"c0", "c1", "c2"}
    one = by_hand(preds[1:2], gts[1:2], 4)
    assert s["per_case"]["c1"]["mDSC"] == pytest.approx(one["mDSC"])


def test_declared_values_like_0_255_and_input_size(tmp_path):
    rng = np.random.default_rng(1)
    gt = (rng.random((40, 60)) < 0.4).astype(np.uint8)
    pred = np.where(rng.random((40, 60)) < 0.2, 1 - gt, gt).astype(np.uint8)
    atomic_write_png(tmp_path / "gt" / "x.png", gt * 255)
    atomic_write_png(tmp_path / "pred" / "x.png", pred * 255)
    s = evaluate_folders(tmp_path / "pred", tmp_path / "gt", [0, 255])
    assert s["mDSC"] == pytest.approx(by_hand([pred], [gt], 2)["mDSC"])
    small = evaluate_folders(tmp_path / "pred", tmp_path / "gt", [0, 255], input_size=(16, 16))
    resize = lambda a: np.asarray(Image.fromarray(a).resize((16, 16), Image.NEAREST))  # noqa: E731
    assert small["mDSC"] == pytest.approx(by_hand([resize(pred)], [resize(gt)], 2)["mDSC"])
    assert small["evaluated_at"] == "input_size 16x16"


def test_bad_inputs_name_the_file(tmp_path, capsys):
    from medplan.cli.evaluate import main

    rng = np.random.default_rng(2)
    write_pair(tmp_path, rng, [(10, 10), (12, 12)], k=3)
    pred, gt = tmp_path / "pred", tmp_path / "gt"

    atomic_write_png(pred / "c1.png", np.zeros((12, 13), np.uint8))  # wrong size
    with pytest.raises(MedplanError, match="12x13.*12x12") as err:
        evaluate_folders(pred, gt, 3)
    assert str(pred / "c1.png") in str(err.value)

    atomic_write_png(pred / "c1.png", np.full((12, 12), 5, np.uint8))  # undeclared class
    with pytest.raises(MedplanError, match="label value.*5.*outside the declared classes") as err:
        evaluate_folders(pred, gt, "0,1,2")
    assert str(pred / "c1.png") in str(err.value)

    (pred / "c1.png").unlink()  # a prediction missing
    with pytest.raises(MedplanError, match="prediction missing") as err:
        evaluate_folders(pred, gt, 3)
    assert "c1.png" in str(err.value)
    atomic_write_png(pred / "c1.png", np.zeros((12, 12), np.uint8))
    (gt / "c0.png").unlink()  # a ground truth missing
    with pytest.raises(MedplanError, match="ground truth missing") as err:
        evaluate_folders(pred, gt, 3)
    assert str(gt / "c0.png") in str(err.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "summary.json"
    code = main(["--pred", str(empty), "--gt", str(gt), "--labels", "0,1,2", "-o", str(out)])
    assert code == 2 and "no label maps" in capsys.readouterr().err and not out.exists()
    with pytest.raises(MedplanError, match="3 names"):
        evaluate_folders(pred, gt, "0,1", "a,b,c")


def test_cli_folder_pair_writes_the_summary(tmp_path, capsys):
    from medplan.cli.evaluate import main

    preds, gts = write_pair(tmp_path, np.random.default_rng(3), [(9, 14)], k=3)
    out = tmp_path / "s.json"
    assert main(["--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--labels", "0,1,2",
                 "--names", "background,x,y", "-o", str(out)]) == 0
    import json

    assert json.loads(out.read_text())["mDSC"] == pytest.approx(by_hand(preds, gts, 3)["mDSC"])
    assert "mDSC" in capsys.readouterr().out


def test_parse_mapping():
    assert parse_mapping("1,2:1") == {1: 1, 2: 1}
    assert parse_mapping(["1:2", "2:1;3:0"]) == {1: 2, 2: 1, 3: 0}
    with pytest.raises(MedplanError, match="SOURCE"):
        parse_mapping("1,2")
    with pytest.raises(MedplanError, match="twice"):
        parse_mapping("1:1;1:2")


def test_cross_dataset_with_a_class_mapping(tmp_path, monkeypatch):
    from test_predict import make_model_dir, tiny_plan

    for sub, var in (("raw", "MEDPLAN_RAW"), ("preprocessed", "MEDPLAN_PREPROCESSED"), ("results", "MEDPLAN_RESULTS")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    model_dir = make_model_dir(tmp_path / "results" / "Neo" / "unet", tiny_plan(num_classes=3, name="Neo"), folds=(0,))
    import torch

    from medplan.trainers.checkpoint import load_checkpoint, save_checkpoint

    ckpt = model_dir / "fold_0" / "checkpoint_best.pt"
    state = load_checkpoint(ckpt)
    head = [k for k, v in state["model"].items() if k.endswith("bias") and tuple(v.shape) == (3,)][-1]
    state["model"][head] = torch.tensor([0.0, 0.5, 1.0])  # both polyp classes get predicted somewhere
    state.pop("format")
    save_checkpoint(ckpt, state)
    raw = tmp_path / "raw" / "Kv"
    rng = np.random.default_rng(4)
    for i, shape in enumerate([(30, 41), (25, 25)]):
        atomic_write_png(raw / "images" / f"k{i}.png", rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8))
        atomic_write_png(raw / "labels" / f"k{i}.png", (rng.random(shape) < 0.3).astype(np.uint8))
    atomic_write_json(raw / "dataset.json", {"name": "Kv", "channels": 3, "labels": {"background": 0, "polyp": 1}})

    with pytest.raises(MedplanError, match="model class 'b' \\(index 2\\)"):
        cross_dataset_evaluation("Neo", "unet", "Kv", device="cpu", progress=False)
    s = cross_dataset_evaluation("Neo", "unet", "Kv", mapping="1,2:1", device="cpu", progress=False)
    out = tmp_path / "results" / "Neo" / "unet" / "cross_Kv"
    preds = [np.isin(read_image(out / f"k{i}.png"), [1, 2]).astype(np.uint8) for i in range(2)]
    gts = [read_image(raw / "labels" / f"k{i}.png") for i in range(2)]
    assert preds[0].shape == (30, 41)
    assert 2 in read_image(out / "k0.png")  # class 2 predicted, so the mapping really acted
    assert s["mDSC"] == pytest.approx(by_hand(preds, gts, 2)["mDSC"])
    assert s["mapping"] == {"1": 1, "2": 1} and (out / "summary.json").is_file()
