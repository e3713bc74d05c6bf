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
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")  # a login node with SLURM's client tools
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert main(["-d", "TOY", "-a", "unet", "--executor", "slurm", "--partition", "nope"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("medplan_benchmark: error: sbatch failed") and "invalid partition" in last
    jobs = json.loads(_study_file(toy).read_text())["jobs"] if _study_file(toy).exists() else {}
    assert not any(j.get("state") == "submitted" for j in jobs.values())


# ----------------------------------------------------------------------------- fake SLURM client tools
def _fake_slurm(toy, *, srun=True, sbatch_ok=1_000_000):
    """sbatch/squeue/scancel (and srun) as shell scripts on a PATH of their own: sbatch keeps a
    copy of every batch script and accepts the first ``sbatch_ok`` submissions, then refuses
    the partition like a real sbatch."""
    bin_dir = toy / "fake_slurm"
    bin_dir.mkdir()
    scripts = toy / "sbatch_scripts"
    scripts.mkdir()
    (bin_dir / "sbatch").write_text(f"""#!/bin/sh
n=$(ls {scripts} | wc -l)
cp "$1" {scripts}/script_$n.sh
if [ "$n" -ge {sbatch_ok} ]; then
  echo 'sbatch: error: Batch job submission failed: Invalid partition name specified' >&2
  exit 1
fi
echo "Submitted batch job $((101 + n))"
""")
    (bin_dir / "squeue").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "scancel").write_text(f"#!/bin/sh\necho \"$@\" >> {toy / 'scancelled'}\n")
    if srun:
        (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir, scripts


def _queued(toy):
    jobs = json.loads(_study_file(toy).read_text())["jobs"] if _study_file(toy).exists() else {}
    return [k for k, j in jobs.items() if j.get("state") == "submitted"]


def test_sbatch_present_srun_absent_is_one_line(toy, capsys, monkeypatch):
    """A login node (or a test machine) with sbatch but no srun: one line, nothing submitted."""
    bin_dir, scripts = _fake_slurm(toy, srun=False)
    monkeypatch.setenv("PATH", str(bin_dir))  # nothing else: no real srun either
    assert main(["-d", "TOY", "-a", "unet", "--executor", "slurm"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medplan_benchmark: error: SLURM is unreachable: srun not found")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not list(scripts.iterdir()) and not _queued(toy)


def test_sbatch_refusing_the_partition_in_a_later_round_cancels_the_earlier_arrays(toy, capsys, monkeypatch):
    """The LR-search array is accepted, the folds' array refused: one line, the accepted
    array cancelled, no job recorded as queued."""
    bin_dir, scripts = _fake_slurm(toy, sbatch_ok=1)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert main(["-d", "TOY", "-a", "unet", "--executor", "slurm", "--partition", "gpu", "--poll", "0.1"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("medplan_benchmark: error: sbatch failed") and "Invalid partition" in last
    assert "nothing of this round was left queued" in last
    assert len(list(scripts.iterdir())) == 2
    assert (toy / "scancelled").read_text().split()[0] in ("101", "101_0")  # the LR search (a one-job array)
    assert not _queued(toy)


def test_batch_script_holds_only_checked_names(toy, capsys, monkeypatch):
    """The generated sbatch script: job names made of checked names, every #SBATCH value on its line."""
    bin_dir, scripts = _fake_slurm(toy)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert main(["-d", "TOY", "-a", "unet", "--executor", "slurm", "--partition", "gpu", "--no-wait",
                 *TINY]) == 0
    texts = [p.read_text() for p in sorted(scripts.iterdir())]
    assert len(texts) == 3  # the LR search, the folds' array after it, the report after the folds
    assert "#SBATCH --job-name=medplan_lr_search" in texts[0]
    assert "#SBATCH --job-name=medplan_fold_TOY_unet" in texts[1] and "afterok:101" in texts[1]
    assert "#SBATCH --job-name=medplan_report" in texts[2]
    for text in texts:
        body = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
        assert body[0] == "export SUBMITIT_EXECUTOR=slurm" and len(body) == 2 and body[1].startswith("srun ")
    assert sorted(_queued(toy)) == ["TOY/unet/fold_0", "TOY/unet/fold_1", "TOY/unet/lr_search", "report"]


@pytest.mark.parametrize("argv", [
    ["-d", "TOY\necho pwned > /tmp/x", "-a", "unet"],
    ["-d", "TOY", "-a", "unet\nid"],
    ["-d", "TOY", "-a", "unet", "--partition", "gpu\necho pwned"],
    ["-d", "TOY", "-a", "unet", "--account", "lab\rid"],
])
def test_a_newline_never_reaches_a_batch_script(toy, capsys, monkeypatch, argv):
    """Names and options holding a line break are refused before anything is submitted, even
    when a dataset folder of that very name exists."""
    from trainer_fixtures import make_dataset as make

    make(toy, "TOY\necho pwned > /tmp/x", n_cases=6, n_folds=2, epochs={"lr_search": 1, "cv": 1})
    bin_dir, scripts = _fake_slurm(toy)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert main([*argv, "--executor", "slurm"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "invalid" in err
    assert not list(scripts.iterdir()) and not _queued(toy)


def test_a_study_file_with_a_newline_in_a_name_is_refused(toy, capsys, monkeypatch):
    bin_dir, scripts = _fake_slurm(toy)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert main(["-d", "TOY", "-a", "unet", "--dry-run"]) == 0
    study = st.Study(datasets=["TOY"], archs=["unet"], executor="slurm").to_json()
    study["datasets"] = ["TOY\necho pwned"]
    _study_file(toy).parent.mkdir(parents=True, exist_ok=True)
    _study_file(toy).write_text(json.dumps(study))
    capsys.readouterr()
    for argv in ([], ["--status"], ["--dry-run"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "invalid dataset name" in err and "study.json" in err and len(err.strip().splitlines()) == 1
    study["datasets"], study["slurm"]["partition"] = ["TOY"], "gpu\nid"
    _study_file(toy).write_text(json.dumps(study))
    assert main([]) == 2 and "invalid SLURM partition" in capsys.readouterr().err
    assert not list(scripts.iterdir())
