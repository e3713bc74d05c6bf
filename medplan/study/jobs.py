"""What a job runs (:func:`run_task`: exactly what ``medplan_tune`` / ``medplan_train --continue``
do) and the small JSON file in which it records how it ended (``outcomes/JOB_ID.json``), so
the driver never needs submitit's result pickle."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from medplan.errors import MedplanError
from medplan.io import atomic_write_json, read_json
from medplan.study.model import CONTROL, JOB_ID, OUTCOMES_DIR, Study, Task, now, searches_lr
from medplan.study.report import write_study_report
from medplan.study.state import lr_search_summary, stale_advice, stale_reasons
from medplan.trainers import train, tune

import submitit
from submitit.helpers import Checkpointable

OUTCOME_STATES = ("running", "done", "error", "interrupted")


def train_overrides(study: Study, stage: str) -> dict[str, Any]:
    """The study's training settings for one stage (``lr_search`` or ``cv``)."""
    overrides = {k: v for k, v in study.overrides.items() if k not in ("lr", "epochs", "stage", "force")}
    overrides.setdefault("progress", False)
    epochs = study.epochs_lr_search if stage == "lr_search" else study.epochs_cv
    if epochs is not None and stage == "cv":
        overrides["epochs"] = int(epochs)
    return overrides


def run_task(study_json: dict, task: Task, env: dict[str, str] | None = None) -> str:
    """Run one task (in a job's process); exactly what medplan_tune / medplan_train --continue do."""
    for k, v in (env or {}).items():
        os.environ.setdefault(k, v)
    study = Study.from_json(study_json)
    if task.kind == "lr_search":
        tune(task.dataset, task.arch, lrs=study.lrs, epochs=study.epochs_lr_search,
             overrides=train_overrides(study, "lr_search"), model_options=study.model_options.get(task.arch))
    elif task.kind == "fold":
        overrides = train_overrides(study, "cv")
        if searches_lr(study, task.arch):
            search = lr_search_summary(study, task.dataset, task.arch)
            if search is None:
                raise MedplanError(f"{task.key}: the LR search of {task.dataset}/{task.arch} has not finished")
            overrides["lr"] = float(search["best_lr"])
        why = stale_reasons(study, task)
        if why:
            if not study.rerun_stale:
                raise MedplanError(stale_advice({task.key: why}))
            overrides["force"] = True  # retrain: the trainer replaces the stale run (never a running one)
        train(task.dataset, task.arch, task.fold, continue_training=True, overrides=overrides,
              model_options=study.model_options.get(task.arch))
    else:
        write_study_report(study)
    return task.key


def job_env() -> dict[str, str]:
    """The medplan folders of this process, for a job that runs elsewhere."""
    keys = ("MEDPLAN_RAW", "MEDPLAN_PREPROCESSED", "MEDPLAN_RESULTS")
    return {k: os.environ[k] for k in keys if k in os.environ}


def one_line(text: object, limit: int = 300) -> str:
    """``text`` as one printable line of at most ``limit`` characters."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    line = CONTROL.sub(" ", lines[0] if lines else "")
    return line if len(line) <= limit else line[:limit - 3] + "..."


def outcome_path(folder: str | Path, job_id: object) -> Path | None:
    """``FOLDER/outcomes/JOB_ID.json``, or None for anything that is not a job id."""
    if not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
        return None
    return Path(folder) / OUTCOMES_DIR / f"{job_id}.json"


def read_outcome(folder: str | Path, job_id: object) -> dict[str, str] | None:
    """A job's outcome as its task runner wrote it (JSON, checked): status and one-line error."""
    path = outcome_path(folder, job_id)
    if path is None or not path.is_file():
        return None
    try:
        data = read_json(path)
    except MedplanError:
        return None
    if not isinstance(data, dict) or data.get("status") not in OUTCOME_STATES:
        return None
    return {"status": data["status"], "error": one_line(data.get("error") or "")}


class TaskRunner(Checkpointable):
    """What a submitit job runs: the task, with its outcome written as JSON beside the jobs'
    logs (``outcomes/JOB_ID.json``) so the driver never needs submitit's result pickle.
    Checkpointable: a job that times out or is pre-empted requeues itself and resumes (--continue)."""

    def __init__(self, jobs_folder: str | Path | None = None):
        self.jobs_folder = None if jobs_folder is None else str(jobs_folder)

    def _write(self, task: Task, status: str, started: str, error: str | None = None) -> None:
        if self.jobs_folder is None:
            return
        try:
            job_id = submitit.JobEnvironment().job_id
        except Exception:  # noqa: BLE001 - not inside a submitit job
            return
        path = outcome_path(self.jobs_folder, job_id)
        if path is None:
            return
        record = {"format": "medplan-job-outcome-1", "task": task.key, "job_id": job_id, "status": status,
                  "error": error, "started": started, "ended": None if status == "running" else now(),
                  "host": os.uname().nodename, "pid": os.getpid()}
        try:
            atomic_write_json(path, record)
        except OSError:  # the outcome is a courtesy: the results on disk are the truth
            pass

    def __call__(self, study_json: dict, task: Task, env: dict[str, str]) -> str:
        started = now()
        self._write(task, "running", started)
        try:
            key = run_task(study_json, task, env)
        except Exception as exc:
            self._write(task, "error", started, one_line(f"{type(exc).__name__}: {exc}"))
            raise
        except BaseException as exc:  # timeout/pre-emption signals, Ctrl-C: submitit requeues or stops
            self._write(task, "interrupted", started, one_line(f"{type(exc).__name__}: {exc}"))
            raise
        self._write(task, "done", started)
        return key
