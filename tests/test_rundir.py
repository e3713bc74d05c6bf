"""A run's folder in one place (medplan.rundir), the trainer built for prediction, the recorded
trainer honoured at inference, and the one "probabilities -> original size -> labels" function."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from medplan.errors import MedplanError
from medplan.metrics import logits_to_labels, logits_to_probs, probabilities_to_labels
from medplan.io import atomic_write_json
from medplan.plan import make_plan
from medplan.rundir import (BEST, CHECKPOINTS, CONFIG, FINAL, LATEST, LOG, METRICS, RUN_FILES, STARTED_FILES, SUMMARY,
                            VALIDATION, RunDir, checkpoint_name, fold_dirs, fold_of, fold_sort_key, is_model_dir,
                            lr_search_runs, lr_tag)


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def config(run: RunDir, **values):
    atomic_write_json(run.config_path, {"dataset": "TOY", "arch": "unet", "fold": 0, "lr": 1e-3, "epochs": 3,
                                        "batch_size": 2, "seed": 7, "model_options": {"depth": 2}, **values})


# ----------------------------------------------------------------------------- names and layout
def test_the_layout_has_one_name_for_each_file(tmp_path):
    run = RunDir(tmp_path / "fold_3")
    assert (run.latest.name, run.best.name, run.final.name) == (LATEST, BEST, FINAL)
    assert [p.name for p in (run.config_path, run.metrics_path, run.progress_path, run.log_path, run.lock_path)] == \
        ["config.json", "metrics.jsonl", "progress.png", "training.log", ".lock"]
    assert run.summary_path == tmp_path / "fold_3" / "validation" / "summary.json"
    assert run.checkpoint("final") == run.final and run.checkpoint(FINAL) == run.final
    assert set(CHECKPOINTS) == {"best", "final", "latest"} and set(STARTED_FILES) < set(RUN_FILES)
    assert run.fold == "3" and RunDir(tmp_path / "fold_all").fold == "all" and RunDir(tmp_path / "x").fold is None
    assert os.fspath(run) == str(tmp_path / "fold_3") and str(run) == os.fspath(run)
    assert RunDir(str(tmp_path / "fold_3")) == run
    with pytest.raises(MedplanError, match="--checkpoint must be one of best, final, latest"):
        checkpoint_name("newest")


def test_run_dir_of_a_fold_and_of_an_lr_search_run(medplan_env):
    results = medplan_env / "results"
    assert RunDir.of("TOY", "unet", 2).path == results / "TOY" / "unet" / "fold_2"
    assert RunDir.of("TOY", "unet", "all").path == results / "TOY" / "unet" / "fold_all"
    assert RunDir.of("TOY", "unet", 0, stage="lr_search", lr=2.5e-5).path == \
        results / "TOY" / "unet" / "lr_search" / "lr_2.5e-05" / "fold_0"
    assert lr_tag(1e-4) == "1e-04"
    with pytest.raises(MedplanError, match="explicit --lr"):
        RunDir.of("TOY", "unet", 0, stage="lr_search")
    with pytest.raises(MedplanError):
        RunDir.of("../TOY", "unet", 0)


def test_fold_folders_of_a_model_in_fold_order(tmp_path):
    model = tmp_path / "unet"
    for name in ("fold_10", "fold_2", "fold_all", "fold_0", "other"):
        (model / name).mkdir(parents=True)
    touch(model / "fold_7")  # a file, not a fold folder
    assert [r.name for r in fold_dirs(model)] == ["fold_0", "fold_2", "fold_10", "fold_all"]
    assert [r.fold for r in fold_dirs(model, numbered=True)] == ["0", "2", "10"]
    assert is_model_dir(model) and not is_model_dir(tmp_path) and fold_dirs(tmp_path / "missing") == []
    assert fold_of(model / "fold_10") == "10" and fold_sort_key("fold_2") < fold_sort_key("fold_10")
    (model / "lr_search" / "lr_1e-04" / "fold_0").mkdir(parents=True)
    (model / "lr_search" / "lr_1e-03" / "fold_0").mkdir(parents=True)
    assert [r.path.parent.name for r in lr_search_runs(model)] == ["lr_1e-03", "lr_1e-04"]


# ----------------------------------------------------------------------------- state
def test_complete_started_and_interrupted(tmp_path):
    run = RunDir(tmp_path / "fold_0")
    assert not run.is_started() and not run.is_complete() and not run.is_interrupted() and run.present() == set()
    touch(run.metrics_path)
    assert run.is_started() and run.is_interrupted()
    touch(run.final)
    assert not run.is_complete() and run.is_complete(validates=False)  # a validating run needs its summary
    touch(run.summary_path)
    assert run.is_complete() and not run.is_interrupted()
    assert run.present() == {METRICS, FINAL, VALIDATION}
    everything = RunDir(tmp_path / "fold_all")
    touch(everything.final)
    assert everything.is_complete()  # fold "all" has no validation cases
    other = RunDir(tmp_path / "custom")
    touch(other.final)
    atomic_write_json(other.config_path, {"n_val": 0})
    assert other.is_complete()


def test_clear_and_remove_new_leave_the_lock_and_what_was_there(tmp_path):
    run = RunDir(tmp_path / "fold_0")
    for name in RUN_FILES:
        touch(run.file(name))
    touch(run.validation / "a.png")
    touch(run.lock_path)
    run.clear(keep=(LOG,))
    assert run.present() == {LOG} and run.lock_path.exists()
    before = run.present()
    touch(run.file(CONFIG))
    touch(run.validation / "b.png")
    run.remove_new(before)
    assert run.present() == {LOG}


def test_acquire_takes_the_lock_and_removes_temporaries_of_a_killed_run(tmp_path):
    run = RunDir(tmp_path / "fold_0")
    stale = touch(run.path / ".checkpoint_latest.pt.0123abcd.tmp")
    lock, removed = run.acquire("train TOY/unet/fold_0")
    try:
        assert removed == [stale] and not stale.exists() and run.lock_path.is_file()
        assert json.loads(run.lock_path.read_text())["purpose"] == "train TOY/unet/fold_0"
    finally:
        lock.release()
    assert not run.lock_path.exists()


# ----------------------------------------------------------------------------- the record
def test_config_provenance_and_recorded_settings(tmp_path):
    run = RunDir(tmp_path / "fold_0")
    assert run.config() == {} and run.plan() is None and run.provenance().command_line == []
    with pytest.raises(MedplanError, match="no config.json"):
        run.config(required=True)
    config(run, trainer="medplan.trainers.base.Trainer", command_line=["medplan_train", "TOY", "unet", "0"],
           versions={"torch": "2"}, plan={"labels": {"background": 0}}, settings={"amp": True},
           resumes=[{"after_epoch": 1}])
    p = run.provenance()
    assert p.trainer.endswith("Trainer") and p.command_line[0] == "medplan_train" and p.versions == {"torch": "2"}
    assert p.plan == run.plan() == {"labels": {"background": 0}} and p.settings == {"amp": True}
    assert p.resumes == [{"after_epoch": 1}] and p.git_commit is None
    recorded = run.recorded_settings("TOY", "unet", 0)
    assert recorded == {"lr": 1e-3, "epochs": 3, "batch_size": 2, "seed": 7, "model_options": {"depth": 2},
                        "lr_source": "config.json"}
    with pytest.raises(MedplanError, match="records arch 'unet', not 'segformer_b3'; start over with --force"):
        run.recorded_settings("TOY", "segformer_b3", 0)
    config(run, epochs=0)
    with pytest.raises(MedplanError, match="epochs is 0, not a valid setting"):
        run.recorded_settings("TOY", "unet", 0)
    run.config_path.write_text("[1, 2]")
    with pytest.raises(MedplanError, match="expected a JSON object"):
        run.config()
    with pytest.raises(MedplanError, match="expected a JSON object"):
        run.recorded_settings("TOY", "unet", 0)


def test_resumes_are_appended_to_the_config(tmp_path):
    run = RunDir(tmp_path / "fold_0")
    run.path.mkdir()
    run.record_resume({"after_epoch": 1}, fallback=lambda: {"made": "now"})
    run.record_resume({"after_epoch": 2}, fallback=lambda: pytest.fail("config.json exists"))
    assert run.config() == {"made": "now", "resumes": [{"after_epoch": 1}, {"after_epoch": 2}]}


def test_metrics_and_summary(tmp_path):
    run = RunDir(tmp_path / "fold_0")
    assert run.metrics() == [] and run.best_metric() is None and run.summary(required=False) is None
    with pytest.raises(MedplanError, match="no validation results"):
        run.summary()
    run.path.mkdir()
    run.write_metrics([{"epoch": 1, "val_mIoU": np.float32(0.25)}, {"epoch": 2, "val_mIoU": None},
                       {"epoch": 3, "val_mIoU": torch.tensor(0.5)}])
    lines = run.metrics_path.read_text().splitlines()
    assert json.loads(lines[0]) == {"epoch": 1, "val_mIoU": 0.25} and len(lines) == 3
    assert run.best_metric() == 0.5 and [r["epoch"] for r in run.metrics()] == [1, 2, 3]
    atomic_write_json(run.summary_path, {"mDSC": 0.5})
    assert run.summary() == {"mDSC": 0.5} and not run.has_predictions()
    touch(run.validation / "a.png")
    assert run.has_predictions() and (run.validation / SUMMARY).is_file()


# ----------------------------------------------------------------------------- probabilities -> labels
def test_probabilities_to_labels_at_the_original_size():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(3, 8, 8), dim=0)
    labels, same = probabilities_to_labels(probs, (8, 8))
    assert torch.equal(same, probs) and np.array_equal(labels, probs.argmax(0).numpy().astype(np.uint8))
    labels, up = probabilities_to_labels(probs, [13, 5])
    assert labels.shape == (13, 5) and labels.dtype == np.uint8 and up.shape == (3, 13, 5)
    assert torch.allclose(up.sum(0), torch.ones(13, 5), atol=1e-5)
    expected = torch.nn.functional.interpolate(probs[None], size=(13, 5), mode="bilinear", align_corners=False)[0]
    assert torch.equal(up, expected)
    logit = torch.tensor([[[[-1.0, 0.0, 2.0]]]])  # BCE: p > 0.5 is foreground, p = 0.5 is not
    labels, _ = probabilities_to_labels(logits_to_probs(logit, "bce")[0], (1, 3))
    assert labels.tolist() == logits_to_labels(logit, "bce")[0].tolist() == [[0, 0, 1]]
    with pytest.raises(MedplanError, match=r"\(K, H, W\)"):
        probabilities_to_labels(probs[None], (8, 8))


# ----------------------------------------------------------------------------- the trainer a run records
def test_a_trainer_for_prediction_is_fully_built_and_touches_nothing(tmp_path):
    from medplan.trainers import Trainer

    trainer = Trainer.for_prediction(tmp_path / "fold_1", arch="unet", plan=make_plan(num_classes=3),
                                     model_options={"depth": 2},
                                     fold="1")
    assert trainer.train_cases == trainer.val_cases == [] and trainer.model is None and not trainer.resuming
    assert trainer.run_dir == RunDir(tmp_path / "fold_1") and not (tmp_path / "fold_1").exists()
    trainer.internal_size = (8, 8)
    seen = []
    model = lambda x: (seen.append(tuple(x.shape[-2:])), torch.zeros(x.shape[0], 3, *x.shape[-2:]))[1]  # noqa: E731
    assert trainer.forward_logits(model, torch.zeros(2, 1, 16, 16)).shape == (2, 3, 16, 16) and seen == [(8, 8)]


def test_inference_honours_the_recorded_trainer(tmp_path):
    from medplan.inference import RETIRED_TRAINERS, recorded_trainer
    from medplan.trainers import Trainer, get_trainer

    where = tmp_path / "checkpoint_best.pt"
    registered = get_trainer("syncsam")
    assert registered is not Trainer
    assert recorded_trainer("syncsam", [None, None], where) is registered  # recorded nothing: as training would
    assert recorded_trainer("syncsam", ["medplan.trainers.base.Trainer", None], where) is Trainer
    assert recorded_trainer("syncsam", [None, registered.__qualname__], where) is registered
    assert recorded_trainer("unet", ["some.moved.module.Trainer"], where) is Trainer
    retired = sorted(RETIRED_TRAINERS)[0]
    assert recorded_trainer("unet", [f"medplan.trainers.gone.{retired}"], where) is get_trainer("unet")
    with pytest.raises(MedplanError) as err:
        recorded_trainer("unet", ["my_plugin.MyTrainer", "MyTrainer"], where)
    message = str(err.value)
    assert "\n" not in message and str(where) in message and "'my_plugin.MyTrainer'" in message
    assert "not installed here" in message


def test_predict_refuses_a_run_of_an_unknown_trainer_or_architecture(tmp_path):
    from test_predict import make_model_dir, tiny_plan

    from medplan.inference import Predictor, load_fold

    model_dir = make_model_dir(tmp_path / "unet", tiny_plan(), folds=(0,))
    fold = RunDir(model_dir / "fold_0")
    assert load_fold(fold.path).forward is not None
    cfg = fold.config()
    atomic_write_json(fold.config_path, {**cfg, "trainer": "elsewhere.LostTrainer"})
    with pytest.raises(MedplanError, match="trained by trainer 'elsewhere.LostTrainer', which is not installed"):
        Predictor.from_folder(model_dir, device="cpu")
    atomic_write_json(fold.config_path, {**cfg, "arch": "no_such_net"})
    from medplan.trainers.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(fold.best)
    state.pop("format")
    save_checkpoint(fold.best, {**state, "arch": "no_such_net"})
    with pytest.raises(MedplanError, match="records architecture 'no_such_net', which is not installed"):
        load_fold(fold.path)
