"""Issue 11, items 4 and 5: one process per fold run and per dataset stage (a lock that works
without flock, with heartbeat and stale take-over), and leftover temporaries removed by the
next run of a stage."""
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import contextmanager

import pytest
import torch

from medplan.cli.convert import main as convert_main
from medplan.cli.preprocess import main as preprocess_main
from medplan.cli.train import main as train_main
from medplan.datasets import synthetic
from medplan.locks import FileLock, LockedError, exclusive_lock
from medplan.trainers import train
from medplan.trainers.checkpoint import load_checkpoint
from trainer_fixtures import FAST, TINY_MODEL, limit_threads, make_dataset, use_roots

limit_threads()

TINY_ARGS = ["--device", "cpu", "--num-workers", "0", "--no-progress", "--model-opt", "base_channels=4",
             "--model-opt", "depth=2"]

HOLD = textwrap.dedent("""
    import sys
    from medplan.locks import exclusive_lock
    with exclusive_lock(sys.argv[1], purpose=sys.argv[2]):
        print("held", flush=True)
        sys.stdin.read()
""")


@contextmanager
def held_elsewhere(path, purpose):
    """Another process holds the lock ``path`` for the block."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), purpose], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def plant_lock(path, **info):
    path.parent.mkdir(parents=True, exist_ok=True)
    content = {"format": "medplan-lock-1", "purpose": "an old run", "host": socket.gethostname(), "pid": 1,
               "started": "2026-01-01T00:00:00", "command_line": ["medplan_train", "TOY", "unet", "0"], **info}
    path.write_text(json.dumps(content))


def one_line_error(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ----------------------------------------------------------------------------- the lock itself


def test_a_second_holder_is_refused_at_once_with_one_line_naming_the_holder(tmp_path):
    path = tmp_path / "run" / ".lock"
    with held_elsewhere(path, "train TOY/unet/fold_0") as proc:
        start = time.monotonic()
        with pytest.raises(LockedError) as info:
            with exclusive_lock(path, purpose="train again"):
                pass
        assert time.monotonic() - start < 2
        message = str(info.value)
        assert "\n" not in message
        assert f"host {socket.gethostname()} pid {proc.pid} since " in message
        assert "train TOY/unet/fold_0" in message and "wait for it" in message
        assert json.loads(path.read_text())["pid"] == proc.pid
    assert not path.exists()  # released by its holder
    with exclusive_lock(path, purpose="now mine"):
        assert json.loads(path.read_text())["pid"] == os.getpid()


@pytest.mark.parametrize("ending", ["success", "failure", "interrupt"])
def test_the_lock_is_released_after_success_failure_and_ctrl_c(tmp_path, ending):
    path = tmp_path / "a" / "b" / ".lock"

    class Failure(Exception):
        pass

    raised = {"success": None, "failure": Failure, "interrupt": KeyboardInterrupt}[ending]
    try:
        with exclusive_lock(path, purpose="test"):
            info = json.loads(path.read_text())
            assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
            assert {"started", "command_line", "heartbeat_s", "purpose"} <= set(info)
            if raised:
                raise raised
    except (Failure, KeyboardInterrupt):
        pass
    assert not path.exists()
    assert not (tmp_path / "a").exists()  # folders made for the lock and left empty are removed
    with exclusive_lock(path, purpose="again"):
        pass


def test_reentrant_in_one_thread_refused_in_another(tmp_path):
    path = tmp_path / ".lock"
    outcome = []

    def other_thread():
        try:
            with exclusive_lock(path, purpose="thread"):
                outcome.append("got it")
        except LockedError as exc:
            outcome.append(str(exc))

    with exclusive_lock(path, purpose="outer"):
        with exclusive_lock(path, purpose="inner"):  # e.g. preprocess -> plan
            pass
        assert path.exists()  # the inner release keeps the outer hold
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    assert len(outcome) == 1 and f"pid {os.getpid()}" in outcome[0] and "outer" in outcome[0]
    assert not path.exists()


def test_a_lock_of_a_dead_process_is_taken_over_with_a_note(tmp_path, capsys):
    path = tmp_path / ".lock"
    pid = dead_pid()
    plant_lock(path, pid=pid)
    with exclusive_lock(path, purpose="new run") as lock:
        assert json.loads(path.read_text())["token"] == lock.token
    err = capsys.readouterr().err
    assert "taking over the stale lock" in err and f"pid {pid}" in err and "no longer runs" in err
    assert not path.exists()


def test_a_lock_without_heartbeat_is_taken_over_a_beating_one_is_not(tmp_path, capsys):
    path = tmp_path / ".lock"
    plant_lock(path, host="some-other-node", pid=4242)
    with pytest.raises(LockedError, match="host some-other-node pid 4242"):
        with exclusive_lock(path, purpose="x", stale_after_s=600):
            pass
    old = time.time() - 601
    os.utime(path, (old, old))
    with exclusive_lock(path, purpose="x", stale_after_s=600):
        pass
    assert "no heartbeat for 60" in capsys.readouterr().err


def test_a_requeued_slurm_job_takes_over_the_lock_of_its_earlier_run(tmp_path, monkeypatch, capsys):
    path = tmp_path / ".lock"
    plant_lock(path, host="node-a", pid=4242, slurm={"job_id": "777", "restart_count": 0})
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    with pytest.raises(LockedError):  # the same run of the job (e.g. a second srun): held
        with exclusive_lock(path, purpose="x"):
            pass
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with exclusive_lock(path, purpose="x"):
        assert json.loads(path.read_text())["slurm"] == {"job_id": "777", "restart_count": 1}
    assert "earlier run of SLURM job 777" in capsys.readouterr().err


def test_the_heartbeat_keeps_the_lock_fresh(tmp_path):
    path = tmp_path / ".lock"
    with exclusive_lock(path, purpose="x", heartbeat_s=0.05):
        old = time.time() - 1000
        os.utime(path, (old, old))
        time.sleep(0.5)
        assert time.time() - path.stat().st_mtime < 10


def test_of_many_taking_over_one_stale_lock_exactly_one_wins(tmp_path):
    path = tmp_path / ".lock"
    plant_lock(path, pid=dead_pid())
    barrier = threading.Barrier(8)
    won, lost, locks = [], [], []

    def contender():
        barrier.wait()
        try:
            locks.append(FileLock(path, "race").acquire())
            won.append(1)
        except LockedError:
            lost.append(1)

    threads = [threading.Thread(target=contender) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (len(won), len(lost)) == (1, 7)
    assert json.loads(path.read_text())["token"] == locks[0].token
    locks[0].release()
    assert sorted(os.listdir(tmp_path)) == []  # no guard, no renamed lock left


# ----------------------------------------------------------------------------- two trainings of one fold

DRIVER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from medplan.trainers import Trainer
    real = Trainer.on_epoch_start
    def pause(self, epoch):
        if epoch == 2:  # epoch 1 and its checkpoint are written: wait for the test
            Path(os.environ["READY"]).touch()
            while not Path(os.environ["GATE"]).exists():
                time.sleep(0.02)
        return real(self, epoch)
    Trainer.on_epoch_start = pause
    from medplan.cli.train import main
    sys.exit(main(sys.argv[1:]))
""")


def comparable_metrics(fold):
    drop = {"epoch_time", "timestamp"}
    return [{k: v for k, v in json.loads(line).items() if k not in drop}
            for line in (fold / "metrics.jsonl").read_text().splitlines()]


def test_two_trainings_of_one_fold_the_second_is_refused_the_first_unharmed(tmp_path, monkeypatch, capsys):
    make_dataset(tmp_path, epochs={"lr_search": 1, "cv": 3}, lr=1e-2)
    use_roots(monkeypatch, tmp_path)
    gate, ready = tmp_path / "gate", tmp_path / "ready"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GATE": str(gate), "READY": str(ready)}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-c", DRIVER, "TOY", "unet", "0", *TINY_ARGS]

    gate.touch()  # the lone run, as a reference
    lone = subprocess.run(cmd, env={**env, "MEDPLAN_RESULTS": str(tmp_path / "lone")}, capture_output=True,
                          text=True, timeout=300)
    assert lone.returncode == 0, lone.stderr[-2000:]
    gate.unlink()
    ready.unlink()

    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-2000:]
            time.sleep(0.05)
        fold = tmp_path / "results" / "TOY" / "unet" / "fold_0"
        before = {p.name: p.read_bytes() for p in fold.iterdir() if p.is_file() and p.name != ".lock"}
        for flags in (["--force"], [], ["--continue"]):
            capsys.readouterr()
            start = time.monotonic()
            assert train_main(["TOY", "unet", "0", *flags, *TINY_ARGS]) == 2
            assert time.monotonic() - start < 30
            line = one_line_error(capsys.readouterr().err)
            assert f"pid {first.pid}" in line and "locked by host" in line and "train TOY/unet/fold_0" in line
        after = {p.name: p.read_bytes() for p in fold.iterdir() if p.is_file() and p.name != ".lock"}
        assert after == before  # --force deleted nothing of the running run
    finally:
        gate.touch()
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    reference = tmp_path / "lone" / "TOY" / "unet" / "fold_0"
    assert comparable_metrics(fold) == comparable_metrics(reference)
    wa, wb = (load_checkpoint(d / "checkpoint_final.pt")["model"] for d in (fold, reference))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = (json.loads((d / "validation" / "summary.json").read_text()) for d in (fold, reference))
    assert sa["mIoU"] == sb["mIoU"] and sa["best_epoch"] == sb["best_epoch"]
    assert not (fold / ".lock").exists()


def test_a_stale_fold_lock_is_taken_over_and_temporaries_of_a_killed_run_removed(tmp_path, monkeypatch, capsys):
    use_roots(monkeypatch, tmp_path)
    make_dataset(tmp_path, epochs={"lr_search": 1, "cv": 1})
    fold = tmp_path / "results" / "TOY" / "unet" / "fold_0"
    pid = dead_pid()
    plant_lock(fold / ".lock", pid=pid)
    (fold / ".checkpoint_latest.pt.abcd1234.tmp").write_bytes(b"half a checkpoint")
    (fold / ".validation.xyz12345.tmp").mkdir()
    (fold / ".validation.xyz12345.tmp" / "case_000.png").write_bytes(b"half")
    train("TOY", "unet", 0, overrides=FAST, model_options=TINY_MODEL)
    err = capsys.readouterr().err
    assert "taking over the stale lock" in err and f"pid {pid}" in err
    assert sorted(p.name for p in fold.iterdir() if p.name.startswith(".")) == []
    assert (fold / "validation" / "summary.json").is_file()


# ----------------------------------------------------------------------------- dataset stages

PREPROCESS_DRIVER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import medplan.preprocessing as pre
    real = pre.preprocess_dataset
    def pause(*args, **kwargs):
        Path(os.environ["READY"]).touch()
        while not Path(os.environ["GATE"]).exists():
            time.sleep(0.02)
        return real(*args, **kwargs)
    pre.preprocess_dataset = pause
    from medplan.cli.preprocess import main
    sys.exit(main(sys.argv[1:]))
""")


def stage_files(folder):
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != "fingerprint.json":
            data = p.read_bytes()
            if p.name == "plans.json":
                data = json.dumps({k: v for k, v in json.loads(data).items() if k != "created"}).encode()
            out[str(p.relative_to(folder))] = data
    return out


def test_two_preprocesses_of_one_dataset_the_second_is_refused_in_one_line(medplan_env, monkeypatch, capsys):
    src = synthetic.write_camus(medplan_env / "downloads", n_patients=6, size=(48, 40), seed=3)
    assert convert_main(["camus", str(src), "-d", "CAMUS", "--no-progress"]) == 0
    gate, ready = medplan_env / "gate", medplan_env / "ready"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GATE": str(gate), "READY": str(ready)}
    cmd = [sys.executable, "-c", PREPROCESS_DRIVER, "-d", "CAMUS", "--set", "input_size=[32,32]", "--no-progress"]

    gate.touch()
    lone_root = medplan_env / "lone"
    lone = subprocess.run(cmd, env={**env, "MEDPLAN_PREPROCESSED": str(lone_root)}, capture_output=True, text=True,
                          timeout=300)
    assert lone.returncode == 0, lone.stderr[-2000:]
    gate.unlink()
    ready.unlink()

    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-2000:]
            time.sleep(0.05)
        capsys.readouterr()
        assert preprocess_main(["-d", "CAMUS", "--no-progress"]) == 2
        line = one_line_error(capsys.readouterr().err)
        assert line.startswith("medplan_preprocess: error:") and f"pid {first.pid}" in line
        assert "preprocess CAMUS" in line
    finally:
        gate.touch()
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    pre = medplan_env / "preprocessed" / "CAMUS"
    assert not (pre / ".lock").exists()
    mine, theirs = stage_files(pre), stage_files(lone_root / "CAMUS")
    assert mine.keys() == theirs.keys() and any(k.endswith(".npy") for k in mine)
    assert mine == theirs


def test_preprocess_removes_temporaries_of_a_killed_run(medplan_env, capsys):
    src = synthetic.write_camus(medplan_env / "downloads", n_patients=6, size=(48, 40), seed=3)
    assert convert_main(["camus", str(src), "-d", "CAMUS", "--no-progress"]) == 0
    assert preprocess_main(["-d", "CAMUS", "--set", "input_size=[32,32]", "--no-progress"]) == 0
    pre = medplan_env / "preprocessed" / "CAMUS"
    planted = [pre / ".plans.json.abcd1234.tmp", pre / "data_32x32" / ".x_0001.npy.abcd1234.tmp",
               pre / ".splits.json.abcd1234.old"]
    for p in planted:
        p.write_bytes(b"left by a kill")
    with held_elsewhere(pre / ".lock", "plan CAMUS"):
        assert preprocess_main(["-d", "CAMUS", "--no-progress"]) == 2
        assert all(p.exists() for p in planted)  # never touched while another process holds the stage
    assert preprocess_main(["-d", "CAMUS", "--no-progress"]) == 0
    assert not any(p.exists() for p in planted)


def test_convert_is_locked_per_dataset_and_removes_its_own_leftovers(medplan_env, capsys):
    src = synthetic.write_camus(medplan_env / "downloads", n_patients=2, size=(48, 40), seed=3)
    raw = medplan_env / "raw"
    raw.mkdir()
    mine = raw / ".CAMUS.abcd1234.tmp"
    mine.mkdir()
    (mine / "dataset.json").write_text("{}")
    other = raw / ".CAMUS2.abcd1234.tmp"  # another dataset's convert, maybe still running
    other.mkdir()
    with held_elsewhere(raw / ".CAMUS.lock", "convert CAMUS") as proc:
        capsys.readouterr()
        assert convert_main(["camus", str(src), "-d", "CAMUS", "--no-progress"]) == 2
        line = one_line_error(capsys.readouterr().err)
        assert f"pid {proc.pid}" in line and "convert CAMUS" in line
        assert mine.exists() and not (raw / "CAMUS").exists()
    assert convert_main(["camus", str(src), "-d", "CAMUS", "--no-progress"]) == 0
    assert not mine.exists() and other.exists() and not (raw / ".CAMUS.lock").exists()
    assert (raw / "CAMUS" / "dataset.json").is_file()
