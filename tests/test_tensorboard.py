"""Training you can watch: TensorBoard event files beside metrics.jsonl, with the same numbers,
switched off on request, absent (and harmless) without the package, appended sensibly on resume."""
import json
import sys

import numpy as np
import pytest
import torch

from medplan.trainers import train
from medplan.trainers import checkpointer as trainer_checkpointer
from medplan.trainers.tensorboard import (IMAGES_PER_S_TAG, OVERLAY_TAG, SCALAR_TAGS, TENSORBOARD_DIR,
                                          TensorBoardLog, event_files, overlay_panel)
from trainer_fixtures import FAST, TINY_MODEL, limit_threads, make_dataset, use_roots

limit_threads()


class Killed(Exception):
    """Stands in for SIGKILL in the middle of a run."""


@pytest.fixture
def toy(tmp_path, monkeypatch):
    use_roots(monkeypatch, tmp_path)
    make_dataset(tmp_path, epochs={"lr_search": 1, "cv": 2}, lr=1e-2)
    return tmp_path


def run(out=None, continue_training=False, **overrides):
    return train("TOY", "unet", 0, overrides={**FAST, **overrides}, model_options=TINY_MODEL, output_dir=out,
                 continue_training=continue_training)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def accumulator(folder):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def scalars(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_a_run_streams_the_numbers_of_metrics_jsonl(toy):
    pytest.importorskip("tensorboard")
    out = run()
    records = metrics(out)
    assert [r["epoch"] for r in records] == [1, 2]
    assert len(event_files(out / TENSORBOARD_DIR)) == 1
    acc = accumulator(out / TENSORBOARD_DIR)
    for key in ("train_loss", "val_loss", "val_mIoU", "val_mDSC", "lr", "epoch_time"):
        got = scalars(acc, SCALAR_TAGS[key])
        assert [s for s, _ in got] == [1, 2], key
        assert [v for _, v in got] == pytest.approx([r[key] for r in records], rel=1e-6), key  # float32 in events
    assert all(v > 0 for _, v in scalars(acc, IMAGES_PER_S_TAG))
    images = acc.Images(OVERLAY_TAG)
    assert [e.step for e in images] == [1, 2] and images[0].height > 32 and images[0].width > 3 * 32
    log = (out / "training.log").read_text()
    assert log.count("TensorBoard: ") == 1 and "tensorboard --logdir" in log


def test_switched_off_writes_no_event_file(toy):
    out = run(tensorboard=False)
    assert not (out / TENSORBOARD_DIR).exists() and (out / "checkpoint_final.pt").is_file()
    assert "TensorBoard" not in (out / "training.log").read_text()


def test_without_the_package_the_run_succeeds_and_says_so_once(toy, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    out = run()
    assert not (out / TENSORBOARD_DIR).exists()
    assert [r["epoch"] for r in metrics(out)] == [1, 2] and (out / "validation" / "summary.json").is_file()
    assert (out / "training.log").read_text().count("TensorBoard: not installed") == 1


def test_resume_after_a_kill_leaves_one_value_per_epoch(toy, monkeypatch):
    """Killed after epoch 2's metrics (and events) but before its checkpoint: the resumed run
    trains epoch 2 again and TensorBoard shows its new numbers, not both."""
    pytest.importorskip("tensorboard")
    make_dataset(toy, epochs={"lr_search": 1, "cv": 3}, lr=1e-2)
    real_save = trainer_checkpointer.save_checkpoint

    def save_or_die(path, state):
        if path.name == "checkpoint_latest.pt" and state["epoch"] == 2:
            raise Killed
        real_save(path, state)

    out = toy / "interrupted"
    monkeypatch.setattr(trainer_checkpointer, "save_checkpoint", save_or_die)
    with pytest.raises(Killed):
        run(out)
    assert [s for s, _ in scalars(accumulator(out / TENSORBOARD_DIR), "train/loss")] == [1, 2]
    monkeypatch.setattr(trainer_checkpointer, "save_checkpoint", real_save)
    run(out, continue_training=True)
    records = metrics(out)
    got = scalars(accumulator(out / TENSORBOARD_DIR), "val/mIoU")
    assert [s for s, _ in got] == [1, 2, 3]
    assert [v for _, v in got] == pytest.approx([r["val_mIoU"] for r in records], rel=1e-6)


def test_a_fresh_start_drops_the_curves_of_an_earlier_run(tmp_path):
    pytest.importorskip("tensorboard")
    said = []
    for value in (5.0, 1.0):
        board = TensorBoardLog(tmp_path, enabled=True, first_epoch=1, say=said.append)
        assert board.open()
        for epoch in (1, 2):
            board.write_epoch({"epoch": epoch, "train_loss": value + epoch})
        board.close()
    assert len(event_files(tmp_path)) == 1
    assert scalars(accumulator(tmp_path), "train/loss") == [(1, 2.0), (2, 3.0)]
    assert TensorBoardLog(tmp_path, enabled=False, first_epoch=1, say=said.append).open() is False
    assert len(said) == 2  # one line per opened stream, none when switched off


def test_overlay_panel_lays_out_image_truth_and_prediction():
    image = np.zeros((1, 40, 20), np.uint8)
    label = np.zeros((40, 20), np.uint8)
    label[:10] = 1
    pred = np.zeros((40, 20), np.uint8)
    panel = overlay_panel([("a", image, label, pred), ("b", np.zeros((3, 40, 20), np.uint8), pred, label)], tile=20)
    # tiles subsampled to 20 x 10, three per row with 2-pixel gaps, two rows with a gap
    assert panel.shape == (20 + 2 + 20, 3 * 10 + 2 * 2, 3) and panel.dtype == np.uint8
    assert panel[0, 12:22].any() and not panel[0, :10].any() and not panel[0, 24:].any()  # case a: truth painted
    assert panel[22, 24:].any() and not panel[22, 12:22].any()  # case b: prediction painted


def test_status_points_at_the_report_and_tensorboard_once_they_exist(tmp_path):
    from medplan.study.status import format_status, watch_hints

    row = {"dataset": "TOY", "arch": "unet", "stage": "fold_0", "state": "partial", "job": "-", "time_s": 12.0,
           "best_val_mIoU": 0.5, "log": None, "stale": None}
    assert watch_hints(tmp_path) == [] and format_status([row], tmp_path).splitlines()[0].startswith("dataset")
    board = tmp_path / "TOY" / "unet" / "lr_search" / "lr_1e-03" / "fold_0" / TENSORBOARD_DIR
    board.mkdir(parents=True)
    (board / "notes.txt").write_text("not an event file")
    assert watch_hints(tmp_path) == []
    (board / "events.out.tfevents.1.host.1.0").write_bytes(b"")
    assert watch_hints(tmp_path) == [f"watch training: tensorboard --logdir {tmp_path}"]
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "index.html").write_text("<html></html>")
    lines = format_status([row], tmp_path).splitlines()
    assert lines[:3] == [f"report: {tmp_path / 'report' / 'index.html'}",
                         f"watch training: tensorboard --logdir {tmp_path}", ""]
    assert lines[-1] == "1 partial"  # the table still ends with the count per state


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_peak_gpu_memory_is_streamed(toy):
    from medplan.trainers.tensorboard import GPU_MEMORY_TAG

    pytest.importorskip("tensorboard")
    out = run(device="cuda")
    got = scalars(accumulator(out / TENSORBOARD_DIR), GPU_MEMORY_TAG)
    assert [s for s, _ in got] == [1, 2] and all(0 < v < 200 for _, v in got)  # GiB
