"""medplan_benchmark on this machine: the study grid, status, dry run, retries, bad input."""
from __future__ import annotations

import json
import os

import pytest

from medplan import study as st
from medplan.cli.benchmark import main
from medplan.cli.models import main as models_main
from trainer_fixtures import make_dataset, use_roots

TINY = ["--model-opt", "unet:base_channels=4", "--model-opt", "unet:depth=2", "--device", "cpu",
        "--num-workers", "0", "--measure-steps", "1", "--poll", "0.2"]


@pytest.fixture
def toy(tmp_path, monkeypatch):
    use_roots(monkeypatch, tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    make_dataset(tmp_path, "TOY", n_cases=6, n_folds=2, lr_grid=[3e-3, 1e-3], epochs={"lr_search": 1, "cv": 1})
    return tmp_path


def _study_file(root):
    return root / "results" / "study.json"


def test_inline_study_runs_lr_search_folds_and_report_then_is_idempotent(toy, capsys):
    assert main(["-d", "TOY", "-a", "unet", "--executor", "inline", *TINY]) == 0
    res = toy / "results"
    search = json.loads((res / "TOY" / "unet" / "lr_search.json").read_text())
    assert sorted(search["results"]) == ["1e-03", "3e-03"]
    for k in (0, 1):  # folds trained at the chosen LR
        cfg = json.loads((res / "TOY" / "unet" / f"fold_{k}" / "config.json").read_text())
        assert cfg["lr"] == pytest.approx(search["best_lr"])
        assert st.fold_complete(res / "TOY" / "unet" / f"fold_{k}")
    assert len((res / "summary.csv").read_text().strip().splitlines()) == 1 + 2
    report = (res / st.REPORT_FILE).read_text()
    assert "## Efficiency" in report and "| unet |" in report
    study = json.loads(_study_file(toy).read_text())
    assert study["datasets"] == ["TOY"] and set(study["jobs"]) == {"TOY/unet/lr_search", "TOY/unet/fold_0",
                                                                   "TOY/unet/fold_1", "report"}
    assert all(j["state"] == "done" and j["attempt"] == 1 for j in study["jobs"].values())
    capsys.readouterr()

    # no arguments: the saved study; nothing left to do, nothing resubmitted
    mtime = (res / "TOY" / "unet" / "fold_0" / "checkpoint_final.pt").stat().st_mtime_ns
    assert main([]) == 0
    assert "submitting" not in capsys.readouterr().err
    assert (res / "TOY" / "unet" / "fold_0" / "checkpoint_final.pt").stat().st_mtime_ns == mtime
    assert all(j["attempt"] == 1 for j in json.loads(_study_file(toy).read_text())["jobs"].values())

    # a lost fold is the only job of the next run
    import shutil
    shutil.rmtree(res / "TOY" / "unet" / "fold_1")
    assert main([]) == 0
    assert "submitting 2 job(s): TOY/unet/fold_1, report" in capsys.readouterr().err
    assert st.fold_complete(res / "TOY" / "unet" / "fold_1")


def test_local_executor_runs_jobs_through_submitit(toy):
    assert main(["-d", "TOY", "-a", "unet", "--executor", "local", "--no-lr-search", "--folds", "0", *TINY]) == 0
    res = toy / "results"
    assert st.fold_complete(res / "TOY" / "unet" / "fold_0")
    assert not (res / "TOY" / "unet" / "fold_1").exists() and not (res / "TOY" / "unet" / "lr_search").exists()
    jobs = json.loads(_study_file(toy).read_text())["jobs"]
    assert jobs["TOY/unet/fold_0"]["state"] == "done" and jobs["report"]["state"] == "done"
    assert os.path.isfile(jobs["TOY/unet/fold_0"]["log"])  # submitit's per-job log
    assert (res / "summary.csv").is_file()


def test_status_and_dry_run_with_and_without_measurements(toy, capsys):
    assert main(["-d", "TOY", "-a", "unet", "unet_small", "--dry-run", "--epochs", "4"]) == 0
    out = capsys.readouterr().out
    assert "7 job(s)" in out and "TOY/unet_small/fold_1  1 x 4 epochs" in out and "2 x 1 epochs" in out
    assert "GPU-hours: unknown" in out
    assert not _study_file(toy).exists()  # a dry run writes nothing

    assert models_main(["unet", "unet_small", "--measure", "--size", "32", "32", "--steps", "1",
                        "--batch-size", "1", "--device", "cpu"]) == 0
    eff = json.loads((toy / "results" / "efficiency.json").read_text())["models"]
    assert eff["unet"]["train_images_per_s"] > 0 and eff["unet"]["peak_memory_mb"] is None  # CPU
    capsys.readouterr()
    assert main(["-d", "TOY", "-a", "unet", "unet_small", "--dry-run", "--epochs", "4"]) == 0
    out = capsys.readouterr().out
    assert "GPU-hours (upper bound" in out and "GPU-h" in out.split("\n")[1]

    # status of a study that has run part of its grid
    assert main(["-d", "TOY", "-a", "unet", "--executor", "inline", "--no-lr-search", "--folds", "0", *TINY]) == 0
    capsys.readouterr()
    assert main(["--status"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(ln for ln in lines if "fold_0" in ln).split()
    assert row[:4] == ["TOY", "unet", "fold_0", "done"] and float(row[-1]) >= 0
    assert "2 done" in lines[-1]


def test_failing_job_is_retried_then_reported_with_its_log(toy, capsys):
    code = main(["-d", "TOY", "-a", "unet", "--executor", "inline", "--no-lr-search", "--folds", "0",
                 "--retries", "1", "--model-opt", "unet:no_such_option=1", "--device", "cpu", "--poll", "0.1"])
    assert code == 1
    err = capsys.readouterr().err
    assert "TOY/unet/fold_0 failed after 2 attempt(s)" in err and "no_such_option" in err
    job = json.loads(_study_file(toy).read_text())["jobs"]["TOY/unet/fold_0"]
    assert job["failures"] == 2 and job["attempt"] == 2 and job["state"] == "failed"
    assert "report" not in json.loads(_study_file(toy).read_text())["jobs"]  # never ran on a missing fold


@pytest.mark.parametrize("argv, message", [
    (["-d", "NOPE", "-a", "unet"], "NOPE"),
    (["-d", "TOY", "-a", "no_such_net"], "unknown architecture 'no_such_net'"),
    (["-d", "TOY", "-a", "unet", "--folds", "5"], "out of range"),
    (["-d", "TOY"], "give both --datasets and --archs"),
    ([], "no study yet"),
    (["--status"], "no study yet"),
])
def test_bad_input_is_one_line_and_writes_nothing(toy, capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("medplan_benchmark: error:") and message in err and len(err.strip().splitlines()) == 1
    assert not _study_file(toy).exists() and not (toy / "results" / "TOY").exists()


def test_dataset_not_preprocessed(toy, capsys):
    (toy / "raw" / "RAWONLY").mkdir(parents=True)
    assert main(["-d", "RAWONLY", "-a", "unet"]) == 2
    err = capsys.readouterr().err
    assert "RAWONLY" in err and len(err.strip().splitlines()) == 1
    assert not _study_file(toy).exists()


def test_unreachable_slurm_submits_nothing(toy, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(toy / "empty_bin"))  # no sbatch/squeue on PATH
    assert main(["-d", "TOY", "-a", "unet", "--executor", "slurm"]) == 2
    err = capsys.readouterr().err
    assert "SLURM is unreachable" in err and len(err.strip().splitlines()) == 1
    assert not _study_file(toy).exists() and not (toy / "results" / "study_jobs").exists()


def test_failing_sbatch_leaves_nothing_queued(toy, capsys, monkeypatch):
    """sbatch present but refusing (e.g. a bad partition): one line, no study of half-submitted jobs."""
    bin_dir = toy / "fake_bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: invalid partition specified: nope' >&2\nexit 1\n")
    (bin_dir / "scancel").write_text(f"#!/bin/sh\necho \"$@\" >> {toy / 'scancelled'}\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert main(["-d", "TOY", "-a", "unet", "--executor", "slurm", "--partition", "nope"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("medplan_benchmark: error: sbatch failed") and "invalid partition" in last
    jobs = json.loads(_study_file(toy).read_text())["jobs"] if _study_file(toy).exists() else {}
    assert not any(j.get("state") == "submitted" for j in jobs.values())
