"""Prediction: original sizes back, fold ensembling, TTA, folders, copied results, bad input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medplan.errors import MedplanError
from medplan.inference import Predictor, predict_folder, tta_flips
from medplan.io import atomic_write_json, read_image
from medplan.plan import Plan, make_plan

TINY = {"base_channels": 4, "depth": 2}


def tiny_plan(channels: int = 1, num_classes: int = 3, input_size: int = 32, vflip: bool = False,
              name: str = "TOY") -> Plan:
    labels = dict(list({"background": 0, "a": 1, "b": 2, "c": 3}.items())[:num_classes])
    return make_plan(dataset=name, channels=channels, labels=labels, split={"n_folds": 2, "seed": 1},
                     input_size=[input_size, input_size], batch_size=2,
                     normalization={"mean": [100.0] * channels, "std": [50.0] * channels},
                     augmentation={"hflip": True, "vflip": vflip})


def make_model_dir(model_dir: Path, plan: Plan, folds=(0, 1), seed: int = 0) -> Path:
    """A results folder as the trainer writes it: fold_K/{checkpoint_best.pt, config.json}."""
    from medplan.architectures import build_model
    from medplan.trainers.checkpoint import save_checkpoint

    for k in folds:
        torch.manual_seed(seed + int(k))
        model = build_model("unet", plan.channels, plan.num_outputs, **TINY)
        with torch.no_grad():  # a visible, fold-specific bias so folds really differ
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        fold_dir = model_dir / f"fold_{k}"
        save_checkpoint(fold_dir / "checkpoint_best.pt", {"arch": "unet", "fold": k, "model": model.state_dict(),
                                                           "model_options": dict(TINY), "plan": plan.to_json()})
        atomic_write_json(fold_dir / "config.json", {"arch": "unet", "fold": k, "model_options": dict(TINY),
                                                     "internal_size": None, "plan": plan.to_json()})
    return model_dir


@pytest.fixture()
def model_dir(tmp_path):
    return make_model_dir(tmp_path / "results" / "TOY" / "unet", tiny_plan())


def _image(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def test_label_maps_come_back_at_original_size_for_any_input(model_dir, tmp_path):
    import SimpleITK as sitk

    pred = Predictor.from_folder(model_dir, device="cpu")
    gray, rgb = _image((37, 53)), _image((41, 29, 3), 1)
    png = tmp_path / "g.png"
    Image.fromarray(_image((33, 47), 2)).save(png)
    nii, mhd = tmp_path / "n.nii.gz", tmp_path / "m.mhd"
    sitk.WriteImage(sitk.GetImageFromArray(_image((45, 31), 3)), str(nii))
    sitk.WriteImage(sitk.GetImageFromArray(_image((1, 27, 35), 4)), str(mhd))  # a one-slice volume, as CAMUS
    for source, size in ((gray, (37, 53)), (rgb, (41, 29)), (png, (33, 47)), (nii, (45, 31)), (mhd, (27, 35))):
        labels, probs = pred.predict(source, return_probabilities=True)
        assert labels.shape == size and labels.dtype == np.uint8
        assert probs.shape == (3, *size) and probs.dtype == np.float32
        assert np.allclose(probs.sum(0), 1.0, atol=1e-5)
        assert np.array_equal(labels, probs.argmax(0))


def test_fold_ensemble_is_the_mean_of_single_fold_probabilities(model_dir):
    image = _image((40, 50))
    both = Predictor.from_folder(model_dir, device="cpu").predict(image, True)[1]
    p0 = Predictor.from_folder(model_dir, folds=[0], device="cpu").predict(image, True)[1]
    p1 = Predictor.from_folder(model_dir, folds=[1], device="cpu").predict(image, True)[1]
    assert not np.allclose(p0, p1, atol=1e-3)  # the folds really differ
    np.testing.assert_allclose(both, (p0 + p1) / 2, atol=1e-5)


def test_tta_averages_the_horizontal_flip_and_vflip_only_when_planned(model_dir):
    single = Predictor.from_folder(model_dir, folds=[0], device="cpu")
    tta = Predictor.from_folder(model_dir, folds=[0], device="cpu", tta=True)
    x = _image((2, 1, 32, 32))
    plain = single.probabilities_at_input_size(x)
    flipped = single.probabilities_at_input_size(x[..., ::-1].copy()).flip(-1)
    torch.testing.assert_close(tta.probabilities_at_input_size(x), (plain + flipped) / 2, atol=1e-5, rtol=0)
    assert tta_flips(make_plan(augmentation={"vflip": False}), True) == [(), (-1,)]
    assert len(tta_flips(make_plan(augmentation={"vflip": True}), True)) == 4
    assert tta_flips(make_plan(augmentation={"vflip": True}), False) == [()]


def test_binary_bce_model_gives_two_class_probabilities(tmp_path):
    plan = tiny_plan(channels=3, num_classes=2)
    pred = Predictor.from_folder(make_model_dir(tmp_path / "m", plan, folds=(0,)), device="cpu")
    labels, probs = pred.predict(_image((21, 35)), return_probabilities=True)  # gray image, RGB model
    assert probs.shape == (2, 21, 35)
    assert np.array_equal(labels, (probs[1] > 0.5).astype(np.uint8))


def test_predict_folder_from_a_copied_results_folder(model_dir, tmp_path):
    from medplan.cli.predict import main

    copied = tmp_path / "elsewhere" / "unet"
    shutil.copytree(model_dir, copied)
    shutil.rmtree(model_dir.parent.parent)  # nothing of the original results left
    inp = tmp_path / "in"
    inp.mkdir()
    Image.fromarray(_image((31, 45))).save(inp / "a.png")
    Image.fromarray(_image((27, 19, 3), 1)).save(inp / "b.jpg")
    out = tmp_path / "out"
    written = predict_folder(copied, inp, out, device="cpu", save_probabilities=True, overlay=True,
                             batch_size=1, progress=False)
    assert [p.name for p in written] == ["a.png", "b.png"]
    assert read_image(out / "a.png").shape == (31, 45) and read_image(out / "b.png").shape == (27, 19)
    assert read_image(out / "b_overlay.png").shape == (27, 19, 3)
    assert np.load(out / "a.npz")["probabilities"].shape == (3, 31, 45)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left behind
    out2 = tmp_path / "out2"
    assert main(["-m", str(copied / "fold_1"), "-i", str(inp), "-o", str(out2), "--device", "cpu",
                 "--no-progress"]) == 0
    assert sorted(p.name for p in out2.iterdir()) == ["a.png", "b.png"]


def test_bad_input_is_one_error_and_nothing_half_written(model_dir, tmp_path, capsys):
    from medplan.cli.predict import main

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MedplanError, match="no images") as err:
        predict_folder(model_dir, empty, tmp_path / "o", device="cpu")
    assert str(empty) in str(err.value)

    no_ckpt = tmp_path / "results" / "TOY" / "untrained"
    (no_ckpt / "fold_0").mkdir(parents=True)
    with pytest.raises(MedplanError, match="no fold_K/checkpoint_best.pt") as err:
        Predictor.from_folder(no_ckpt, device="cpu")
    assert str(no_ckpt) in str(err.value)
    with pytest.raises(MedplanError, match="fold folder not found"):
        Predictor.from_folder(model_dir, folds=[7], device="cpu")

    inp = tmp_path / "in"
    inp.mkdir()
    Image.fromarray(_image((20, 20))).save(inp / "a.png")
    (inp / "z.png").write_bytes(b"not a png")  # corrupt, predicted after a.png
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_bytes(b"earlier result")
    code = main(["-m", str(model_dir), "-i", str(inp), "-o", str(out), "--device", "cpu", "--batch-size", "1",
                 "--no-progress"])
    err_text = capsys.readouterr().err
    assert code == 2 and "z.png" in err_text and len(err_text.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ["a.png"]
    assert (out / "a.png").read_bytes() == b"earlier result"  # the earlier file is intact


def test_end_to_end_with_the_trainer(tmp_path, monkeypatch):
    """A real (tiny) training run: the predictor loads the trainer's checkpoints, feeds the network
    exactly the preprocessed arrays, gives the trainer's validation maps back at the same sizes,
    and recomputed metrics equal the trainer's summary.json."""
    from trainer_fixtures import FAST, TINY_MODEL, limit_threads, make_dataset, use_roots

    from medplan.evaluation.aggregate import evaluate_model
    from medplan.preprocessing import load_case
    from medplan.trainers import train

    limit_threads()
    use_roots(monkeypatch, tmp_path)
    plan = make_dataset(tmp_path, num_classes=3, epochs={"lr_search": 1, "cv": 1}, lr=1e-2)
    fold = train("TOY", "unet", 0, overrides=FAST, model_options=TINY_MODEL)
    pred = Predictor.from_folder(fold.parent, device="cpu")  # only fold 0 is trained
    assert [f.fold for f in pred.folds] == ["0"]
    ddir = tmp_path / "preprocessed" / "TOY" / "data_32x32"
    for saved in sorted((fold / "validation").glob("*.png")):
        raw_image = read_image(tmp_path / "raw" / "TOY" / "images" / saved.name)
        assert np.array_equal(pred._prepare(pred.load(raw_image)), load_case(ddir, saved.stem)[0])
        ours, theirs = pred.predict(raw_image), read_image(saved)
        assert ours.shape == theirs.shape == raw_image.shape[:2]
        # the trainer interpolates logits, the predictor probabilities (to average folds)
        assert (ours == theirs).mean() > 0.95
    cv = evaluate_model("TOY", "unet", recompute=True)
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert cv["folds"]["0"]["mDSC"] == pytest.approx(summary["mDSC"])
    assert cv["folds"]["0"]["n_cases"] == summary["n_cases"] == len(json.loads(
        (tmp_path / "preprocessed" / "TOY" / "splits.json").read_text())[0]["val"])
    assert cv["n_folds"] == plan.split.n_folds and cv["missing_folds"] == [1, 2]
