"""The study's data: the grid and how to run it (:class:`Study`, kept in ``study.json``), its
tasks and their dependencies, and the checks that run before anything is submitted."""
from __future__ import annotations

import dataclasses
import datetime as dt
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medplan.architectures import get_entry, is_model, list_models
from medplan.errors import MedplanError
from medplan.io import atomic_write_json, read_json
from medplan.names import check_names
from medplan.paths import results_root as default_results_root
from medplan.stagefiles import load_plan, load_splits
from medplan.trainers import get_trainer

STUDY_FILE = "study.json"
REPORT_FILE = "study_report.md"
REPORT_STATE = "study_report.json"
EXECUTORS = ("local", "slurm", "inline")
JOBS_DIR = "study_jobs"
OUTCOMES_DIR = "outcomes"
#: job ids as SLURM (``123``, ``123_4``), the local executor (a pid) and the inline one write them
JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
#: a control character: never allowed into a batch script or a one-line message
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def now() -> str:
    """The time stamp of job records and reports (seconds)."""
    return dt.datetime.now().isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- study file
@dataclass
class SlurmOptions:
    partition: str | None = None
    gpus_per_job: int = 1
    cpus_per_job: int = 4
    mem_gb: float | None = None
    time_min: int = 24 * 60
    array_parallelism: int = 64
    account: str | None = None
    qos: str | None = None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class Study:
    """The grid and how to run it; ``jobs`` records every submission (key -> record)."""

    datasets: list[str]
    archs: list[str]
    folds: list[int] | None = None              # None: every fold of splits.json
    executor: str = "local"
    lr_search: bool = True
    lrs: list[float] | None = None               # None: the plan's lr_grid
    epochs_lr_search: int | None = None          # None: plan.epochs.lr_search
    epochs_cv: int | None = None                 # None: plan.epochs.cv
    overrides: dict[str, Any] = field(default_factory=dict)        # TrainSettings fields
    model_options: dict[str, dict] = field(default_factory=dict)   # arch -> builder options
    retries: int = 2
    measure_steps: int = 5
    rerun_stale: bool = False                    # retrain stale folds (set by each medplan_benchmark call)
    slurm: SlurmOptions = field(default_factory=SlurmOptions)
    jobs: dict[str, dict] = field(default_factory=dict)
    created: str = field(default_factory=now)

    def to_json(self) -> dict:
        return {"format": "medplan-study-1", **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: dict, path: Path | None = None) -> "Study":
        data = {k: v for k, v in data.items() if k != "format"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown or not data.get("datasets") or not data.get("archs"):
            raise MedplanError(f"not a study file (unknown keys {unknown} or no datasets/archs)", path)
        slurm_data = data.pop("slurm", None) or {}
        if not isinstance(slurm_data, dict):
            raise MedplanError("'slurm' must be an object", path)
        slurm = SlurmOptions(**{k: v for k, v in slurm_data.items()
                                if k in {f.name for f in dataclasses.fields(SlurmOptions)}})
        study = cls(**data, slurm=slurm)
        study.validate(path)
        return study

    def validate(self, source: str | Path | None = None) -> "Study":
        """Types, ranges and names of every field: a study file from elsewhere (or a bad
        command line) fails here, before anything is submitted."""
        def bad(what: str) -> MedplanError:
            return MedplanError(f"invalid study: {what}", source)

        for name, kind in (("datasets", "dataset name"), ("archs", "architecture name")):
            value = getattr(self, name)
            if not isinstance(value, list) or not value:
                raise bad(f"'{name}' must be a non-empty list")
            check_names(value, kind, source)
        if self.folds is not None and (not isinstance(self.folds, list) or not all(_is_int(f) and f >= 0
                                                                                 for f in self.folds)):
            raise bad(f"'folds' must be a list of integers >= 0, got {self.folds!r}")
        if not isinstance(self.executor, str) or self.executor not in EXECUTORS:
            raise bad(f"unknown executor {self.executor!r} (known: {', '.join(EXECUTORS)})")
        for name in ("lr_search", "rerun_stale"):
            if not isinstance(getattr(self, name), bool):
                raise bad(f"'{name}' must be true or false")
        if self.lrs is not None and (not isinstance(self.lrs, list) or not self.lrs
                                     or not all(_is_num(x) and x > 0 for x in self.lrs)):
            raise bad(f"'lrs' must be a list of positive numbers, got {self.lrs!r}")
        for name in ("epochs_lr_search", "epochs_cv", "measure_steps"):
            value = getattr(self, name)
            if value is not None and not (_is_int(value) and value >= 1):
                raise bad(f"'{name}' must be an integer >= 1, got {value!r}")
        if not (_is_int(self.retries) and self.retries >= 0):
            raise bad(f"'retries' must be an integer >= 0, got {self.retries!r}")
        if not isinstance(self.overrides, dict) or not all(isinstance(k, str) for k in self.overrides):
            raise bad("'overrides' must be an object of training settings")
        options = self.model_options
        if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
            raise bad("'model_options' must map architecture names to objects")
        check_names(list(self.model_options), "architecture name", source)
        if not isinstance(self.jobs, dict) or not all(isinstance(r, dict) for r in self.jobs.values()):
            raise bad("'jobs' must map task keys to records")
        for key, rec in self.jobs.items():
            job_id = rec.get("job_id")
            if job_id is not None and not (isinstance(job_id, str) and JOB_ID.fullmatch(job_id)):
                raise bad(f"job id {job_id!r} of {key!r} is not a job id")
        self._validate_slurm(bad, source)
        return self

    def _validate_slurm(self, bad, source: str | Path | None) -> None:
        o = self.slurm
        for name in ("partition", "account", "qos"):
            value = getattr(o, name)
            if value is not None:  # a partition list is comma-separated: each part is a name
                if not isinstance(value, str):
                    raise bad(f"slurm {name} must be a string, got {value!r}")
                check_names(value.split(","), f"SLURM {name}", source)
        for name, low in (("gpus_per_job", 0), ("cpus_per_job", 1), ("time_min", 1), ("array_parallelism", 1)):
            value = getattr(o, name)
            if not (_is_int(value) and value >= low):
                raise bad(f"slurm {name} must be an integer >= {low}, got {value!r}")
        if o.mem_gb is not None and not (_is_num(o.mem_gb) and o.mem_gb > 0):
            raise bad(f"slurm mem_gb must be a positive number, got {o.mem_gb!r}")


def study_path(results_root: str | Path | None = None) -> Path:
    return (Path(results_root) if results_root is not None else default_results_root()) / STUDY_FILE


def load_study(results_root: str | Path | None = None) -> Study:
    path = study_path(results_root)
    if not path.is_file():
        raise MedplanError("no study yet: start one with medplan_benchmark -d DATASET... -a ARCH...", path)
    data = read_json(path)
    if not isinstance(data, dict):
        raise MedplanError("not a study file (not a JSON object)", path)
    return Study.from_json(data, path)


def save_study(study: Study, results_root: str | Path | None = None) -> Path:
    path = study_path(results_root)
    atomic_write_json(path, study.to_json())
    return path


def check_study(study: Study) -> None:
    """Every dataset preprocessed, every architecture known: fail before anything is submitted."""
    if study.executor not in EXECUTORS:
        raise MedplanError(f"unknown executor {study.executor!r} (known: {', '.join(EXECUTORS)})")
    if study.retries < 0:
        raise MedplanError(f"retries must be >= 0, got {study.retries}")
    for d in study.datasets:
        load_plan(d)      # MedplanError naming plans.json when not planned/preprocessed
        load_splits(d)
        study_folds(study, d)
    for a in study.archs:
        if not is_model(a):
            raise MedplanError(f"unknown architecture {a!r} (known: {', '.join(list_models())})")
        get_trainer(a).check_architecture(a)


# ----------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class Task:
    kind: str                   # lr_search | fold | report
    dataset: str = ""
    arch: str = ""
    fold: int = -1

    @property
    def key(self) -> str:
        if self.kind == "report":
            return "report"
        return f"{self.dataset}/{self.arch}/" + ("lr_search" if self.kind == "lr_search" else f"fold_{self.fold}")

    @property
    def stage(self) -> str:
        return {"lr_search": "lr_search", "fold": f"fold_{self.fold}", "report": "report"}[self.kind]


def study_folds(study: Study, dataset: str) -> list[int]:
    n = len(load_splits(dataset))
    folds = list(range(n)) if study.folds is None else [int(f) for f in study.folds]
    bad = [f for f in folds if not 0 <= f < n]
    if bad:
        raise MedplanError(f"fold(s) {bad} out of range: {dataset} has {n} folds (0..{n - 1})")
    return folds


def searches_lr(study: Study, arch: str) -> bool:
    """The study runs an LR search for ``arch``: not for an external one (nnU-Net's recipe fixes its LR)."""
    return study.lr_search and not (is_model(arch) and get_entry(arch).external)


def tasks(study: Study) -> list[Task]:
    """Every task of the study in dependency order."""
    out: list[Task] = []
    for d in study.datasets:
        for a in study.archs:
            if searches_lr(study, a):
                out.append(Task("lr_search", d, a))
            out.extend(Task("fold", d, a, k) for k in study_folds(study, d))
    out.append(Task("report"))
    return out


def dependencies(study: Study, task: Task, all_tasks: list[Task]) -> list[Task]:
    if task.kind == "fold" and searches_lr(study, task.arch):
        return [Task("lr_search", task.dataset, task.arch)]
    if task.kind == "report":
        return [t for t in all_tasks if t.kind == "fold"]
    return []


def tasks_by_key(study: Study, keys: Any) -> list[Task]:
    """The study's tasks whose keys are in ``keys``, in dependency order."""
    wanted = set(keys)
    return [t for t in tasks(study) if t.key in wanted]
