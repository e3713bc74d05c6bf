"""medplan_benchmark through a real single-node SLURM cluster (slurm-wlm + munge on localhost).

Skips with the reason when SLURM/munge are not installed or the daemons do not come up
(``.ci/run`` installs them where apt-get is available).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from medplan import study as st
from slurm_cluster import ClusterUnavailable, start_cluster

DATASETS = ["ISIC2018", "BUSI"]
ARCHS = ["unet", "unet_small"]
ARGS = ["-d", *DATASETS, "-a", *ARCHS, "--executor", "slurm", "--cpus-per-job", "1", "--gpus-per-job", "0",
        "--lrs", "3e-3", "--epochs-lr-search", "1", "--epochs", "1", "--device", "cpu", "--num-workers", "0",
        "--batch-size", "4", "--model-opt", "unet:base_channels=4", "--model-opt", "unet:depth=2",
        "--measure-steps", "1", "--poll", "0.5"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        c = start_cluster(tmp_path_factory.mktemp("slurm"), cpus=4)  # jobs mostly wait on imports
    except ClusterUnavailable as exc:
        pytest.skip(f"no test SLURM cluster: {str(exc).splitlines()[0]}")
    yield c
    c.stop()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two tiny synthetic datasets, converted and preprocessed at 32x32 with 5 folds."""
    from medplan.cli.convert import main as convert_main
    from medplan.datasets import synthetic
    from medplan.pipeline import preprocess

    root = tmp_path_factory.mktemp("data")
    env = {"MEDPLAN_RAW": str(root / "raw"), "MEDPLAN_PREPROCESSED": str(root / "preprocessed")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        isic = synthetic.write_isic2018(root / "downloads", n=10, size=(40, 48), seed=1, duplicates=False, hairs=False)
        busi = synthetic.write_busi(root / "downloads", n=10, size=(40, 48), seed=2)
        assert convert_main(["isic2018", str(isic), "-d", "ISIC2018", "--no-progress"]) == 0
        assert convert_main(["busi", str(busi), "-d", "BUSI", "--no-progress"]) == 0
        for name in DATASETS:
            preprocess(name, overrides={"input_size": [32, 32]}, num_workers=0, progress=False)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return env


@pytest.fixture
def env(cluster, data, tmp_path, monkeypatch):
    for k, v in {**data, "MEDPLAN_RESULTS": str(tmp_path / "results"), "SLURM_CONF": str(cluster.conf),
                 "PATH": cluster.env["PATH"], "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(k, v)
    return tmp_path / "results"


def _check_report(results, datasets=DATASETS) -> None:
    summary = pd.read_csv(results / "summary.csv")
    assert len(summary) == len(datasets) * 2 * 5
    assert set(summary.dataset) == set(datasets) and set(summary.arch) == set(ARCHS)
    assert summary["mDSC"].notna().all()
    report = (results / st.REPORT_FILE).read_text()
    assert "## Efficiency" in report and "| unet_small |" in report
    jobs = json.loads((results / "study.json").read_text())["jobs"]
    assert len(jobs) == len(datasets) * 2 * (1 + 5) + 1 and all(j["state"] == "done" for j in jobs.values())


def test_study_through_slurm(env, cluster, capsys):
    from medplan.cli.benchmark import main

    assert main(ARGS) == 0
    _check_report(env)
    jobs = json.loads((env / "study.json").read_text())["jobs"]
    fold_ids = {jobs[f"ISIC2018/unet/fold_{k}"]["job_id"] for k in range(5)}
    assert len({i.split("_")[0] for i in fold_ids}) == 1 and all("_" in i for i in fold_ids)  # one array
    for k in range(5):
        cfg = json.loads((env / "BUSI" / "unet" / f"fold_{k}" / "config.json").read_text())
        assert cfg["epochs"] == 1 and cfg["lr"] == pytest.approx(3e-3)
    assert cluster.queue() == []


def test_killed_driver_and_cluster_crash_resume_without_redoing_folds(env, cluster):
    """Kill the driver halfway, cancel everything queued (a cluster crash), rerun: only the
    missing work is submitted again and folds that were complete are left untouched."""
    from medplan.cli.benchmark import main

    args = ["-d", "ISIC2018", *ARGS[ARGS.index("-a"):]]  # one dataset keeps the test short
    code = f"from medplan.cli.benchmark import main; main({args!r})"
    driver = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    done: dict = {}
    try:
        while time.monotonic() < deadline and driver.poll() is None:
            done = {p: p.stat().st_mtime_ns for p in env.glob("*/*/fold_*/checkpoint_final.pt")
                    if st.fold_complete(p.parent)}
            if len(done) >= 3:
                break
            time.sleep(0.3)
    finally:
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    assert 3 <= len(done) < 10, "the driver should be killed halfway through the study"
    cluster.run("scancel", "--user", _user(), check=False)
    deadline = time.monotonic() + 30
    while cluster.queue() and time.monotonic() < deadline:
        time.sleep(0.3)

    assert main([]) == 0  # the saved study, no arguments
    _check_report(env, ["ISIC2018"])
    for path, mtime in done.items():
        assert path.stat().st_mtime_ns == mtime, f"{path.parent} was trained again"
    jobs = json.loads((env / "study.json").read_text())["jobs"]
    assert max(j["attempt"] for j in jobs.values()) <= 2


def _user() -> str:
    import getpass

    return getpass.getuser()
