"""``nnunetv2``: the real nnU-Net v2 as an architecture of the study (issue 15 item 3).

One CPU run trains a real nnU-Net fold (nnU-Net's own plan_and_preprocess and nnUNetv2_train,
with a test-only nnU-Net trainer of 1 epoch x 3 iterations found through $nnUNet_extTrainer),
then checks medplan's fold folder, that its label maps are nnU-Net's own validation
predictions, medplan_evaluate --all-folds beside unet_small, the paired comparison,
medplan_predict through nnU-Net's predictor, and the run-folder rules."""
from __future__ import annotations

import builtins
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medplan.architectures import build_model, describe_models, get_entry, list_models, model_info
from medplan.errors import MedplanError
from medplan.evaluation.aggregate import gather_all_folds
from medplan.evaluation.compare import paired_comparison
from medplan.inference import Predictor, predict_folder
from medplan.study.model import Study, tasks
from medplan.trainers import get_trainer, train
from trainer_fixtures import FAST, TINY_MODEL, make_dataset

HAS_NNUNET = importlib.util.find_spec("nnunetv2") is not None
needs_nnunet = pytest.mark.skipif(not HAS_NNUNET, reason="nnunetv2 is not installed (pip install medplan[nnunet])")
TINY_TRAINER = "nnUNetTrainer_medplanTiny"  # tests/nnunet_trainers/


@pytest.fixture
def toy(medplan_env, monkeypatch):
    """A 3-class synthetic set of 9 cases (3 folds), nnU-Net kept to one process and thread."""
    monkeypatch.setenv("nnUNet_extTrainer", str(Path(__file__).parent / "nnunet_trainers"))
    for var, value in (("nnUNet_n_proc_DA", "0"), ("nnUNet_def_n_proc", "1"), ("OMP_NUM_THREADS", "1")):
        monkeypatch.setenv(var, value)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(var, raising=False)  # the trainer sets them for nnU-Net itself
    make_dataset(medplan_env, "TOY", n_cases=9, n_folds=3, num_classes=3)
    return medplan_env


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_nnunetv2_is_a_registered_external_architecture():
    assert "nnunetv2" in list_models() and "nnunetv2" not in list_models(external=False)
    info = model_info("nnunetv2")
    assert info["external"] == "nnU-Net v2" and info["options"]["trainer"] == "nnUNetTrainer"
    row = describe_models(["nnunetv2"])[0]
    assert row["error"] is None and row["params_total"] is None and "external" in row["description"]
    with pytest.raises(MedplanError, match="trained and run by nnU-Net v2"):
        build_model("nnunetv2", 1, 3)
    assert get_trainer("nnunetv2").__name__ == "NnUNetV2Trainer" and get_entry("nnunetv2").external


def test_study_runs_no_lr_search_for_nnunetv2(monkeypatch):
    import medplan.study.model as model  # its folds come from splits.json: one fold here

    monkeypatch.setattr(model, "study_folds", lambda study, dataset: [0])
    study = Study(datasets=["TOY"], archs=["unet", "nnunetv2"])
    all_tasks = tasks(study)
    keys = [t.key for t in all_tasks]
    assert "TOY/unet/lr_search" in keys and "TOY/nnunetv2/lr_search" not in keys and "TOY/nnunetv2/fold_0" in keys
    fold = next(t for t in all_tasks if t.key == "TOY/nnunetv2/fold_0")
    assert model.dependencies(study, fold, all_tasks) == []  # nnU-Net's recipe fixes its LR


def test_without_the_package_it_is_one_line_and_nothing_is_written(toy, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_nnunet(name, *args, **kwargs):
        if name == "nnunetv2" or name.startswith("nnunetv2."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_nnunet)
    monkeypatch.delitem(sys.modules, "nnunetv2", raising=False)
    from medplan.cli.train import main as train_main

    assert train_main(["TOY", "nnunetv2", "0", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs pip install medplan[nnunet]" in err and "\n" not in err, err
    assert not (toy / "results").exists()
    assert not (toy / "preprocessed" / "TOY" / "nnunet").exists()


@needs_nnunet  # without it every nnunetv2 run is refused first by the install line (the test above)
def test_bad_options_are_refused_before_anything_is_written(toy):
    for kwargs, message in (
            ({"model_options": {"depth": 3}}, "has no option 'depth'"),
            ({"overrides": {"lr": 1e-3}}, "--lr does not apply"),
            ({"overrides": {"epochs": 3}, "model_options": {"trainer": TINY_TRAINER}}, "either --epochs"),
            ({"overrides": {"epochs": 3}}, "nnU-Net has no trainer 'nnUNetTrainer_3epochs'"),
            ({"model_options": {"configuration": "3d_fullres"}}, "must be '2d'"),
    ):
        with pytest.raises(MedplanError, match=message):
            train("TOY", "nnunetv2", 0, **{"overrides": {"device": "cpu"}, **kwargs})
    assert not (toy / "results").exists()


@needs_nnunet
def test_nnunetv2_trains_a_fold_and_sits_beside_unet_small(toy, capsys):
    fold = train("TOY", "nnunetv2", 0, overrides={"device": "cpu", "progress": False},
                 model_options={"trainer": TINY_TRAINER})
    assert fold == toy / "results" / "TOY" / "nnunetv2" / "fold_0"
    config = json.loads((fold / "config.json").read_text())
    nn = config["nnunet"]
    assert nn["trainer"] == TINY_TRAINER and nn["version"] and nn["configuration"] == "2d"
    assert nn["commands"][-1][-7:] == ["0", "-tr", TINY_TRAINER, "-p", "nnUNetPlans", "-device", "cpu"]
    assert any("nnUNetv2_plan_and_preprocess" in c[0] for c in nn["commands"])
    assert any("nnUNetv2_train" in c[0] and TINY_TRAINER in c for c in nn["commands"])
    assert config["epochs"] == 1 and config["val_cases"] == ["case_000", "case_003", "case_006"]
    records = [json.loads(line) for line in (fold / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["source"] == "nnU-Net" and records[0]["lr"] == pytest.approx(0.01)
    assert (fold / "checkpoint_final.pt").is_file() and (fold / "progress.png").is_file()

    # the validation label maps are nnU-Net's own validation predictions, at original size
    own = next((fold / "nnunet").glob(f"Dataset*_TOY/{TINY_TRAINER}__nnUNetPlans__2d/fold_0/validation"))
    for case in config["val_cases"]:
        mine, theirs = _png(fold / "validation" / f"{case}.png"), _png(own / f"{case}.png")
        assert mine.shape == _png(toy / "raw" / "TOY" / "labels" / f"{case}.png").shape
        assert np.array_equal(mine, theirs), case
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert summary["predicted_by"] == "nnU-Net's predictor" and 0 <= summary["mDSC"] <= 1

    # the run-folder rules: a finished run is kept, --force would be needed to replace it
    with pytest.raises(MedplanError, match="holds a finished run"):
        train("TOY", "nnunetv2", 0, overrides={"device": "cpu"}, model_options={"trainer": TINY_TRAINER})
    capsys.readouterr()
    assert train("TOY", "nnunetv2", 0, continue_training=True, overrides={"device": "cpu"},
                 model_options={"trainer": TINY_TRAINER}) == fold
    assert "nothing to do" in capsys.readouterr().out

    # beside unet_small in medplan_evaluate --all-folds and the paired comparison
    train("TOY", "unet_small", 0, overrides={**FAST, "epochs": 1}, model_options=TINY_MODEL)
    df = gather_all_folds(datasets=["TOY"])
    ok = df[df["status"] == "ok"].set_index("arch")
    assert set(ok.index) == {"nnunetv2", "unet_small"}
    assert ok.loc["nnunetv2", "mDSC"] == pytest.approx(summary["mDSC"])
    result = paired_comparison("TOY", "nnunetv2", "unet_small", n_boot=200)
    assert len(result["cases"]) == 3

    # medplan_predict through nnU-Net's predictor: with --tta (nnU-Net's mirroring, which its own
    # validation uses) the same maps for the same images; without, no mirroring, as for every arch
    predictor = Predictor.from_folder(fold.parent, device="cpu")
    assert type(predictor).__name__ == "NnunetPredictor"
    assert not predictor.tta and not predictor.predictor.use_mirroring
    assert Predictor.from_folder(fold.parent, device="cpu", tta=True).predictor.use_mirroring
    out = predict_folder(fold.parent, toy / "raw" / "TOY" / "images", toy / "pred", device="cpu", tta=True,
                         progress=False)
    assert len(out) == 9
    for case in config["val_cases"]:
        assert np.array_equal(_png(toy / "pred" / f"{case}.png"), _png(fold / "validation" / f"{case}.png"))


@needs_nnunet
def test_an_interrupted_nnunetv2_run_needs_continue_or_force(toy):
    fold = toy / "results" / "TOY" / "nnunetv2" / "fold_0"
    fold.mkdir(parents=True)
    (fold / "config.json").write_text(json.dumps({"arch": "nnunetv2", "fold": 0}))
    with pytest.raises(MedplanError, match="interrupted run; resume with --continue"):
        train("TOY", "nnunetv2", 0, overrides={"device": "cpu"}, model_options={"trainer": TINY_TRAINER})
    assert json.loads((fold / "config.json").read_text()) == {"arch": "nnunetv2", "fold": 0}  # untouched


def test_explain_says_in_one_line_that_it_does_not_apply(medplan_env):
    from medplan.explain import ExplainRequest, explain

    with pytest.raises(MedplanError, match="medplan_explain does not apply to nnunetv2") as info:
        explain(ExplainRequest(dataset="TOY", archs=["unet_small", "nnunetv2"], progress=False))
    assert "\n" not in str(info.value)


def test_predict_applies_the_folds_postprocessing_unless_told_not_to(medplan_env):
    from medplan.interop.postprocessing import apply_postprocessing

    make_dataset(medplan_env, "PP", n_cases=6, n_folds=2, num_classes=3)
    fold = train("PP", "unet_small", 0, overrides={**FAST, "epochs": 1}, model_options=TINY_MODEL)
    decision = {"foreground_largest_component": False, "largest_component_classes": [1, 2]}
    (fold.parent / "postprocessing.json").write_text(json.dumps(decision))
    images = medplan_env / "raw" / "PP" / "images"
    raw = predict_folder(fold.parent, images, medplan_env / "raw_pred", device="cpu", postprocessing=False,
                         progress=False)
    post = predict_folder(fold.parent, images, medplan_env / "pp_pred", device="cpu", progress=False)
    for a, b in zip(raw, post):
        assert np.array_equal(_png(b), apply_postprocessing(_png(a), decision))
