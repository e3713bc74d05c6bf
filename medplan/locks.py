"""Exclusive locks that hold on the shared filesystems clusters use (NFS, Lustre, GPFS).

One lock per fold run (``fold_K/.lock``) and per dataset stage (``$MEDPLAN_PREPROCESSED/NAME/.lock``
for plan and preprocess, ``$MEDPLAN_RAW/.NAME.lock`` for convert), so two jobs never write one
folder at once and ``--force`` can never delete a run that is still going.

No ``flock``/``fcntl`` (unreliable or disabled on many cluster filesystems). The lock is a
small JSON file, written complete under a temporary name and then hard-linked to the lock
name: ``link`` is atomic and fails when the name exists, on local disks and over NFS alike.
It records who holds it::

    {"format": "medplan-lock-1", "purpose": "train CAMUS/unet/fold_0", "host": "node17",
     "pid": 4242, "pid_start": "123456", "user": "ana", "started": "2026-05-01T10:00:00",
     "command_line": ["medplan_train", "CAMUS", "unet", "0"], "slurm": null, "heartbeat_s": 30,
     "stale_after_s": 600, "token": "9f0c..."}

While it is held, a daemon thread touches the file (its modification time is the heartbeat)
every ``heartbeat_s`` seconds. A lock is *stale*, and is taken over with a note on stderr,
when its holder is a process of this host that no longer runs (``os.kill(pid, 0)``, with the
process start time guarding against a reused pid), when it was left by an earlier run of this
very SLURM job (same job id, fewer requeues: a preempted job that restarts on another node),
or when its heartbeat is older than ``stale_after_s`` (default 10 min;
``MEDPLAN_LOCK_STALE_AFTER``), which covers holders on other hosts. A live process of this
host holds its lock however old its heartbeat (it may be stopped, not dead).

A take-over happens under a guard file (``.lock.takeover``, created atomically): it reads the
lock again, renames it to a unique hidden name, checks that what it moved is the very file it
judged stale (else it puts it back), then creates its own lock atomically as above; so of
several processes taking over at once exactly one wins.

Anyone else is refused at once with one line naming the holder. Within one thread the lock
is reentrant (``preprocess`` plans while holding its dataset's lock); another thread of the
same process is refused like another process.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import functools
import getpass
import json
import os
import re
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from medplan.errors import MedplanError
from medplan.io import remove_entry, remove_stale_temporaries
from medplan.paths import preprocessed_dir

LOCK_FORMAT = "medplan-lock-1"
LOCK_NAME = ".lock"
DEFAULT_HEARTBEAT_S = 30.0
DEFAULT_STALE_AFTER_S = 600.0
ENV_STALE_AFTER = "MEDPLAN_LOCK_STALE_AFTER"
ENV_HEARTBEAT = "MEDPLAN_LOCK_HEARTBEAT"
_CMD_SHOWN = 160
TAKEOVER_GUARD_STALE_S = 30.0  # a take-over guard older than this was left by a dead process
ACQUIRE_PATIENCE_S = 10.0      # give up when the lock file keeps changing for this long
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP), errno.EMLINK}


class LockedError(MedplanError):
    """The lock is held by another live process (or another thread of this one)."""

    def __init__(self, message: str, path: str | Path | None, holder: dict[str, Any]):
        super().__init__(message, path)
        self.holder = holder


# ----------------------------------------------------------------------------- helpers


def _env_seconds(name: str, default: float) -> float:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        raise MedplanError(f"${name} must be a number of seconds, got {value!r}") from None
    if not seconds > 0:
        raise MedplanError(f"${name} must be a positive number of seconds, got {value!r}")
    return seconds


def _hostname() -> str:
    return socket.gethostname()


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its last ')'
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


def _slurm_job() -> dict[str, Any] | None:
    """This process's SLURM job and how often it was requeued (None outside SLURM)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    try:
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    except ValueError:
        restarts = 0
    return {"job_id": job, "restart_count": restarts}


def _pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # runs, under another user
    except OSError:
        return True  # cannot tell: assume it runs
    if start is not None:
        now = _process_start(pid)
        if now is not None and now != start:
            return False  # the pid belongs to a newer process
    return True


def _one_line(value: Any, limit: int = _CMD_SHOWN) -> str:
    """Text from a lock file (anyone could have written it) made safe for a one-line message."""
    text = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    text = re.sub(r"[^\x20-\x7e]", "?", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read(path: Path) -> tuple[bytes, dict[str, Any] | None, os.stat_result] | None:
    """The lock file's bytes, parsed content (None if unreadable) and stat; None when absent."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read(65536)
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise MedplanError("is a folder, not a lock file; remove it", path) from None
    try:
        info = json.loads(data.decode("utf-8"))
        if not isinstance(info, dict):
            info = None
    except (UnicodeDecodeError, json.JSONDecodeError):
        info = None
    return data, info, st


def _stale_reason(info: dict[str, Any] | None, st: os.stat_result, stale_after: float) -> str | None:
    """Why the lock is stale, or None while its holder may still run."""
    age = time.time() - st.st_mtime
    mine, theirs = _slurm_job(), (info or {}).get("slurm")
    if mine is not None and isinstance(theirs, dict) and theirs.get("job_id") == mine["job_id"] \
            and isinstance(theirs.get("restart_count"), int) and theirs["restart_count"] < mine["restart_count"]:
        # SLURM ends a job before it requeues it: the holder was this job's earlier run
        return f"left by an earlier run of SLURM job {mine['job_id']} (requeued since)"
    if info is not None and info.get("host") == _hostname() and isinstance(info.get("pid"), int):
        pid = info["pid"]
        if pid == os.getpid() and info.get("pid_start") == _process_start(pid):
            return None  # this process (another thread, or a lock not released): never stale
        start = info.get("pid_start") if isinstance(info.get("pid_start"), str) else None
        if not _pid_alive(pid, start):
            return f"process {pid} no longer runs on this host"
        return None  # alive on this host: its heartbeat does not matter (it may be stopped, not dead)
    if age > stale_after:
        return f"no heartbeat for {age:.0f} s (limit {stale_after:.0f} s)"
    return None


def describe_holder(info: dict[str, Any] | None, st: os.stat_result | None = None) -> str:
    if info is None:
        when = "" if st is None else \
            f", last touched {_dt.datetime.fromtimestamp(st.st_mtime).isoformat(timespec='seconds')}"
        return f"an unreadable lock file{when}"
    text = (f"host {_one_line(info.get('host', '?'), 80)} pid {_one_line(info.get('pid', '?'), 20)} "
            f"since {_one_line(info.get('started', '?'), 40)}")
    details = [_one_line(info["purpose"], 80)] if info.get("purpose") else []
    if info.get("command_line"):
        details.append(f"command: {_one_line(info['command_line'])}")
    return text + (f" ({'; '.join(details)})" if details else "")


# ----------------------------------------------------------------------------- the lock


class FileLock:
    """An exclusive, non-blocking lock file; use :func:`exclusive_lock` (a context manager)."""

    _held: dict[tuple[int, str], "FileLock"] = {}  # (thread id, path) -> lock, for reentrancy
    _registry_lock = threading.Lock()

    def __init__(self, path: str | Path, purpose: str, *, heartbeat_s: float | None = None,
                 stale_after_s: float | None = None):
        self.path = Path(os.path.abspath(Path(path).expanduser()))
        self.purpose = purpose
        self.stale_after_s = stale_after_s if stale_after_s is not None else _env_seconds(
            ENV_STALE_AFTER, DEFAULT_STALE_AFTER_S)
        default_beat = min(DEFAULT_HEARTBEAT_S, self.stale_after_s / 4)
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else _env_seconds(ENV_HEARTBEAT, default_beat)
        self.token = uuid.uuid4().hex
        self.created_dirs: list[Path] = []
        self.took_over: str | None = None
        self._data: bytes | None = None
        self._depth = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost_reported = False

    # -- content
    def _content(self) -> bytes:
        info = {
            "format": LOCK_FORMAT, "purpose": self.purpose, "host": _hostname(), "pid": os.getpid(),
            "pid_start": _process_start(os.getpid()), "user": _user(),
            "started": _dt.datetime.now().isoformat(timespec="seconds"), "started_unix": time.time(),
            "command_line": list(sys.argv), "slurm": _slurm_job(), "heartbeat_s": self.heartbeat_s,
            "stale_after_s": self.stale_after_s, "token": self.token,
        }
        return (json.dumps(info, indent=1) + "\n").encode("utf-8")

    def _make_parents(self) -> None:
        missing = []
        folder = self.path.parent
        while not folder.exists() and folder != folder.parent:
            missing.append(folder)
            folder = folder.parent
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MedplanError(f"cannot create the folder for a lock ({exc.strerror or exc})",
                               self.path.parent) from None
        for d in missing:
            if d not in self.created_dirs:
                self.created_dirs.append(d)

    def _try_create(self) -> bool:
        """Write the content to a temporary name, then link it to the lock name (atomic)."""
        tmp = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, self._data)
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, self.path)
                return True
            except FileExistsError:
                return False
            except OSError as exc:
                if exc.errno in _NO_HARD_LINKS:
                    # a filesystem without hard links: fall back to an exclusive create
                    return self._create_exclusive()
                raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _create_exclusive(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, self._data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def _take_over(self, data: bytes, st: os.stat_result) -> bool | None:
        """Replace the stale lock (the file read as ``data``) by this one. True: this lock holds
        now; False: the lock file changed meanwhile (look again); None: another process is
        taking it over right now (wait a moment, then look again).

        Take-overs are serialised by a guard file created atomically beside the lock; under it
        the lock is read again, renamed to a unique name, checked to be the very file judged
        stale (else put back) and only then replaced, so exactly one of many wins."""
        guard = self.path.with_name(f"{self.path.name}.takeover")
        try:
            os.close(os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            with contextlib.suppress(OSError):
                if time.time() - os.stat(guard).st_mtime > TAKEOVER_GUARD_STALE_S:
                    os.unlink(guard)  # its creator died mid-take-over (which takes milliseconds)
            return None
        try:
            now = _read(self.path)
            if now is None or now[0] != data or now[2].st_ino != st.st_ino:
                return False
            aside = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex[:8]}.old")
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                return False
            moved = _read(aside)
            if moved is None or moved[0] != data:
                # released and re-created in between by a regular start: put that one back
                with contextlib.suppress(OSError):
                    os.link(aside, self.path)
                with contextlib.suppress(OSError):
                    os.unlink(aside)
                return False
            with contextlib.suppress(OSError):
                os.unlink(aside)
            return self._try_create()
        finally:
            with contextlib.suppress(OSError):
                os.unlink(guard)

    # -- acquire / release
    def acquire(self) -> "FileLock":
        key = (threading.get_ident(), str(self.path))
        with self._registry_lock:
            mine = self._held.get(key)
        if mine is not None:
            mine._depth += 1
            return mine
        self._data = self._content()
        deadline = time.monotonic() + ACQUIRE_PATIENCE_S
        while True:
            if time.monotonic() > deadline:
                raise MedplanError("could not create the lock file (it keeps changing); try again", self.path)
            try:
                self._make_parents()
                if self._try_create():
                    break
                found = _read(self.path)
                if found is None:
                    continue  # released meanwhile: try again
                data, info, st = found
                reason = _stale_reason(info, st, self.stale_after_s)
                if reason is None:
                    raise LockedError(self._refusal(info, st), self.path.parent, info or {})
                taken = self._take_over(data, st)
            except FileNotFoundError:
                continue  # the folder vanished (emptied and removed by another process): again
            except OSError as exc:
                raise MedplanError(f"cannot create lock file ({exc.strerror or exc})", self.path) from None
            if taken:
                self.took_over = f"{describe_holder(info, st)}: {reason}"
                print(f"medplan: taking over the stale lock {self.path} of {self.took_over}", file=sys.stderr,
                      flush=True)
                break
            if taken is None:
                time.sleep(0.02)
        self._depth = 1
        with self._registry_lock:
            self._held[key] = self
        self._key = key
        if self.heartbeat_s > 0:
            self._thread = threading.Thread(target=self._beat, name=f"medplan-lock-heartbeat {self.path}", daemon=True)
            self._thread.start()
        return self

    def _refusal(self, info: dict[str, Any] | None, st: os.stat_result) -> str:
        return (f"locked by {describe_holder(info, st)}; wait for it to finish, or if that process "
                f"is gone, delete {self.path} (a lock without a heartbeat for {self.stale_after_s:.0f} s "
                f"is taken over automatically)")

    def owned(self) -> bool:
        """True while the lock file on disk is still this lock's."""
        found = _read(self.path)
        return found is not None and found[0] == self._data

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if self.owned():
                    os.utime(self.path)
                elif not self._lost_reported:
                    self._lost_reported = True
                    found = _read(self.path)
                    holder = describe_holder(found[1], found[2]) if found else "nobody"
                    print(f"medplan: WARNING: lost the lock {self.path} ({self.purpose}); it is now held by {holder}",
                          file=sys.stderr, flush=True)
            except (OSError, MedplanError):
                pass  # a hiccup of the filesystem: try again at the next beat

    def release(self) -> None:
        if self._depth > 1:
            self._depth -= 1
            return
        if self._depth == 0:
            return
        self._depth = 0
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._registry_lock:
            self._held.pop(self._key, None)
        with contextlib.suppress(OSError):
            if self.owned():
                os.unlink(self.path)
        for d in self.created_dirs:  # deepest first; only folders left empty
            with contextlib.suppress(OSError):
                d.rmdir()

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _user() -> str | None:
    try:
        return getpass.getuser()
    except Exception:  # no user name in some containers
        return None


@contextlib.contextmanager
def exclusive_lock(path: str | Path, purpose: str, *, heartbeat_s: float | None = None,
                   stale_after_s: float | None = None) -> Iterator[FileLock]:
    """Hold the lock file ``path`` for the block; :class:`LockedError` at once if another holds it.

    Folders missing on the way to ``path`` are created, and removed again on release if they
    are then empty (a failed start leaves no empty folder behind). Reentrant within a thread.
    """
    lock = FileLock(path, purpose, heartbeat_s=heartbeat_s, stale_after_s=stale_after_s).acquire()
    try:
        yield lock
    finally:
        lock.release()


def holds_lock(path: str | Path) -> bool:
    """True when this thread holds the lock ``path``."""
    key = (threading.get_ident(), os.path.abspath(Path(path).expanduser()))
    return key in FileLock._held


# ----------------------------------------------------------------------------- the stage locks


def dataset_lock_path(name: str) -> Path:
    return preprocessed_dir(name) / LOCK_NAME


@contextlib.contextmanager
def dataset_stage(name: str, stage: str) -> Iterator[FileLock]:
    """The lock of dataset ``name``'s preprocessed folder, shared by plan and preprocess; on
    first entry it removes the temporaries that killed runs left there (and in its arrays)."""
    path = dataset_lock_path(name)
    first = not holds_lock(path)
    with exclusive_lock(path, purpose=f"{stage} {name}") as lock:
        if first:
            remove_stale_temporaries(path.parent, recursive=True)
        yield lock


def locked_dataset_stage(stage: str):
    """Decorator for ``fn(name, ...)``: run it holding dataset ``name``'s stage lock."""

    def decorate(fn):
        @functools.wraps(fn)
        def locked(name, *args, **kwargs):
            with dataset_stage(name, stage):
                return fn(name, *args, **kwargs)

        return locked

    return decorate


_SIBLING_TMP = r"\.{name}\.[A-Za-z0-9_]{{8}}\.(tmp|old)"


def remove_stale_siblings(path: str | Path) -> list[Path]:
    """Remove the temporaries a killed atomic write of ``path`` (a folder or file) left beside
    it (``.NAME.XXXXXXXX.tmp`` / ``.old``), and nothing of its neighbours. Call it while
    holding the lock of ``path``."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern = re.compile(_SIBLING_TMP.format(name=re.escape(path.name)))
    return [entry for entry in path.parent.iterdir() if pattern.fullmatch(entry.name) and remove_entry(entry)]
