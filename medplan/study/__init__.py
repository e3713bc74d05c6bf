"""The whole benchmark as one study: LR search -> cross-validation folds -> report.

A study is a grid (datasets x architectures x folds) kept in ``$MEDPLAN_RESULTS/study.json``
with the record of every job submitted for it. Its tasks and their dependencies::

    DATASET/ARCH/lr_search   (medplan_tune: the plan's LR grid on fold 0)
    DATASET/ARCH/fold_K      (medplan_train --continue at lr_search.json's best LR)  after lr_search
    report                   (summary.* of every fold + the efficiency table)         after every fold

The files are the truth: a task is done when its results are on disk (a fold: final
checkpoint + validation summary), so a rerun after any crash submits only what is missing,
and an interrupted fold resumes from its latest checkpoint. Jobs go through submitit: the
``local`` executor runs them on this machine (one per visible GPU at a time, one at a time
on CPU), ``slurm`` hands them to the cluster as array jobs with stage dependencies,
``inline`` runs them in this process (debugging, tests). A driver that finds jobs of an
earlier driver still queued or running waits for them instead of submitting them again.

Trust. ``study.json`` is read like any file someone else may have edited: its dataset and
architecture names follow :mod:`medplan.names`, its job ids and SLURM options are checked, so
nothing from it can put a line into a batch script (submitit's ``job_name`` is built only from
checked names, and every value that reaches the script is refused if it holds a control
character). The driver learns how a job ended from a small JSON file the job writes itself
(``study_jobs/EXECUTOR/outcomes/JOB_ID.json``: status, one-line error, times), never by
unpickling anything. Every way SLURM or submitit can refuse (no ``sbatch``/``squeue``/``srun``
on PATH, a refused partition, sbatch failing) is one :class:`MedplanError` line, with the
jobs of the round that were already queued cancelled.

Stale folds. A fold counts as done only when its results are complete *and* its
``config.json`` records what this study would run now: the same plan (hashed, timestamps
aside), LR (the LR search's choice, else what ``medplan_train`` would pick), epochs, batch size
and architecture options. A fold trained (or partly trained) with other settings is *stale*:
``--status`` and ``--dry-run`` list it with what differs, and it never counts as complete.
Stale folds are not retrained silently: a run that finds one refuses before submitting
anything, saying which folds differ and how; ``--rerun-stale`` (``Study.rerun_stale``, set
anew by every ``medplan_benchmark`` call) retrains them with ``--force`` semantics, which
replaces their earlier results (the trainer's fold lock keeps a fold that is still training
from being touched). A fold whose LR is chosen by an LR search that has not finished yet is
judged after the search: if it is stale then and ``--rerun-stale`` was not given, its job
refuses at once (training nothing) and it is reported as failed with the same advice, not
retried.

Layout: :mod:`~medplan.study.model` (the study file, tasks, checks), :mod:`~medplan.study.state`
(done and stale, from the files), :mod:`~medplan.study.jobs` (what a job runs, its outcome
file), :mod:`~medplan.study.backends` and :mod:`~medplan.study.slurm` (where jobs run; each
backend implements :class:`~medplan.study.backends.Backend`), :mod:`~medplan.study.driver`
(rounds and records), :mod:`~medplan.study.report` (the report task) and
:mod:`~medplan.study.status` (``--status``, ``--dry-run``).
"""
from __future__ import annotations

from medplan.study.backends import Backend, InlineBackend, JobEvents, LocalBackend, SubmititBackend
from medplan.study.driver import Driver, RunResult, make_backend, run_study
from medplan.study.jobs import TaskRunner, job_env, one_line, outcome_path, read_outcome, run_task, train_overrides
from medplan.study.model import (
    EXECUTORS,
    JOB_ID,
    JOBS_DIR,
    OUTCOMES_DIR,
    REPORT_FILE,
    REPORT_STATE,
    STUDY_FILE,
    SlurmOptions,
    Study,
    Task,
    check_study,
    dependencies,
    load_study,
    save_study,
    study_folds,
    study_path,
    tasks,
)
from medplan.study.report import efficiency_rows, write_study_report
from medplan.study.slurm import SlurmBackend
from medplan.study.state import (
    PLAN_VOLATILE,
    completed_folds,
    expected_run,
    fold_complete,
    is_done,
    lr_search_summary,
    plan_hash,
    plan_jobs,
    stale_advice,
    stale_folds,
    stale_reasons,
)
from medplan.study.status import dry_run, format_dry_run, format_status, status_rows

__all__ = [
    "Backend", "InlineBackend", "JobEvents", "LocalBackend", "SlurmBackend", "SubmititBackend", "make_backend",
    "Driver", "RunResult", "run_study",
    "TaskRunner", "job_env", "one_line", "outcome_path", "read_outcome", "run_task", "train_overrides",
    "EXECUTORS", "JOB_ID", "JOBS_DIR", "OUTCOMES_DIR", "REPORT_FILE", "REPORT_STATE", "STUDY_FILE",
    "SlurmOptions", "Study", "Task", "check_study", "dependencies", "load_study", "save_study", "study_folds",
    "study_path", "tasks",
    "efficiency_rows", "write_study_report",
    "PLAN_VOLATILE", "completed_folds", "expected_run", "fold_complete", "is_done", "lr_search_summary",
    "plan_hash", "plan_jobs", "stale_advice", "stale_folds", "stale_reasons",
    "dry_run", "format_dry_run", "format_status", "status_rows",
]
