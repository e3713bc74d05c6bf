"""A run killed at any moment and resumed with --continue ends like the uninterrupted run."""
import json

import pytest
import torch

from medplan.trainers import Trainer, train
from medplan.trainers import checkpointer as trainer_checkpointer
from medplan.trainers.checkpoint import load_checkpoint
from trainer_fixtures import FAST, TINY_MODEL, limit_threads, make_dataset, use_roots

limit_threads()

EPOCHS = 3


class Killed(Exception):
    """Stands in for SIGKILL: raised in the middle of a run, nothing after it runs."""


@pytest.fixture
def toy(tmp_path, monkeypatch):
    use_roots(monkeypatch, tmp_path)
    make_dataset(tmp_path, epochs={"lr_search": 1, "cv": EPOCHS}, lr=1e-2)
    return tmp_path


def run(out, *, continue_training=False):
    return train("TOY", "unet", 0, overrides=FAST, model_options=TINY_MODEL, output_dir=out,
                 continue_training=continue_training)


def comparable(out):
    drop = {"epoch_time", "timestamp"}
    return [{k: v for k, v in json.loads(line).items() if k not in drop}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a, b):
    assert comparable(a) == comparable(b)
    wa, wb = (load_checkpoint(d / "checkpoint_final.pt")["model"] for d in (a, b))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)
    for d in (a, b):
        assert (d / "validation" / "summary.json").is_file() and (d / "progress.png").is_file()
    sa, sb = (json.loads((d / "validation" / "summary.json").read_text()) for d in (a, b))
    assert sa["mIoU"] == pytest.approx(sb["mIoU"]) and sa["best_epoch"] == sb["best_epoch"]


@pytest.fixture
def reference(toy):
    return run(toy / "reference")


def test_resume_after_an_epoch_reproduces_the_uninterrupted_run(toy, reference, monkeypatch):
    def die_at_epoch_2(self, epoch):
        if epoch == 2:
            raise Killed

    out = toy / "interrupted"
    monkeypatch.setattr(Trainer, "on_epoch_start", die_at_epoch_2)
    with pytest.raises(Killed):
        run(out)
    assert load_checkpoint(out / "checkpoint_latest.pt")["epoch"] == 1
    assert not (out / "checkpoint_final.pt").exists()
    monkeypatch.undo()
    use_roots(monkeypatch, toy)
    run(out, continue_training=True)
    assert_same_run(reference, out)
    cfg = json.loads((out / "config.json").read_text())
    assert [r["after_epoch"] for r in cfg["resumes"]] == [1]
    assert "resumed from checkpoint_latest.pt after epoch 1/3" in (out / "training.log").read_text()


def test_kill_between_metrics_and_checkpoint_leaves_no_duplicate_epoch(toy, reference, monkeypatch):
    real_save = trainer_checkpointer.save_checkpoint

    def save_or_die(path, state):
        if path.name == "checkpoint_latest.pt" and state["epoch"] == 2:
            raise Killed  # metrics.jsonl already lists epoch 2, the checkpoint is still at epoch 1
        real_save(path, state)

    out = toy / "interrupted"
    monkeypatch.setattr(trainer_checkpointer, "save_checkpoint", save_or_die)
    with pytest.raises(Killed):
        run(out)
    assert [r["epoch"] for r in comparable(out)] == [1, 2]
    monkeypatch.setattr(trainer_checkpointer, "save_checkpoint", real_save)
    run(out, continue_training=True)
    assert [r["epoch"] for r in comparable(out)] == [1, 2, 3]
    assert_same_run(reference, out)


def test_kill_during_final_validation_resumes_without_more_training(toy, reference, monkeypatch):
    def die(self):
        raise Killed

    out = toy / "interrupted"
    monkeypatch.setattr(Trainer, "predict_validation_cases", die)
    with pytest.raises(Killed):
        run(out)
    assert not (out / "validation").exists()  # the folder is swapped in whole or not at all
    assert load_checkpoint(out / "checkpoint_latest.pt")["training_done"]
    monkeypatch.undo()
    use_roots(monkeypatch, toy)
    run(out, continue_training=True)
    assert_same_run(reference, out)
    assert "epoch 3/3  train_loss" not in (out / "training.log").read_text().split("resumed from")[1]


def test_continue_without_a_checkpoint_starts_fresh(toy, capsys):
    out = toy / "fresh"
    train("TOY", "unet", 0, overrides={**FAST, "epochs": 1}, model_options=TINY_MODEL, output_dir=out,
          continue_training=True)
    assert "no checkpoint_latest.pt yet" in capsys.readouterr().out
    assert (out / "validation" / "summary.json").is_file()


def test_continue_keeps_the_runs_budget(toy, reference, monkeypatch):
    def die_at_epoch_2(self, epoch):
        if epoch == 2:
            raise Killed

    out = toy / "interrupted"
    monkeypatch.setattr(Trainer, "on_epoch_start", die_at_epoch_2)
    with pytest.raises(Killed):
        run(out)
    monkeypatch.undo()
    use_roots(monkeypatch, toy)
    train("TOY", "unet", 0, overrides={**FAST, "epochs": 10}, model_options=TINY_MODEL, output_dir=out,
          continue_training=True)
    assert len(comparable(out)) == EPOCHS
    assert "keeps the run's epochs 3" in (out / "training.log").read_text()
