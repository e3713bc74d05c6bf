"""Where a study's jobs run. Every backend implements the same operations, and the driver
needs nothing else of it:

* :meth:`Backend.run_round` runs or submits one round of tasks, telling the driver through
  :class:`JobEvents` when each job starts and (if it waits for it) ends; it returns the jobs
  still queued or running, for the driver to wait on (empty when it saw them all end);
* :meth:`Backend.alive`, :meth:`Backend.cancel`: the queue's view of job ids;
* :meth:`Backend.log_path`, :meth:`Backend.error`: a job's log and its one-line error.

:class:`InlineBackend` runs tasks in this process, :class:`LocalBackend` through submitit's
local executor (one job per visible GPU at a time), :class:`medplan.study.slurm.SlurmBackend`
as SLURM array jobs with stage dependencies.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import submitit
import torch

from medplan.study.jobs import TaskRunner, job_env, read_outcome, run_task
from medplan.study.model import JOB_ID, Study, Task, dependencies, tasks, tasks_by_key
from medplan.study.state import is_done


class JobEvents(Protocol):
    """What a backend reports while it runs a round (the driver records it in ``study.json``)."""

    poll_s: float                           # seconds between looks at running jobs

    def log(self, message: str) -> None: ...

    def jobs_started(self, started: dict[Task, str]) -> None:
        """Jobs (task -> job id) were submitted or started."""

    def job_ended(self, task: Task, job_id: str) -> None:
        """A job ended (its results on disk say whether it succeeded)."""


class Backend:
    """Runs tasks, tells which of its jobs are still alive, and where their logs are."""

    name = "?"

    def run_round(self, study: Study, batch: list[Task], after: dict[str, list[str]],
                  events: JobEvents) -> dict[str, str]:
        """Run or submit ``batch`` (dependency order; ``after``: key -> keys of the batch it waits
        for). Returns the jobs still queued or running (key -> job id) for the driver to wait on."""
        raise NotImplementedError

    def alive(self, job_ids: Iterable[str]) -> set[str]:
        raise NotImplementedError

    def cancel(self, job_ids: Iterable[str]) -> list[str]:
        """Cancel the jobs; returns those it could not cancel."""
        return []

    def log_path(self, job_id: str) -> str | None:
        return None

    def error(self, job_id: str) -> str | None:
        """The one-line error a job recorded when it failed inside Python (None otherwise)."""
        return None


class InlineBackend(Backend):
    """Runs each task in this process, in order (debugging; no isolation)."""

    name = "inline"

    def __init__(self) -> None:
        self.failures: dict[str, str] = {}

    def run_round(self, study: Study, batch: list[Task], after: dict[str, list[str]],
                  events: JobEvents) -> dict[str, str]:
        all_tasks = tasks(study)
        for n, task in enumerate(batch):
            if any(not is_done(study, d) for d in dependencies(study, task, all_tasks)):
                continue
            job_id = f"inline-{os.getpid()}-{time.time_ns()}-{n}"
            events.jobs_started({task: job_id})
            try:
                run_task(study.to_json(), task)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:  # noqa: BLE001 - recorded and retried like a failed job
                self.failures[job_id] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            events.job_ended(task, job_id)
        return {}

    def alive(self, job_ids: Iterable[str]) -> set[str]:
        return set()

    def error(self, job_id: str) -> str | None:
        return self.failures.get(job_id)


class SubmititBackend(Backend):
    """A backend whose jobs are submitit jobs in ``folder`` (logs, and the outcome files)."""

    def __init__(self, folder: Path):
        self.folder = folder

    def job(self, job_id: str) -> Any:
        """submitit's handle of a job (its log paths)."""
        raise NotImplementedError

    def runner(self) -> TaskRunner:
        return TaskRunner(self.folder)

    def log_path(self, job_id: str) -> str | None:
        if not JOB_ID.fullmatch(str(job_id)):
            return None
        return str(self.job(job_id).paths.stderr)

    def error(self, job_id: str) -> str | None:
        """From ``outcomes/JOB_ID.json`` (JSON the job wrote); nothing is unpickled here."""
        outcome = read_outcome(self.folder, job_id)
        if outcome is None:
            return None
        if outcome["status"] in ("error", "interrupted"):
            return outcome["error"] or outcome["status"]
        if outcome["status"] == "running":
            return "the job ended while its task was running (killed, out of memory or out of time?)"
        return None


class LocalBackend(SubmititBackend):
    """submitit's LocalExecutor: one job per visible GPU at a time (one at a time on CPU);
    a job starts once its dependencies are done, and a round returns when all have ended."""

    name = "local"

    def __init__(self, folder: Path):
        super().__init__(folder)
        self.gpus = list(range(torch.cuda.device_count()))
        self.slots = max(1, len(self.gpus))
        self.pending: list[tuple[Task, list[str]]] = []
        self.running: dict[str, Any] = {}   # job_id -> (task, submitit job)
        self.free_gpus = list(self.gpus)
        self.gpu_of: dict[str, int] = {}
        self.study: Study | None = None

    def job(self, job_id: str) -> Any:
        return submitit.local.local.LocalJob(folder=self.folder, job_id=job_id)

    def run_round(self, study: Study, batch: list[Task], after: dict[str, list[str]],
                  events: JobEvents) -> dict[str, str]:
        self.study = study
        self.pending = [(t, list(after.get(t.key, []))) for t in batch]

        def started(task: Task, job_id: str) -> None:
            events.jobs_started({task: job_id})
            events.log(f"{task.key}: started (job {job_id})")

        try:
            while self.step(started, events.job_ended):
                time.sleep(min(events.poll_s, 1.0))
        except BaseException:
            self.cancel(self.running)
            raise
        return {}

    def step(self, on_start: Callable[[Task, str], None], on_end: Callable[[Task, str], None]) -> bool:
        """Reap finished jobs and start ready ones; False once nothing is pending or running."""
        for job_id, (task, job) in list(self.running.items()):
            if job.done():
                del self.running[job_id]
                if job_id in self.gpu_of:
                    self.free_gpus.append(self.gpu_of.pop(job_id))
                on_end(task, job_id)
        assert self.study is not None
        blocked = {t.key for t, _ in self.pending}
        for item in list(self.pending):
            if len(self.running) >= self.slots:
                break
            task, deps = item
            running_keys = {t.key for t, _ in self.running.values()}
            if any(d in blocked or d in running_keys for d in deps):
                continue
            if any(not is_done(self.study, d_task) for d_task in tasks_by_key(self.study, deps)):
                self.pending.remove(item)  # a dependency failed: leave it for the next round
                continue
            job_id, gpu = self._start(task)
            self.pending.remove(item)
            blocked.discard(task.key)
            if gpu is not None:
                self.gpu_of[job_id] = gpu
            on_start(task, job_id)
        return bool(self.pending or self.running)

    def _start(self, task: Task) -> tuple[str, int | None]:
        """Start one job on a free GPU (or the CPU); returns its id and the GPU."""
        assert self.study is not None
        ex = submitit.LocalExecutor(folder=self.folder)
        params: dict[str, Any] = {"timeout_min": 60 * 24 * 7}
        if self.free_gpus:
            gpu = self.free_gpus.pop(0)
            params.update(gpus_per_node=1, visible_gpus=[gpu])
        else:
            gpu = None
        ex.update_parameters(**params)
        job = ex.submit(self.runner(), self.study.to_json(), task, job_env())
        job._cancel_at_deletion = False  # the job outlives this driver (a later one adopts it)
        self.running[job.job_id] = (task, job)
        return job.job_id, gpu

    def alive(self, job_ids: Iterable[str]) -> set[str]:
        live = set()
        for job_id in job_ids:
            try:
                pid = int(job_id)
                os.kill(pid, 0)
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes() if Path(f"/proc/{pid}").exists() else b"submitit"
                if b"submitit" in cmd:
                    live.add(job_id)
            except (ValueError, ProcessLookupError, PermissionError, OSError):
                pass
        return live

    def cancel(self, job_ids: Iterable[str]) -> list[str]:
        for job_id in list(job_ids):
            if job_id in self.alive([job_id]):
                os.kill(int(job_id), signal.SIGTERM)
        return []
