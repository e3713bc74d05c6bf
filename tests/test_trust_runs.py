"""Issue 11, items 8 and 9 (runs): an interrupted run is never deleted without --force, a start
that fails before its first epoch leaves nothing behind, and --continue after a kill before
the first checkpoint restarts with the killed run's recorded settings."""
import json

import pytest
import torch

from medplan.cli.train import main as train_main
from medplan.errors import MedplanError
from medplan.trainers import Trainer, train
from medplan.trainers.checkpoint import load_checkpoint
from trainer_fixtures import FAST, TINY_MODEL, limit_threads, make_dataset, use_roots

limit_threads()

TINY_ARGS = ["--device", "cpu", "--num-workers", "0", "--no-progress", "--model-opt", "base_channels=4",
             "--model-opt", "depth=2"]


class Killed(BaseException):
    """Stands in for SIGKILL: nothing of the run's own error handling reacts to it."""


@pytest.fixture
def toy(tmp_path, monkeypatch):
    use_roots(monkeypatch, tmp_path)
    make_dataset(tmp_path, epochs={"lr_search": 1, "cv": 3}, lr=1e-2)
    return tmp_path


def fold_dir(root):
    return root / "results" / "TOY" / "unet" / "fold_0"


def die_at(epoch_to_die, exc=Killed):
    def on_epoch_start(self, epoch):
        if epoch == epoch_to_die:
            raise exc

    return on_epoch_start


def comparable(out):
    drop = {"epoch_time", "timestamp"}
    return [{k: v for k, v in json.loads(line).items() if k not in drop}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ----------------------------------------------------------------------------- interrupted runs


def test_an_interrupted_run_is_refused_without_continue_or_force(toy, monkeypatch, capsys):
    out = fold_dir(toy)
    with monkeypatch.context() as m:
        m.setattr(Trainer, "on_epoch_start", die_at(2))
        with pytest.raises(Killed):
            train("TOY", "unet", 0, overrides=FAST, model_options=TINY_MODEL)
    before = snapshot(out)
    assert "checkpoint_latest.pt" in before and not (out / ".lock").exists()
    capsys.readouterr()
    assert train_main(["TOY", "unet", "0", *TINY_ARGS]) == 2
    line = one_line(capsys.readouterr().err)
    assert "holds an interrupted run (epoch 1/3)" in line
    assert "resume with --continue or start over with --force" in line and "fold_0" in line
    assert snapshot(out) == before  # nothing deleted
    assert train_main(["TOY", "unet", "0", "--continue", *TINY_ARGS]) == 0
    assert [r["epoch"] for r in comparable(out)] == [1, 2, 3]


def test_force_starts_an_interrupted_run_over(toy, monkeypatch, capsys):
    out = fold_dir(toy)
    with monkeypatch.context() as m:
        m.setattr(Trainer, "on_epoch_start", die_at(2))
        with pytest.raises(Killed):
            train("TOY", "unet", 0, overrides=FAST, model_options=TINY_MODEL)
    assert train_main(["TOY", "unet", "0", "--force", "--epochs", "1", *TINY_ARGS]) == 0
    assert "removing the files of an earlier run" in capsys.readouterr().err
    assert [r["epoch"] for r in comparable(out)] == [1]
    assert json.loads((out / "config.json").read_text())["epochs"] == 1


# ----------------------------------------------------------------------------- failed starts


@pytest.mark.parametrize("bad", [["--model-opt", "no_such_option=1"], ["--pretrained", "/nowhere/weights.pth"]])
def test_a_start_that_fails_before_training_leaves_no_fold_behind(toy, capsys, bad):
    assert train_main(["TOY", "unet", "0", *TINY_ARGS, *bad]) == 2
    one_line(capsys.readouterr().err)
    assert not (toy / "results" / "TOY").exists()  # no fold for a report to list as 0/5


def test_a_start_that_fails_in_its_first_epoch_removes_what_it_wrote(toy, monkeypatch):
    out = fold_dir(toy)
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("the user's own file")

    def broken_step(self, batch):
        raise MedplanError("a corrupt array")

    monkeypatch.setattr(Trainer, "train_step", broken_step)
    with pytest.raises(MedplanError, match="corrupt array"):
        train("TOY", "unet", 0, overrides=FAST, model_options=TINY_MODEL)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    (out / "notes.txt").unlink()
    with pytest.raises(MedplanError, match="corrupt array"):
        train("TOY", "unet", 0, overrides=FAST, model_options=TINY_MODEL)
    assert not out.exists()  # left empty: removed


def test_force_with_bad_input_keeps_the_finished_run(toy, capsys):
    out = train("TOY", "unet", 0, overrides={**FAST, "epochs": 1}, model_options=TINY_MODEL)
    before = snapshot(out)
    assert train_main(["TOY", "unet", "0", "--force", *TINY_ARGS, "--model-opt", "no_such_option=1"]) == 2
    assert "no_such_option" in one_line(capsys.readouterr().err)
    assert snapshot(out) == before


def test_ctrl_c_keeps_the_run_and_releases_its_lock(toy, monkeypatch):
    out = fold_dir(toy)
    with monkeypatch.context() as m:
        m.setattr(Trainer, "on_epoch_start", die_at(2, KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            train("TOY", "unet", 0, overrides=FAST, model_options=TINY_MODEL)
    assert (out / "checkpoint_latest.pt").is_file() and not (out / ".lock").exists()
    train("TOY", "unet", 0, overrides=FAST, model_options=TINY_MODEL, continue_training=True)
    assert (out / "validation" / "summary.json").is_file() and not (out / ".lock").exists()


# ----------------------------------------------------------------------------- --continue before a checkpoint


def test_continue_before_the_first_checkpoint_restarts_with_the_recorded_settings(toy, monkeypatch, capsys):
    settings = {**FAST, "epochs": 2, "lr": 3e-3, "seed": 7, "batch_size": 2}
    reference = train("TOY", "unet", 0, overrides=settings, model_options=TINY_MODEL, output_dir=toy / "reference")

    out = fold_dir(toy)
    with monkeypatch.context() as m:
        m.setattr(Trainer, "on_epoch_start", die_at(1))
        with pytest.raises(Killed):
            train("TOY", "unet", 0, overrides=settings, model_options=TINY_MODEL)
    assert (out / "config.json").is_file() and not (out / "checkpoint_latest.pt").exists()
    capsys.readouterr()
    # the command a user types after the kill: none of the run's flags repeated
    assert train_main(["TOY", "unet", "0", "--continue", "--device", "cpu", "--num-workers", "0",
                       "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "restarting the run from scratch with the settings its config.json recorded" in said
    assert "lr 0.003, epochs 2, batch 2, seed 7" in said
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["lr"], cfg["epochs"], cfg["batch_size"], cfg["seed"]) == (3e-3, 2, 2, 7)
    assert {k: cfg["model_options"][k] for k in TINY_MODEL} == TINY_MODEL
    assert comparable(out) == comparable(reference)
    wa, wb = (load_checkpoint(d / "checkpoint_final.pt")["model"] for d in (out, reference))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert "restarting the run" in (out / "training.log").read_text()


def test_continue_refuses_a_tampered_config_before_touching_the_folder(toy, monkeypatch, capsys):
    out = fold_dir(toy)
    with monkeypatch.context() as m:
        m.setattr(Trainer, "on_epoch_start", die_at(1))
        with pytest.raises(Killed):
            train("TOY", "unet", 0, overrides=FAST, model_options=TINY_MODEL)
    cfg = json.loads((out / "config.json").read_text())
    cfg["epochs"] = "many"
    (out / "config.json").write_text(json.dumps(cfg))
    before = snapshot(out)
    assert train_main(["TOY", "unet", "0", "--continue", *TINY_ARGS]) == 2
    line = one_line(capsys.readouterr().err)
    assert "config.json" in line and "epochs" in line and "--force" in line
    assert snapshot(out) == before
