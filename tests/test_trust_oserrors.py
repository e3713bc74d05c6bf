"""Issue 11, item 7: a full disk, a read-only folder or a missing permission is one line that
names the path and the operation, a non-zero exit, no traceback, and earlier files intact."""
from __future__ import annotations

import builtins
import errno
import io
import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Callable

import pytest

from medplan.datasets import synthetic
from trainer_fixtures import make_dataset, use_roots

ENOSPC_TEXT = os.strerror(errno.ENOSPC)
REAL_OPEN = builtins.open


# ----------------------------------------------------------------------------- helpers


class _FullDisk:
    """A file opened for writing on a disk that is full: ``write`` fails, as the OS does it
    (an OSError without a file name)."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, ENOSPC_TEXT)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()
        return False


def full_disk(monkeypatch, folder: Path, wanted: Callable[[Path], bool] = lambda p: True) -> list[Path]:
    """From now on, writing a file under ``folder`` (that ``wanted`` selects) fails with ENOSPC.
    Returns the list of files that failed (filled as it happens)."""
    real_open = REAL_OPEN
    folder = Path(folder).resolve()
    failed: list[Path] = []

    def fake_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
            path = Path(os.fsdecode(file)).resolve()
            if folder in path.parents and wanted(path):
                failed.append(path)
                return _FullDisk(f)
        return f

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)  # pathlib's write_bytes / write_text
    return failed


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def hidden_temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if p.name.endswith((".tmp", ".old"))]


def one_line_error(err: str, *needles: str) -> str:
    """The single error line of ``err`` (progress bars off), checked for ``needles``."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def isic(root: Path, n: int = 8) -> Path:
    return synthetic.write_isic2018(root, n=n, size=(32, 40), seed=0, duplicates=False, hairs=False)


# ----------------------------------------------------------------------------- the message


def test_message_names_path_operation_and_free_space(tmp_path):
    from medplan.cli import entry_point
    from medplan.io import describe_os_error, os_errors

    target = tmp_path / "out" / "plans.json"
    text = describe_os_error(OSError(errno.ENOSPC, ENOSPC_TEXT, str(target)))
    assert text.startswith(f"{target}: could not write ({ENOSPC_TEXT}; ") and text.endswith(" free now)")
    with pytest.raises(OSError) as info:
        with os_errors(target, "read"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    assert describe_os_error(info.value) == f"{target}: could not read ({os.strerror(errno.EACCES)})"

    @entry_point("medplan_x")
    def wrapped(argv):
        raise RuntimeError("torch says: unexpected pos") from OSError(errno.ENOSPC, ENOSPC_TEXT, str(target))

    assert wrapped([]) == 1

    @entry_point("medplan_x")
    def bug(argv):
        raise RuntimeError("a real bug")

    with pytest.raises(RuntimeError, match="a real bug"):  # not every error becomes a message
        bug([])


def test_atomic_write_failure_keeps_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    from medplan.io import atomic_write_json, describe_os_error

    path = tmp_path / "plans.json"
    atomic_write_json(path, {"old": True})
    before = path.read_bytes()
    full_disk(monkeypatch, tmp_path)
    with pytest.raises(OSError) as info:
        atomic_write_json(path, {"new": True})
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)  # not the hidden temporary
    assert describe_os_error(info.value).startswith(f"{path}: could not write ({ENOSPC_TEXT}")
    assert path.read_bytes() == before and hidden_temporaries(tmp_path) == []


# ----------------------------------------------------------------------------- the stages


@pytest.mark.parametrize("pool", [False, True], ids=["in-process", "worker-pool"])
def test_convert_full_disk_keeps_the_earlier_dataset(medplan_env, monkeypatch, capsys, pool):
    import medplan.datasets.writer as writer
    from medplan.cli.convert import main as convert_main

    src = isic(medplan_env / "dl")
    raw = medplan_env / "raw"
    assert convert_main(["isic2018", str(src), "--no-progress"]) == 0
    before = snapshot(raw / "ISIC2018")
    capsys.readouterr()
    if pool:
        monkeypatch.setattr(writer, "POOL_MIN_CASES", 1)
    failed = full_disk(monkeypatch, raw, lambda p: p.suffix == ".png")
    code = convert_main(["isic2018", str(src), "--force", "--no-progress", "--workers", "2" if pool else "1"])
    assert code != 0
    line = one_line_error(capsys.readouterr().err, "medplan_convert: error: ", f"{raw}/ISIC2018/", ENOSPC_TEXT,
                          "could not write", "free now")
    assert "/images/" in line or "/labels/" in line
    assert pool or failed  # (a forked worker's list is its own)
    assert snapshot(raw / "ISIC2018") == before
    assert hidden_temporaries(raw) == []


def test_plan_full_disk_keeps_the_earlier_plan(medplan_env, monkeypatch, capsys):
    from medplan.cli.convert import main as convert_main
    from medplan.cli.plan import main as plan_main

    assert convert_main(["isic2018", str(isic(medplan_env / "dl")), "--no-progress"]) == 0
    args = ["-d", "ISIC2018", "--no-progress", "-j", "0", "--set", "input_size=[16,16]"]
    assert plan_main(args) == 0
    pre = medplan_env / "preprocessed" / "ISIC2018"
    before = snapshot(pre)
    capsys.readouterr()
    full_disk(monkeypatch, pre, lambda p: "plans" in p.name)
    assert plan_main(args + ["--set", "lr=0.0005"]) != 0
    one_line_error(capsys.readouterr().err, "medplan_plan: error: ", f"{pre}/plans", ENOSPC_TEXT)
    assert snapshot(pre) == before and hidden_temporaries(pre) == []

    # a rescan that cannot write its arrays: the same, from inside the fingerprint pass
    full_disk(monkeypatch, pre, lambda p: p.suffix == ".npy" or ".npy." in p.name)
    assert plan_main(args + ["--set", "input_size=[24,24]", "--refingerprint"]) != 0
    one_line_error(capsys.readouterr().err, "medplan_plan: error: ", f"{pre}/data_24x24/", ENOSPC_TEXT)
    assert {k: v for k, v in snapshot(pre).items() if not k.startswith("data_24x24/")} == before
    assert hidden_temporaries(pre) == []


def test_preprocess_full_disk_in_worker_processes(medplan_env, monkeypatch, capsys):
    from medplan.cli.convert import main as convert_main
    from medplan.cli.plan import main as plan_main
    from medplan.cli.preprocess import main as preprocess_main

    assert convert_main(["isic2018", str(isic(medplan_env / "dl", n=10)), "--no-progress"]) == 0
    assert plan_main(["-d", "ISIC2018", "--no-progress", "-j", "0", "--set", "input_size=[16,16]"]) == 0
    pre = medplan_env / "preprocessed" / "ISIC2018"
    shutil.rmtree(pre / "data_16x16")  # preprocess has the arrays to write
    before = snapshot(pre)
    capsys.readouterr()
    full_disk(monkeypatch, pre / "data_16x16")  # inherited by the forked workers
    assert preprocess_main(["-d", "ISIC2018", "--no-progress", "-j", "2"]) != 0
    one_line_error(capsys.readouterr().err, "medplan_preprocess: error: ", f"{pre}/data_16x16/", ENOSPC_TEXT,
                   "could not write")
    after = snapshot(pre)
    assert {k: v for k, v in after.items() if not k.startswith("data_16x16/")} == before
    assert hidden_temporaries(pre) == []


def test_train_full_disk_at_a_checkpoint(tmp_path, monkeypatch, capsys):
    """torch.save turns the OSError into a RuntimeError: the message still names the file."""
    from medplan.cli.train import main as train_main

    make_dataset(tmp_path, epochs={"lr_search": 1, "cv": 1})
    use_roots(monkeypatch, tmp_path)
    pre = tmp_path / "preprocessed" / "TOY"
    before = snapshot(pre)
    fold = tmp_path / "results" / "TOY" / "unet" / "fold_0"
    full_disk(monkeypatch, tmp_path / "results", lambda p: "checkpoint" in p.name)
    code = train_main(["TOY", "unet", "0", "--device", "cpu", "--num-workers", "0", "--no-progress",
                       "--model-opt", "base_channels=4", "--model-opt", "depth=2"])
    assert code != 0
    err = capsys.readouterr().err
    line = [ln for ln in err.splitlines() if "error:" in ln]
    assert "Traceback" not in err and len(line) == 1, err
    assert line[0].startswith("medplan_train: error: ") and f"{fold}/checkpoint_" in line[0]
    assert ENOSPC_TEXT in line[0] and ".tmp" not in line[0]
    assert snapshot(pre) == before
    assert hidden_temporaries(tmp_path / "results") == []


# ----------------------------------------------------------------------------- a real small disk


@pytest.fixture
def tiny_disk(tmp_path):
    """A 160 kB tmpfs (root only; skipped where mounting is impossible)."""
    mount_point = tmp_path / f"tmpfs_{uuid.uuid4().hex[:6]}"
    mount_point.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mount_point)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def test_real_full_disk_and_read_only_folder(tiny_disk, tmp_path, monkeypatch, capsys):
    from medplan.cli.convert import main as convert_main

    small = synthetic.write_isic2018(tmp_path / "small", n=2, size=(32, 40), duplicates=False, hairs=False)
    big = synthetic.write_isic2018(tmp_path / "big", n=30, size=(96, 112), duplicates=False, hairs=False)
    monkeypatch.setenv("MEDPLAN_RAW", str(tiny_disk))
    assert convert_main(["isic2018", str(small), "--no-progress"]) == 0
    before = snapshot(tiny_disk / "ISIC2018")
    capsys.readouterr()
    assert convert_main(["isic2018", str(big), "--force", "--no-progress"]) == 1
    one_line_error(capsys.readouterr().err, f"{tiny_disk}/ISIC2018", ENOSPC_TEXT, "free now")
    assert snapshot(tiny_disk / "ISIC2018") == before and hidden_temporaries(tiny_disk) == []

    res = subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot remount read-only: {res.stderr.strip()}")
    assert convert_main(["isic2018", str(small), "-d", "OTHER", "--no-progress"]) != 0
    one_line_error(capsys.readouterr().err, str(tiny_disk), os.strerror(errno.EROFS))
    assert snapshot(tiny_disk / "ISIC2018") == before


def test_real_full_disk_during_training(tiny_disk, tmp_path, monkeypatch, capsys):
    """The results folder on a nearly full disk: one line (here for training.log or config.json),
    no logging traceback, the preprocessed files intact."""
    from medplan.cli.train import main as train_main

    make_dataset(tmp_path, epochs={"lr_search": 1, "cv": 1})
    use_roots(monkeypatch, tmp_path)
    monkeypatch.setenv("MEDPLAN_RESULTS", str(tiny_disk))
    before = snapshot(tmp_path / "preprocessed")
    free = shutil.disk_usage(tiny_disk).free
    (tiny_disk / "filler").write_bytes(b"\0" * max(0, free - 8192))
    code = train_main(["TOY", "unet", "0", "--device", "cpu", "--num-workers", "0", "--no-progress",
                       "--model-opt", "base_channels=4", "--model-opt", "depth=2"])
    assert code == 1
    err = capsys.readouterr().err
    one_line_error(err, "medplan_train: error: ", f"{tiny_disk}/TOY/unet/fold_0/", ENOSPC_TEXT)
    assert snapshot(tmp_path / "preprocessed") == before and hidden_temporaries(tiny_disk) == []


def test_permission_denied_folder(medplan_env, capsys):
    """chmod 0555 on the preprocessed folder (root ignores permissions: skipped as root)."""
    if os.geteuid() == 0:
        pytest.skip("root ignores folder permissions (the tmpfs test covers a read-only folder)")
    from medplan.cli.convert import main as convert_main
    from medplan.cli.plan import main as plan_main

    assert convert_main(["isic2018", str(isic(medplan_env / "dl")), "--no-progress"]) == 0
    pre = medplan_env / "preprocessed"
    pre.mkdir()
    pre.chmod(0o555)
    try:
        assert plan_main(["-d", "ISIC2018", "--no-progress", "-j", "0"]) != 0
        one_line_error(capsys.readouterr().err, str(pre), os.strerror(errno.EACCES))
    finally:
        pre.chmod(0o755)


def test_worker_os_error_keeps_file_and_operation(tmp_path):
    """An OSError crossing a process boundary keeps its file; medplan's records keep the operation."""
    import pickle

    from medplan.io import describe_os_error, os_error_from_record, os_error_record, with_path

    exc = with_path(OSError(errno.ENOSPC, ENOSPC_TEXT), tmp_path / "a.npy", "write")
    assert pickle.loads(pickle.dumps(exc)).filename == str(tmp_path / "a.npy")
    back = os_error_from_record(pickle.loads(pickle.dumps(os_error_record(
        with_path(OSError(errno.EACCES, "Permission denied"), tmp_path / "b.png", "read")))))
    assert describe_os_error(back) == f"{tmp_path / 'b.png'}: could not read (Permission denied)"
