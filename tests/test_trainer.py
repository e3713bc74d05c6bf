"""The base trainer end to end on a tiny synthetic dataset (CPU, seconds)."""
import importlib.metadata
import json

import numpy as np
import pytest
import torch

from medplan.cli.train import main as train_main
from medplan.errors import MedplanError
from medplan.io import atomic_write_json, read_image
from medplan.plan import make_plan
from medplan.architectures import build_model
from medplan.trainers import EarlyStopping, Trainer, get_trainer, list_trainers, lr_tag, register_trainer, train, tune
from medplan.trainers import registry as trainer_registry
from medplan.trainers.checkpoint import load_checkpoint
from medplan.trainers.losses import build_loss
from trainer_fixtures import FAST, TINY_MODEL, limit_threads, make_dataset, use_roots

limit_threads()

RUN_FILES = ["checkpoint_best.pt", "checkpoint_final.pt", "checkpoint_latest.pt", "config.json",
             "metrics.jsonl", "progress.png", "training.log"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 12-epoch run of a tiny U-Net on fold 0, shared by the tests that only read its folder."""
    root = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        use_roots(mp, root)
        make_dataset(root, epochs={"lr_search": 2, "cv": 12}, lr=1e-2)
        out = train("TOY", "unet", 0, overrides=FAST, model_options=TINY_MODEL)
        yield root, out


@pytest.fixture
def toy(tmp_path, monkeypatch):
    use_roots(monkeypatch, tmp_path)
    make_dataset(tmp_path, epochs={"lr_search": 1, "cv": 2}, lr=1e-2)
    return tmp_path


def test_training_lowers_loss_and_beats_the_trivial_predictor(trained):
    _, out = trained
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, 13))
    assert records[-1]["train_loss"] < 0.8 * records[0]["train_loss"]
    summary = json.loads((out / "validation" / "summary.json").read_text())
    # the all-background predictor scores mDSC = mIoU = 0 (background is excluded)
    assert summary["mDSC"] > 0.6 and summary["mIoU"] > 0.4
    assert summary["at_input_size"]["mIoU"] == pytest.approx(max(r["val_mIoU"] for r in records))


def test_results_folder_is_complete(trained):
    root, out = trained
    assert out == root / "results" / "TOY" / "unet" / "fold_0"
    from medplan.trainers.tensorboard import TENSORBOARD_DIR, summary_writer_class

    watched = [TENSORBOARD_DIR] if summary_writer_class() is not None else []  # event files with medplan[tb]
    assert sorted(p.name for p in out.iterdir()) == sorted(RUN_FILES + ["validation"] + watched)
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert {"epoch", "train_loss", "val_loss", "val_mIoU", "val_mDSC", "lr", "epoch_time", "timestamp"} <= set(record)
    assert (out / "progress.png").read_bytes()[:4] == b"\x89PNG"
    log = (out / "training.log").read_text()
    assert "epoch 12/12" in log and "val_mIoU" in log

    splits = json.loads((root / "preprocessed" / "TOY" / "splits.json").read_text())
    val = splits[0]["val"]
    pngs = sorted(p.stem for p in (out / "validation").glob("*.png"))
    assert pngs == sorted(val)
    for case in val:  # every prediction at the case's original size, class indices only
        pred = read_image(out / "validation" / f"{case}.png")
        gt = read_image(root / "raw" / "TOY" / "labels" / f"{case}.png")
        assert pred.shape == gt.shape and pred.dtype == np.uint8 and set(np.unique(pred)) <= {0, 1}
    summary = json.loads((out / "validation" / "summary.json").read_text())
    assert {"mDSC", "mIoU", "mRec", "mPrec", "per_class", "n_cases", "per_case", "at_input_size"} <= set(summary)
    assert summary["n_cases"] == len(val) and set(summary["per_case"]) == set(val)
    assert set(summary["per_class"]) == {"square"}

    best, final = (load_checkpoint(out / n) for n in ("checkpoint_best.pt", "checkpoint_final.pt"))
    assert final["epoch"] == 12 and final["training_done"]
    assert best["epoch"] == summary["best_epoch"] == best["best_epoch"]
    latest = load_checkpoint(out / "checkpoint_latest.pt")
    assert {"optimizer", "scheduler", "scaler", "early_stopping", "rng", "history"} <= set(latest)


def test_config_records_the_exact_settings(trained):
    _, out = trained
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["lr"] == 1e-2 and cfg["lr_source"] == "plan"
    assert cfg["seed"] == 12345 and cfg["device"] == "cpu" and cfg["amp"] is None
    assert cfg["epochs"] == 12 and cfg["batch_size"] == 4 and cfg["world_size"] == 1
    assert cfg["plan"]["dataset"] == "TOY" and cfg["model_options"] == TINY_MODEL
    assert cfg["parameters"]["total"] > 0 and cfg["deviations"] == []
    assert {"python", "torch", "numpy", "medplan", "timm"} <= set(cfg["versions"])
    assert cfg["n_train"] == 8 and cfg["n_val"] == 4 and "command_line" in cfg and "hostname" in cfg


def test_continue_on_a_finished_run_does_nothing(trained, capsys, monkeypatch):
    root, out = trained
    use_roots(monkeypatch, root)
    before = (out / "checkpoint_final.pt").stat().st_mtime_ns
    code = train_main(["TOY", "unet", "0", "--continue", "--device", "cpu", "--model-opt", "base_channels=4",
                       "--model-opt", "depth=2"])
    assert code == 0
    assert "already complete" in capsys.readouterr().out
    assert (out / "checkpoint_final.pt").stat().st_mtime_ns == before


def test_a_finished_run_is_not_overwritten_without_force(trained, capsys, monkeypatch):
    root, out = trained
    use_roots(monkeypatch, root)
    before = (out / "validation" / "summary.json").read_bytes()
    code = train_main(["TOY", "unet", "0", "--device", "cpu", "--model-opt", "base_channels=4", "--model-opt", "depth=2"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--continue" in err and "--force" in err and "fold_0" in err
    assert (out / "validation" / "summary.json").read_bytes() == before


def test_bad_input_names_what_is_wrong(toy, capsys):
    with pytest.raises(MedplanError, match="NOPE"):
        train("NOPE", "unet", 0, overrides=FAST)
    with pytest.raises(MedplanError, match="no_such_net"):
        train("TOY", "no_such_net", 0, overrides=FAST)
    with pytest.raises(MedplanError, match="fold 7 is out of range.*3 folds"):
        train("TOY", "unet", 7, overrides=FAST)
    with pytest.raises(MedplanError, match="'x'"):
        train("TOY", "unet", "x", overrides=FAST)
    with pytest.raises(MedplanError, match="unknown training setting"):
        train("TOY", "unet", 0, overrides={"learning_rate": 1})
    assert train_main(["TOY", "unet", "5", "--device", "cpu"]) == 2
    assert "fold 5" in capsys.readouterr().err
    assert not (toy / "results" / "TOY").exists()  # nothing written for bad input


def test_fold_all_trains_without_validation_and_forced_rerun(toy):
    out = train("TOY", "unet", "all", overrides={**FAST, "epochs": 1}, model_options=TINY_MODEL)
    assert out.name == "fold_all" and not (out / "validation").exists()
    record = json.loads((out / "metrics.jsonl").read_text())
    assert record["val_mIoU"] is None and json.loads((out / "config.json").read_text())["n_train"] == 12
    best, final = (load_checkpoint(out / n) for n in ("checkpoint_best.pt", "checkpoint_final.pt"))
    assert all(torch.equal(best["model"][k], final["model"][k]) for k in final["model"])
    with pytest.raises(MedplanError, match="--force"):
        train("TOY", "unet", "all", overrides={**FAST, "epochs": 1}, model_options=TINY_MODEL)
    (out / "stale_marker").write_text("kept: not a run file")
    train("TOY", "unet", "all", overrides={**FAST, "epochs": 2, "force": True}, model_options=TINY_MODEL)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_registered_trainer_overrides_hooks_and_records_deviations(toy, monkeypatch):
    trainer_registry.TRAINERS.load_plugins()  # built-ins first: only this test's registration is undone
    monkeypatch.setattr(trainer_registry.TRAINERS, "_entries", dict(trainer_registry.TRAINERS._entries))
    calls = []

    @register_trainer("unet_small")
    class SmallInternalTrainer(Trainer):
        internal_size = (16, 16)
        deviations = ["runs the network at 16x16 internally"]

        def forward_logits(self, model, images):
            calls.append(tuple(images.shape[-2:]))
            return super().forward_logits(model, images)

    assert get_trainer("unet_small") is SmallInternalTrainer and get_trainer("unet") is Trainer
    assert list_trainers()["unet_small"] == "test_registered_trainer_overrides_hooks_and_records_deviations.<locals>.SmallInternalTrainer"
    out = train("TOY", "unet_small", 1, overrides={**FAST, "epochs": 1}, model_options={"base_channels": 4, "depth": 2})
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["deviations"] == ["runs the network at 16x16 internally"]
    assert cfg["internal_size"] == [16, 16] and cfg["trainer"].endswith("SmallInternalTrainer")
    assert calls and all(shape == (32, 32) for shape in calls)  # the trainer still sees the planned size
    for case in json.loads((out / "config.json").read_text())["val_cases"]:
        assert read_image(out / "validation" / f"{case}.png").shape in ((36, 36), (40, 48))


def test_trainers_register_through_entry_points(monkeypatch):
    class EP:  # a plug-in trainer for a registered architecture (see tests/test_registry.py for the rules)
        name, value = "unet_small", "somewhere:Thing"

        def load(self):
            class EntryPointTrainer(Trainer):
                pass
            return EntryPointTrainer

    registry = trainer_registry.TRAINERS
    registry.load_plugins()  # the built-ins and the real plug-ins first; then the fake entry point
    monkeypatch.setattr(registry, "_entries", dict(registry._entries))
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group=None, **kw: [EP()] if group == "medplan.trainers" else [])
    assert get_trainer("unet_small").__name__ == "EntryPointTrainer"
    with pytest.raises(TypeError):
        register_trainer("bad")(object)


def test_lr_search_then_cv_uses_the_chosen_lr(toy):
    result = tune("TOY", "unet", lrs=[1e-2, 1e-5], epochs=1, overrides=FAST, model_options=TINY_MODEL)
    arch_dir = toy / "results" / "TOY" / "unet"
    saved = json.loads((arch_dir / "lr_search.json").read_text())
    assert saved["grid"] == [1e-2, 1e-5] and saved["epochs"] == 1 and saved["fold"] == 0
    assert set(saved["results"]) == {"1e-02", "1e-05"} and saved["best_lr"] in (1e-2, 1e-5)
    assert saved["results"][lr_tag(saved["best_lr"])] == max(saved["results"].values())
    assert result["best_lr"] == saved["best_lr"]
    for tag in ("1e-02", "1e-05"):
        assert (arch_dir / "lr_search" / f"lr_{tag}" / "fold_0" / "validation" / "summary.json").is_file()
    assert not (arch_dir / "fold_0").exists()
    # a rerun skips the finished LR runs
    ckpt = arch_dir / "lr_search" / "lr_1e-02" / "fold_0" / "checkpoint_final.pt"
    before = ckpt.stat().st_mtime_ns
    tune("TOY", "unet", lrs=[1e-2, 1e-5], epochs=1, overrides=FAST, model_options=TINY_MODEL)
    assert ckpt.stat().st_mtime_ns == before

    atomic_write_json(arch_dir / "lr_search.json", {**saved, "best_lr": 1e-3})
    out = train("TOY", "unet", 0, overrides={**FAST, "epochs": 1}, model_options=TINY_MODEL)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["lr"] == 1e-3 and cfg["lr_source"].endswith("lr_search.json")
    out = train("TOY", "unet", 0, overrides={**FAST, "epochs": 1, "lr": 2e-3, "force": True}, model_options=TINY_MODEL)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["lr"] == 2e-3 and cfg["lr_source"] == "command line"


def test_multiclass_uses_cross_entropy(tmp_path, monkeypatch):
    use_roots(monkeypatch, tmp_path)
    make_dataset(tmp_path, num_classes=3, epochs={"lr_search": 1, "cv": 1})
    out = train("TOY", "unet", 2, overrides=FAST, model_options=TINY_MODEL)
    summary = json.loads((out / "validation" / "summary.json").read_text())
    assert set(summary["per_class"]) == {"square", "disc"}
    final = load_checkpoint(out / "checkpoint_final.pt")
    model = build_model("unet", 1, 3, **TINY_MODEL)
    model.load_state_dict(final["model"])
    assert model(torch.zeros(1, 1, 32, 32)).shape == (1, 3, 32, 32)  # K logits for ce


def test_early_stopping_counts_only_improvements_above_min_delta():
    es = EarlyStopping("val_mIoU", "max", patience=2, min_delta=0.01)
    assert [es.step(v, e) for e, v in enumerate([0.5, 0.505, 0.52, 0.525, 0.529], 1)] == [False, False, False, False, True]
    assert (es.best, es.best_epoch, es.stopped_epoch) == (0.52, 3, 5)
    clone = EarlyStopping()
    clone.load_state_dict(es.state_dict())
    assert clone.state_dict() == es.state_dict()


def test_early_stopping_ends_the_run_complete(tmp_path, monkeypatch):
    use_roots(monkeypatch, tmp_path)
    make_dataset(tmp_path, epochs={"lr_search": 1, "cv": 6}, lr=1e-7, patience=1)
    out = train("TOY", "unet", 0, overrides=FAST, model_options=TINY_MODEL)
    records = (out / "metrics.jsonl").read_text().splitlines()
    assert len(records) < 6
    assert "early stopping" in (out / "training.log").read_text()
    assert load_checkpoint(out / "checkpoint_final.pt")["epoch"] == len(records)
    assert (out / "validation" / "summary.json").is_file()


def test_losses_follow_the_plan():
    seg = torch.tensor([[[0, 1], [1, 0]]])
    bce = build_loss(make_plan(num_classes=2))  # bce, one output
    good = (seg.float() * 2 - 1)[:, None] * 20  # confident and right
    assert bce(good, seg) < 1e-6 < bce(-good, seg)
    ce = build_loss(make_plan(num_classes=3))  # ce, three outputs
    logits = torch.nn.functional.one_hot(seg, 3).permute(0, 3, 1, 2).float() * 20
    assert ce(logits, seg) < 1e-6
    with pytest.raises(RuntimeError, match="expects 3"):
        ce(logits[:, :2], seg)
    with pytest.raises(MedplanError, match="'loss' must be one of bce, ce"):  # refused with the plan
        make_plan(loss="dice")


# ----------------------------------------------------------------------------- progress output
def test_progress_png_names_the_run_and_counts_whole_epochs(trained):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from medplan.trainers.progress import progress_figure, progress_title, read_metrics

    _, out = trained
    history = read_metrics(out / "metrics.jsonl")
    title = progress_title("TOY", "unet", 0)
    assert title == "TOY / unet / fold 0"
    assert progress_title("TOY", "unet", 0, lr=1e-3) == "TOY / unet / fold 0 (LR search, lr 0.001)"
    for records in (history, history[:2], history[:1]):  # few epochs: matplotlib would pick 1.25, 1.5, ...
        fig = progress_figure(records, title)
        FigureCanvasAgg(fig).draw()
        assert fig._suptitle.get_text() == title
        for ax in fig.axes:
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert ticks and all(float(t).is_integer() for t in ticks)


def test_the_run_log_shows_the_whole_runs_eta(trained):
    _, out = trained
    lines = [ln for ln in (out / "training.log").read_text().splitlines() if " epoch " in ln and "train_loss" in ln]
    assert len(lines) == 12
    assert "| run left" in lines[0] and "11 epochs x" in lines[0]
    assert "run left" not in lines[-1]  # the budget is spent


def test_run_eta_counts_remaining_epochs_at_the_measured_epoch_time():
    from medplan.trainers.progress import format_duration, format_eta, run_eta

    eta = run_eta([30.0, 10.0, 12.0], epochs_done=3, total_epochs=10)
    assert (eta.epochs_left, eta.epoch_seconds, eta.seconds_left) == (7, 12.0, 84.0)  # median of the epoch times
    assert eta.earliest_stop_epoch is None and format_eta(eta) == "run left ~1m24s (7 epochs x 12s)"
    # the median of the latest five epochs: an early slow epoch (warm-up, compilation) stops counting
    eta = run_eta([500.0, 60.0, 60.0, 60.0, 60.0, 60.0], epochs_done=6, total_epochs=100)
    assert eta.seconds_left == 94 * 60.0 and format_eta(eta) == "run left ~1h34m (94 epochs x 1m00s)"
    # early stopping can end it after patience_left more epochs without improvement
    eta = run_eta([100.0] * 4, epochs_done=4, total_epochs=150, patience_left=30)
    assert (eta.seconds_left, eta.earliest_stop_epoch, eta.seconds_to_earliest_stop) == (14600.0, 34, 3000.0)
    assert format_eta(eta) == ("run left <= 4h03m (146 epochs x 1m40s; 50m00s if early stopping ends it at "
                               "epoch 34)")
    # patience beyond the budget does not shorten it
    assert run_eta([100.0] * 4, epochs_done=4, total_epochs=10, patience_left=30).earliest_stop_epoch is None
    assert run_eta([], epochs_done=0, total_epochs=10) is None and run_eta([5.0], 10, 10) is None
    assert format_eta(None) == ""
    assert [format_duration(s) for s in (0, 0.25, 4.5, 9.96, 59.4, 61, 3600, 90061)] == [
        "0s", "0.2s", "4.5s", "10s", "59s", "1m01s", "1h00m", "1d01h"]
