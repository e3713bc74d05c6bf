"""The study driver: stale folds are never counted as complete nor retrained silently; job
outcomes come from JSON the job writes, never from unpickling."""
from __future__ import annotations

import json
import pickle

import pytest

from medplan import study as st
from medplan.cli.benchmark import main
from trainer_fixtures import make_dataset, use_roots

TINY = ["--model-opt", "unet:base_channels=4", "--model-opt", "unet:depth=2", "--device", "cpu",
        "--num-workers", "0", "--measure-steps", "1", "--poll", "0.2"]


@pytest.fixture
def toy(tmp_path, monkeypatch):
    use_roots(monkeypatch, tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    make_dataset(tmp_path, "TOY", n_cases=6, n_folds=2, lr=3e-3, lr_grid=[3e-3, 1e-3],
                 epochs={"lr_search": 1, "cv": 1})
    return tmp_path


def _fold(toy, k=0):
    return toy / "results" / "TOY" / "unet" / f"fold_{k}"


def _edit_config(fold, **changes):
    cfg = json.loads((fold / "config.json").read_text())
    cfg.update(changes)
    (fold / "config.json").write_text(json.dumps(cfg))


def test_a_fold_trained_at_another_lr_is_stale_listed_and_not_retrained_silently(toy, capsys):
    assert main(["-d", "TOY", "-a", "unet", "--executor", "inline", "--no-lr-search", "--folds", "0", *TINY]) == 0
    fold = _fold(toy)
    assert st.fold_complete(fold)
    _edit_config(fold, lr=0.5)  # as if trained at another LR
    final = fold / "checkpoint_final.pt"
    mtime = final.stat().st_mtime_ns
    capsys.readouterr()

    assert main(["--status"]) == 0
    out = capsys.readouterr().out
    row = next(ln for ln in out.splitlines() if "fold_0" in ln and "stale:" not in ln).split()
    assert row[:4] == ["TOY", "unet", "fold_0", "stale"]
    assert "TOY/unet/fold_0: stale: lr 0.5 (study: 0.003)" in out and "--rerun-stale" in out

    assert main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "TOY/unet/fold_0" in out and "STALE: lr 0.5 (study: 0.003)" in out
    assert "a run refuses until you pass --rerun-stale" in out

    study = st.load_study()
    assert st.completed_folds(study) == [] and not st.is_done(study, st.Task("fold", "TOY", "unet", 0))

    # a run refuses before submitting anything, saying how
    assert main([]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "1 fold(s) were trained with other settings" in err and "TOY/unet/fold_0: lr 0.5" in err
    assert "--rerun-stale" in err
    assert final.stat().st_mtime_ns == mtime  # untouched
    assert json.loads(st.study_path().read_text())["jobs"]["TOY/unet/fold_0"]["attempt"] == 1

    # on purpose: retrained at the study's LR, then done
    assert main(["--rerun-stale"]) == 0
    cfg = json.loads((fold / "config.json").read_text())
    assert cfg["lr"] == pytest.approx(3e-3) and final.stat().st_mtime_ns != mtime
    assert st.is_done(st.load_study(), st.Task("fold", "TOY", "unet", 0))
    capsys.readouterr()
    assert main([]) == 0 and "submitting" not in capsys.readouterr().err


@pytest.mark.parametrize("change, shown", [
    ({"epochs": 7}, "epochs 7 (study: 1)"),
    ({"model_options": {"base_channels": 8, "depth": 2}}, "model options"),
    ({"plan": {"dataset": "TOY", "lr": 1.0}}, "another plan"),
])
def test_other_recorded_settings_make_a_fold_stale(toy, change, shown):
    assert main(["-d", "TOY", "-a", "unet", "--executor", "inline", "--no-lr-search", "--folds", "0", *TINY]) == 0
    study = st.load_study()
    task = st.Task("fold", "TOY", "unet", 0)
    assert st.stale_reasons(study, task) == [] and st.is_done(study, task)
    _edit_config(_fold(toy), **change)
    why = st.stale_reasons(study, task)
    assert why and shown in "; ".join(why) and not st.is_done(study, task)


def test_a_fold_found_stale_after_the_lr_search_is_reported_not_retrained(toy, capsys):
    """The LR search reruns and picks an LR; a complete fold recorded at another LR is then
    blocked (reported with the advice) instead of counted or retrained."""
    assert main(["-d", "TOY", "-a", "unet", "--executor", "inline", *TINY]) == 0
    best = json.loads((toy / "results" / "TOY" / "unet" / "lr_search.json").read_text())["best_lr"]
    other = 1e-3 if best != 1e-3 else 3e-3
    (toy / "results" / "TOY" / "unet" / "lr_search.json").unlink()  # the search must run again
    _edit_config(_fold(toy, 0), lr=other)
    mtime = (_fold(toy, 0) / "checkpoint_final.pt").stat().st_mtime_ns
    capsys.readouterr()
    assert main([]) == 1
    err = capsys.readouterr().err
    assert "TOY/unet/fold_0" in err and "--rerun-stale" in err and f"lr {other:g}" in err
    assert (_fold(toy, 0) / "checkpoint_final.pt").stat().st_mtime_ns == mtime
    study = st.load_study()
    assert st.is_done(study, st.Task("lr_search", "TOY", "unet"))
    assert st.is_done(study, st.Task("fold", "TOY", "unet", 1))
    assert not st.is_done(study, st.Task("fold", "TOY", "unet", 0))
    # submitted once with its LR search (its job refused at once, training nothing), never retried
    rec = study.jobs["TOY/unet/fold_0"]
    assert rec["attempt"] == 2 and rec["failures"] == 1 and "--rerun-stale" in rec["error"]


def test_job_outcomes_come_from_json_never_from_a_pickle(toy, capsys, monkeypatch):
    """A failing job under the local executor (a real submitit subprocess): its outcome is the
    JSON it wrote; the driver unpickles nothing, even a planted result pickle."""
    calls = []

    def no_unpickling(*args, **kwargs):
        calls.append(args)
        raise AssertionError("the driver unpickled something")

    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(pickle, "Unpickler", no_unpickling)
    code = main(["-d", "TOY", "-a", "unet", "--executor", "local", "--no-lr-search", "--folds", "0",
                 "--retries", "0", "--model-opt", "unet:no_such_option=1", "--device", "cpu", "--poll", "0.2"])
    assert code == 1 and calls == []
    err = capsys.readouterr().err
    assert "TOY/unet/fold_0 failed after 1 attempt(s)" in err and "no_such_option" in err
    rec = json.loads(st.study_path().read_text())["jobs"]["TOY/unet/fold_0"]
    outcome = json.loads((toy / "results" / "study_jobs" / "local" / "outcomes" / f"{rec['job_id']}.json").read_text())
    assert outcome["status"] == "error" and outcome["task"] == "TOY/unet/fold_0"
    assert "no_such_option" in outcome["error"] and "\n" not in outcome["error"]
    assert "no_such_option" in rec["error"]


def test_a_tampered_outcome_file_is_one_clean_line(tmp_path):
    folder = tmp_path / "jobs"
    (folder / st.OUTCOMES_DIR).mkdir(parents=True)
    (folder / st.OUTCOMES_DIR / "123_4.json").write_text(json.dumps(
        {"status": "error", "error": "Bad\x1b[31m thing\nsecond line" + "x" * 1000}))
    backend = st.LocalBackend(folder)
    msg = backend.error("123_4")
    assert msg.startswith("Bad") and "\n" not in msg and "\x1b" not in msg and len(msg) <= 300
    assert backend.error("../../etc/passwd") is None and backend.error("nope") is None
    (folder / st.OUTCOMES_DIR / "9.json").write_text(json.dumps({"status": "rm -rf"}))
    assert backend.error("9") is None


def test_study_file_values_are_checked_on_read(toy, capsys):
    assert main(["-d", "TOY", "-a", "unet", "--dry-run"]) == 0
    base = st.Study(datasets=["TOY"], archs=["unet"]).to_json()
    for bad, message in [
        ({"datasets": ["../../etc"]}, "invalid dataset name"),
        ({"archs": ["unet\nid"]}, "invalid architecture name"),
        ({"jobs": {"TOY/unet/fold_0": {"job_id": "--user=me", "state": "submitted"}}}, "is not a job id"),
        ({"folds": ["0; rm"]}, "'folds'"),
        ({"slurm": {"qos": "high\nid"}}, "invalid SLURM qos"),
        ({"slurm": {"time_min": "1\n#SBATCH"}}, "time_min"),
    ]:
        st.study_path().parent.mkdir(parents=True, exist_ok=True)
        st.study_path().write_text(json.dumps({**base, **bad}))
        capsys.readouterr()
        assert main(["--status"]) == 2, bad
        err = capsys.readouterr().err
        assert message in err and "study.json" in err and len(err.strip().splitlines()) == 1
