"""The study driver: rounds of adopt live jobs -> run what is missing -> wait -> record
failures, until everything is done or only failures remain. What a round runs on is the
backend's business (:class:`medplan.study.backends.Backend`); the driver keeps the records."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from medplan.errors import MedplanError
from medplan.paths import results_root as default_results_root
from medplan.study.backends import Backend, InlineBackend, LocalBackend
from medplan.study.model import JOBS_DIR, Study, Task, check_study, dependencies, now, save_study, tasks
from medplan.study.slurm import SlurmBackend
from medplan.study.state import is_done, plan_jobs, stale_advice, stale_folds, stale_reasons


def make_backend(study: Study, folder: Path) -> Backend:
    if study.executor == "slurm":
        return SlurmBackend(folder, study.slurm)
    if study.executor == "local":
        return LocalBackend(folder)
    return InlineBackend()


@dataclass
class RunResult:
    done: list[str]
    failed: dict[str, str]       # key -> "error (log: path)"
    submitted: list[str]

    @property
    def ok(self) -> bool:
        return not self.failed


class Driver:
    """Rounds of: adopt live jobs -> submit what is missing -> wait -> record failures.

    It is the :class:`~medplan.study.backends.JobEvents` of its backend: the backend tells it
    when jobs start and end, and it records them in ``study.json``."""

    def __init__(self, study: Study, *, results_root: Path | None = None, poll_s: float = 5.0,
                 log: Callable[[str], None] | None = None, backend: Backend | None = None):
        self.study = study
        self.root = Path(results_root) if results_root is not None else default_results_root()
        self.poll_s = poll_s
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.folder = self.root / JOBS_DIR / study.executor
        self.backend = backend or make_backend(study, self.folder)
        self.stale: dict[str, list[str]] = {}

    def save(self) -> None:
        save_study(self.study, self.root)

    def record(self, key: str) -> dict:
        return self.study.jobs.setdefault(key, {"failures": 0})

    # -- what the backend reports
    def jobs_started(self, started: dict[Task, str]) -> None:
        for task, job_id in started.items():
            rec = self.record(task.key)
            rec.update(job_id=job_id, state="submitted", executor=self.study.executor, submitted=now(),
                       attempt=int(rec.get("attempt", 0)) + 1)
            log = self.backend.log_path(job_id)
            if log is not None:  # an inline job has no log of its own
                rec["log"] = log
        self.save()

    def job_ended(self, task: Task, job_id: str) -> None:
        self._finished(task, job_id)
        self.save()

    # -- bookkeeping
    def _finished(self, task: Task, job_id: str, cancelled: bool = False) -> None:
        rec = self.record(task.key)
        if rec.get("job_id") != job_id:
            return
        if is_done(self.study, task):
            rec.update(state="done", ended=now())
        elif cancelled:
            rec.update(state="cancelled", ended=now())
        else:
            rec["failures"] = int(rec.get("failures", 0)) + 1
            rec.update(state="failed", ended=now(), log=self.backend.log_path(job_id),
                       error=self.backend.error(job_id) or "ended without finishing its results")
            self.log(f"{task.key}: job {job_id} failed ({rec['error']}); log: {rec['log']}")

    def _live_jobs(self) -> dict[str, str]:
        """Jobs recorded as submitted whose process/queue entry still exists (an earlier driver's)."""
        submitted = {k: r["job_id"] for k, r in self.study.jobs.items()
                     if r.get("state") in ("submitted", "running") and r.get("job_id")
                     and r.get("executor", self.study.executor) == self.study.executor}
        live = self.backend.alive(submitted.values())
        return {k: j for k, j in submitted.items() if j in live}

    def _reconcile(self) -> None:
        """Records of jobs that ended while nobody watched."""
        live = set(self._live_jobs().values())
        by_key = {t.key: t for t in tasks(self.study)}
        for key, rec in self.study.jobs.items():
            if rec.get("state") in ("submitted", "running") and rec.get("job_id") not in live and key in by_key:
                self._finished(by_key[key], rec["job_id"])

    def wait(self, job_ids: dict[str, str]) -> None:
        """Poll until every job has ended; cancel jobs whose dependency failed."""
        all_tasks = tasks(self.study)
        by_key = {t.key: t for t in all_tasks}
        remaining = dict(job_ids)
        while remaining:
            live = self.backend.alive(remaining.values())
            ended = {k: j for k, j in remaining.items() if j not in live}
            failed_now = []
            for key, job_id in ended.items():
                self._finished(by_key[key], job_id)
                if self.study.jobs[key].get("state") == "failed":
                    failed_now.append(key)
                del remaining[key]
            if failed_now:  # dependents would wait forever: cancel them, retry next round
                doomed = {k: j for k, j in remaining.items()
                          if any(d.key in failed_now for d in dependencies(self.study, by_key[k], all_tasks))}
                self.backend.cancel(doomed.values())
                for k, j in doomed.items():
                    self._finished(by_key[k], j, cancelled=True)
                    del remaining[k]
            if ended:
                self.save()
            if remaining:
                time.sleep(self.poll_s)

    def exhausted(self, task: Task) -> bool:
        return int(self.study.jobs.get(task.key, {}).get("failures", 0)) > self.study.retries

    def runnable(self) -> list[Task]:
        todo = plan_jobs(self.study)
        all_tasks = tasks(self.study)
        blocked: set[str] = set()
        out = []
        for t in todo:  # dependency order
            if self.exhausted(t) or any(d.key in blocked for d in dependencies(self.study, t, all_tasks)):
                blocked.add(t.key)
                continue
            why = stale_reasons(self.study, t) if t.kind == "fold" and not self.study.rerun_stale else None
            if why:  # judged only now (after its LR search): never retrained without --rerun-stale
                self.stale[t.key] = why
                blocked.add(t.key)
                continue
            if t.kind == "report" and blocked:
                continue
            out.append(t)
        return out

    def run_round(self, batch: list[Task]) -> dict[str, str]:
        """Hand a round to the backend; returns the jobs it left queued or running."""
        all_tasks = tasks(self.study)
        in_batch = {t.key for t in batch}
        after = {t.key: [d.key for d in dependencies(self.study, t, all_tasks) if d.key in in_batch] for t in batch}
        return self.backend.run_round(self.study, batch, after, self)

    def run(self, wait: bool = True) -> RunResult:
        self.save()
        submitted: list[str] = []
        for _ in range(self.study.retries + 2):
            live = self._live_jobs()
            if live:
                self.log(f"{len(live)} job(s) of an earlier run still queued or running; waiting for them")
                if not wait:
                    break
                self.wait(live)
            self._reconcile()
            batch = self.runnable()
            if not batch:
                break
            self.log(f"submitting {len(batch)} job(s): " + ", ".join(t.key for t in batch[:6])
                     + (" ..." if len(batch) > 6 else ""))
            submitted += [t.key for t in batch]
            pending = self.run_round(batch)
            if pending:
                if not wait:
                    break
                self.wait(pending)
        self.save()
        return self.result(submitted)

    def result(self, submitted: list[str]) -> RunResult:
        done = [t.key for t in tasks(self.study) if is_done(self.study, t)]
        failed = {}
        for t in tasks(self.study):
            rec = self.study.jobs.get(t.key, {})
            if t.key not in done and rec.get("state") == "failed":
                failed[t.key] = f"{rec.get('error', 'failed')} (log: {rec.get('log') or '-'})"
            elif t.key not in done and t.key in self.stale:
                failed[t.key] = stale_advice({t.key: self.stale[t.key]})
        return RunResult(done=done, failed=failed, submitted=submitted)


def run_study(study: Study, *, wait: bool = True, poll_s: float = 5.0, results_root: Path | None = None,
              log: Callable[[str], None] | None = None) -> RunResult:
    """Check the study, then run it to the end (or until only failures remain). Stale folds
    (see :mod:`medplan.study`) are refused before anything is submitted unless
    ``study.rerun_stale``."""
    check_study(study)
    if not study.rerun_stale:
        stale = stale_folds(study)
        if stale:
            raise MedplanError(stale_advice(stale))
    driver = Driver(study, results_root=results_root, poll_s=poll_s, log=log)
    return driver.run(wait=wait)
