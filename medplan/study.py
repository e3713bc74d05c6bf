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
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from medplan.errors import MedplanError
from medplan.io import atomic_write_json, atomic_write_text, read_json
from medplan.names import check_name, check_names

STUDY_FILE = "study.json"
REPORT_FILE = "study_report.md"
REPORT_STATE = "study_report.json"
EXECUTORS = ("local", "slurm", "inline")
JOBS_DIR = "study_jobs"
OUTCOMES_DIR = "outcomes"
#: job ids as SLURM (``123``, ``123_4``), the local executor (a pid) and the inline one write them
JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


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


@dataclass
class Study:
    """The grid and how to run it; ``jobs`` records every submission (key -> record)."""

    datasets: list[str]
    archs: list[str]
    folds: list[int] | None = None              # None: every fold of splits.json
    executor: str = "local"
    lr_search: bool = True
    lrs: list[float] | None = None               # None: the plan's lr_grid
    epochs_lr_search: int | None = None          # None: plan["epochs"]["lr_search"]
    epochs_cv: int | None = None                 # None: plan["epochs"]["cv"]
    overrides: dict[str, Any] = field(default_factory=dict)        # TrainSettings fields
    model_options: dict[str, dict] = field(default_factory=dict)   # arch -> builder options
    retries: int = 2
    measure_steps: int = 5
    rerun_stale: bool = False                    # retrain stale folds (set by each medplan_benchmark call)
    slurm: SlurmOptions = field(default_factory=SlurmOptions)
    jobs: dict[str, dict] = field(default_factory=dict)
    created: str = field(default_factory=lambda: _dt.datetime.now().isoformat(timespec="seconds"))

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

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for name, kind in (("datasets", "dataset name"), ("archs", "architecture name")):
            value = getattr(self, name)
            if not isinstance(value, list) or not value:
                raise bad(f"'{name}' must be a non-empty list")
            check_names(value, kind, source)
        if self.folds is not None and (not isinstance(self.folds, list) or not all(is_int(f) and f >= 0
                                                                                 for f in self.folds)):
            raise bad(f"'folds' must be a list of integers >= 0, got {self.folds!r}")
        if not isinstance(self.executor, str) or self.executor not in EXECUTORS:
            raise bad(f"unknown executor {self.executor!r} (known: {', '.join(EXECUTORS)})")
        for name in ("lr_search", "rerun_stale"):
            if not isinstance(getattr(self, name), bool):
                raise bad(f"'{name}' must be true or false")
        if self.lrs is not None and (not isinstance(self.lrs, list) or not self.lrs
                                     or not all(is_num(x) and x > 0 for x in self.lrs)):
            raise bad(f"'lrs' must be a list of positive numbers, got {self.lrs!r}")
        for name in ("epochs_lr_search", "epochs_cv", "measure_steps"):
            value = getattr(self, name)
            if value is not None and not (is_int(value) and value >= 1):
                raise bad(f"'{name}' must be an integer >= 1, got {value!r}")
        if not (is_int(self.retries) and self.retries >= 0):
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
        o = self.slurm
        for name in ("partition", "account", "qos"):
            value = getattr(o, name)
            if value is not None:  # a partition list is comma-separated: each part is a name
                if not isinstance(value, str):
                    raise bad(f"slurm {name} must be a string, got {value!r}")
                check_names(value.split(","), f"SLURM {name}", source)
        for name, low in (("gpus_per_job", 0), ("cpus_per_job", 1), ("time_min", 1), ("array_parallelism", 1)):
            value = getattr(o, name)
            if not (is_int(value) and value >= low):
                raise bad(f"slurm {name} must be an integer >= {low}, got {value!r}")
        if o.mem_gb is not None and not (is_num(o.mem_gb) and o.mem_gb > 0):
            raise bad(f"slurm mem_gb must be a positive number, got {o.mem_gb!r}")
        return self


def study_path(results_root: str | Path | None = None) -> Path:
    from medplan.paths import results_root as default_root

    return (Path(results_root) if results_root is not None else default_root()) / STUDY_FILE


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
    from medplan.pipeline import load_splits

    n = len(load_splits(dataset))
    folds = list(range(n)) if study.folds is None else [int(f) for f in study.folds]
    bad = [f for f in folds if not 0 <= f < n]
    if bad:
        raise MedplanError(f"fold(s) {bad} out of range: {dataset} has {n} folds (0..{n - 1})")
    return folds


def tasks(study: Study) -> list[Task]:
    """Every task of the study in dependency order."""
    out: list[Task] = []
    for d in study.datasets:
        for a in study.archs:
            if study.lr_search:
                out.append(Task("lr_search", d, a))
            out.extend(Task("fold", d, a, k) for k in study_folds(study, d))
    out.append(Task("report"))
    return out


def dependencies(study: Study, task: Task, all_tasks: list[Task]) -> list[Task]:
    if task.kind == "fold" and study.lr_search:
        return [Task("lr_search", task.dataset, task.arch)]
    if task.kind == "report":
        return [t for t in all_tasks if t.kind == "fold"]
    return []


def fold_complete(fold_dir: Path) -> bool:
    return (fold_dir / "checkpoint_final.pt").is_file() and (fold_dir / "validation" / "summary.json").is_file()


def _lr_search_summary(study: Study, dataset: str, arch: str) -> dict | None:
    from medplan.paths import results_dir

    path = results_dir(dataset, arch) / "lr_search.json"
    if not path.is_file():
        return None
    data = read_json(path)
    if study.lrs and sorted(float(x) for x in data.get("grid", [])) != sorted(float(x) for x in study.lrs):
        return None
    if study.epochs_lr_search and int(data.get("epochs", -1)) != int(study.epochs_lr_search):
        return None
    return data


# ----------------------------------------------------------------------------- stale folds
#: plan keys that say when and by what a plan was written, not what it decides
_PLAN_VOLATILE = ("created", "medplan_version", "reasons", "raw_dir")
_plan_cache: dict[str, tuple[tuple, str, dict]] = {}


def plan_hash(plan: dict) -> str:
    """A hash of a plan's decisions (canonical JSON without :data:`_PLAN_VOLATILE` keys)."""
    content = {k: v for k, v in plan.items() if k not in _PLAN_VOLATILE}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _current_plan(dataset: str) -> tuple[str, dict]:
    """(hash, plan) of the dataset's plans.json, re-read only when the file changed."""
    from medplan.paths import preprocessed_dir
    from medplan.pipeline import load_plan

    path = preprocessed_dir(dataset) / "plans.json"
    st_ = path.stat()
    stamp = (st_.st_mtime_ns, st_.st_size)
    cached = _plan_cache.get(str(path))
    if cached is None or cached[0] != stamp:
        plan = load_plan(dataset)
        cached = (stamp, plan_hash(json.loads(json.dumps(plan, default=str))), plan)
        _plan_cache[str(path)] = cached
    return cached[1], cached[2]


def expected_run(study: Study, dataset: str, arch: str) -> dict[str, Any] | None:
    """What a fold of this study would record in config.json now (plan hash, lr, epochs,
    batch_size, model_options); None while the LR search that picks the LR has not finished."""
    from medplan.trainers import default_model_options, resolve_lr

    digest, plan = _current_plan(dataset)
    if study.lr_search:
        search = _lr_search_summary(study, dataset, arch)
        if search is None or search.get("best_lr") is None:
            return None
        lr = float(search["best_lr"])
    else:
        lr = resolve_lr(dataset, arch, plan, None)[0]  # what medplan_train picks without --lr
    batch = study.overrides.get("batch_size") or plan["batch_size"]
    options = default_model_options(arch, study.model_options.get(arch))
    return {"plan": digest, "lr": lr, "epochs": int(study.epochs_cv or plan["epochs"]["cv"]),
            "batch_size": int(batch), "model_options": json.loads(json.dumps(options, default=str))}


def _shown(value: Any) -> str:
    return format(value, "g") if isinstance(value, float) else json.dumps(value, sort_keys=True, default=str)


def stale_reasons(study: Study, task: Task) -> list[str] | None:
    """Why a fold's recorded run differs from what the study runs now: ``[]`` when it matches,
    ``None`` when there is nothing to compare yet (no run recorded, or the LR search that
    picks the LR has not finished)."""
    from medplan.paths import results_dir

    fold_dir = results_dir(task.dataset, task.arch, task.fold)
    config_path = fold_dir / "config.json"
    if not config_path.is_file():
        if fold_complete(fold_dir):
            return ["no config.json records how it was trained"]
        return None
    expected = expected_run(study, task.dataset, task.arch)
    if expected is None:
        return None
    try:
        config = read_json(config_path)
    except MedplanError:
        return ["config.json is unreadable"]
    if not isinstance(config, dict):
        return ["config.json is not an object"]
    why = []
    recorded_plan = config.get("plan")
    if not isinstance(recorded_plan, dict) or plan_hash(recorded_plan) != expected["plan"]:
        why.append("another plan (plans.json changed since)")
    lr = config.get("lr")
    if not isinstance(lr, (int, float)) or not math.isclose(float(lr), expected["lr"], rel_tol=1e-9):
        why.append(f"lr {_shown(lr)} (study: {_shown(expected['lr'])})")
    for key in ("epochs", "batch_size"):
        if config.get(key) != expected[key]:
            why.append(f"{key} {_shown(config.get(key))} (study: {_shown(expected[key])})")
    recorded = config.get("model_options")
    if json.loads(json.dumps(recorded, default=str)) != expected["model_options"]:
        why.append(f"model options {_shown(recorded)} (study: {_shown(expected['model_options'])})")
    return why


def stale_folds(study: Study) -> dict[str, list[str]]:
    """Fold key -> what differs, for every fold that can be judged now and is stale."""
    out = {}
    for t in tasks(study):
        if t.kind == "fold":
            why = stale_reasons(study, t)
            if why:
                out[t.key] = why
    return out


def stale_advice(stale: dict[str, list[str]]) -> str:
    first, why = next(iter(stale.items()))
    more = f" and {len(stale) - 1} more" if len(stale) > 1 else ""
    return (f"{len(stale)} fold(s) were trained with other settings than this study's ({first}: {'; '.join(why)}"
            f"{more}); rerun with --rerun-stale to retrain them (their results are replaced), or move them "
            "away; medplan_benchmark --status lists them")


def completed_folds(study: Study) -> list[str]:
    return [t.key for t in tasks(study) if t.kind == "fold" and is_done(study, t)]


def is_done(study: Study, task: Task) -> bool:
    """Done = its results are on disk (never what a job said about itself) and, for a fold,
    recorded with the settings the study runs now (not stale)."""
    from medplan.paths import results_dir, results_root

    if task.kind == "lr_search":
        return _lr_search_summary(study, task.dataset, task.arch) is not None
    if task.kind == "fold":
        return fold_complete(results_dir(task.dataset, task.arch, task.fold)) and stale_reasons(study, task) == []
    state = results_root() / REPORT_STATE
    if not state.is_file():
        return False
    folds = completed_folds(study)
    return len(folds) == sum(t.kind == "fold" for t in tasks(study)) and read_json(state).get("folds") == folds


# ----------------------------------------------------------------------------- what a job runs
def _train_overrides(study: Study, stage: str) -> dict[str, Any]:
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
    from medplan.trainers import train, tune

    if task.kind == "lr_search":
        tune(task.dataset, task.arch, lrs=study.lrs, epochs=study.epochs_lr_search,
             overrides=_train_overrides(study, "lr_search"), model_options=study.model_options.get(task.arch))
    elif task.kind == "fold":
        overrides = _train_overrides(study, "cv")
        if study.lr_search:
            search = _lr_search_summary(study, task.dataset, task.arch)
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


def _job_env() -> dict[str, str]:
    keys = ("MEDPLAN_RAW", "MEDPLAN_PREPROCESSED", "MEDPLAN_RESULTS")
    return {k: os.environ[k] for k in keys if k in os.environ}


try:  # a job that times out or is pre-empted requeues itself and resumes (--continue)
    from submitit.helpers import Checkpointable as _Checkpointable
except ImportError:  # pragma: no cover - submitit is a dependency
    _Checkpointable = object  # type: ignore[misc,assignment]


def one_line(text: object, limit: int = 300) -> str:
    """``text`` as one printable line of at most ``limit`` characters."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    line = _CONTROL.sub(" ", lines[0] if lines else "")
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
    if not isinstance(data, dict) or data.get("status") not in ("running", "done", "error", "interrupted"):
        return None
    return {"status": data["status"], "error": one_line(data.get("error") or "")}


class TaskRunner(_Checkpointable):  # type: ignore[misc]
    """What a submitit job runs: the task, with its outcome written as JSON beside the jobs'
    logs (``outcomes/JOB_ID.json``) so the driver never needs submitit's result pickle."""

    def __init__(self, jobs_folder: str | Path | None = None):
        self.jobs_folder = None if jobs_folder is None else str(jobs_folder)

    def _write(self, task: Task, status: str, started: str, error: str | None = None) -> None:
        if self.jobs_folder is None:
            return
        try:
            import submitit

            job_id = submitit.JobEnvironment().job_id
        except Exception:  # noqa: BLE001 - not inside a submitit job
            return
        path = outcome_path(self.jobs_folder, job_id)
        if path is None:
            return
        record = {"format": "medplan-job-outcome-1", "task": task.key, "job_id": job_id, "status": status,
                  "error": error, "started": started, "ended": None if status == "running" else _now(),
                  "host": os.uname().nodename, "pid": os.getpid()}
        try:
            atomic_write_json(path, record)
        except OSError:  # the outcome is a courtesy: the results on disk are the truth
            pass

    def __call__(self, study_json: dict, task: Task, env: dict[str, str]) -> str:
        started = _now()
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


# ----------------------------------------------------------------------------- report
def efficiency_rows(study: Study) -> list[dict[str, Any]]:
    """Per architecture: parameters, GMACs at the first dataset's planned size, measured speed."""
    from medplan.architectures import build_model, count_flops, count_parameters, get_entry
    from medplan.architectures.measure import load_measurements, measure_models
    from medplan.pipeline import load_plan

    plan = load_plan(study.datasets[0])
    size = tuple(int(s) for s in plan["input_size"])
    measured = load_measurements()
    missing = [a for a in study.archs if a not in measured or measured[a].get("size") != list(size)]
    for arch in missing:  # a short timed run on the device at hand
        measured.update({r["arch"]: r for r in measure_models(
            [arch], size=size, in_channels=int(plan["channels"]), num_classes=int(plan["num_outputs"]),
            batch_size=int(plan.get("batch_size", 2)), steps=study.measure_steps,
            model_options=study.model_options.get(arch))})
    rows = []
    for arch in study.archs:
        options = dict(study.model_options.get(arch) or {})
        if get_entry(arch).pretrained:
            options.setdefault("pretrained", False)
        model = build_model(arch, int(plan["channels"]), int(plan["num_outputs"]), **options)
        m = measured.get(arch, {})
        rows.append({"arch": arch, "params_m": count_parameters(model)["total"] / 1e6,
                     "gmacs": count_flops(model, int(plan["channels"]), size, device="cpu") / 2e9,
                     "size": f"{size[0]}x{size[1]}", "train_img_s": m.get("train_images_per_s"),
                     "infer_img_s": m.get("infer_images_per_s"), "peak_mem_mb": m.get("peak_memory_mb"),
                     "device": m.get("device")})
    return rows


def _cell(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def write_study_report(study: Study) -> Path:
    """summary.csv/md/tex, ranking, plots (medplan_evaluate --all-folds) + study_report.md."""
    from medplan.evaluation.aggregate import gather_all_folds
    from medplan.evaluation.report import markdown, write_reports
    from medplan.paths import results_root

    folds = completed_folds(study)
    df = gather_all_folds(datasets=study.datasets, archs=study.archs)
    write_reports(df)
    eff = efficiency_rows(study)
    lines = [f"# Study report ({_dt.datetime.now().isoformat(timespec='seconds')})", "",
             f"Datasets: {', '.join(study.datasets)}; architectures: {', '.join(study.archs)}; "
             f"{len(folds)} of {sum(t.kind == 'fold' for t in tasks(study))} folds complete.", "",
             markdown(df), "", "## Efficiency", "",
             "| Architecture | Params (M) | GMACs | Size | Train img/s | Infer img/s | Peak GPU mem (MB) | Device |",
             "|---|---:|---:|---|---:|---:|---:|---|"]
    for r in eff:
        lines.append(f"| {r['arch']} | {r['params_m']:.2f} | {r['gmacs']:.2f} | {r['size']} | "
                     f"{_cell(r['train_img_s'], '.1f')} | {_cell(r['infer_img_s'], '.1f')} | "
                     f"{_cell(r['peak_mem_mb'], '.0f')} | {r['device'] or '-'} |")
    root = results_root()
    path = root / REPORT_FILE
    atomic_write_text(path, "\n".join(lines) + "\n")
    atomic_write_json(root / REPORT_STATE, {"folds": folds, "efficiency": eff,
                                            "created": _dt.datetime.now().isoformat(timespec="seconds")})
    return path


# ----------------------------------------------------------------------------- validation
def check_study(study: Study) -> None:
    """Every dataset preprocessed, every architecture known: fail before anything is submitted."""
    from medplan.architectures import is_model
    from medplan.pipeline import load_plan, load_splits
    from medplan.trainers import get_trainer

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
            from medplan.architectures import list_models

            raise MedplanError(f"unknown architecture {a!r} (known: {', '.join(list_models())})")
        get_trainer(a).check_architecture(a)


# ----------------------------------------------------------------------------- executors
class Backend:
    """Submits tasks, tells which of its jobs are still alive, and where their logs are."""

    name = "?"

    def submit(self, study: Study, batch: list[Task], after: dict[str, list[str]]) -> dict[str, str]:
        raise NotImplementedError

    def alive(self, job_ids: Iterable[str]) -> set[str]:
        raise NotImplementedError

    def cancel(self, job_ids: Iterable[str]) -> None:
        pass

    def log_path(self, job_id: str) -> str | None:
        return None

    def error(self, job_id: str) -> str | None:
        """The one-line error a job recorded when it failed inside Python (None otherwise)."""
        return None


class _SubmititBackend(Backend):
    def __init__(self, folder: Path):
        self.folder = folder

    def _job(self, job_id: str):
        raise NotImplementedError

    def runner(self) -> TaskRunner:
        return TaskRunner(self.folder)

    def log_path(self, job_id: str) -> str | None:
        if not JOB_ID.fullmatch(str(job_id)):
            return None
        return str(self._job(job_id).paths.stderr)

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


class SlurmBackend(_SubmititBackend):
    """sbatch through submitit: the LR searches as one array, each model's folds as an array
    that waits for its LR search (``afterok``), the report after every fold."""

    name = "slurm"

    def __init__(self, folder: Path, options: SlurmOptions):
        super().__init__(folder)
        self.options = options
        missing = [c for c in ("sbatch", "squeue", "srun") if shutil.which(c) is None]
        if missing:
            raise MedplanError(f"SLURM is unreachable: {'/'.join(missing)} not found on PATH (submitit's batch "
                               "scripts need sbatch and squeue here and start each job with srun)")
        if _CONTROL.search(str(folder)):
            raise MedplanError("the results folder's path holds a control character; it would reach the "
                               "SLURM batch script", repr(str(folder)))
        try:
            out = subprocess.run(["squeue", "-h", "-o", "%i", "-u", _user()], capture_output=True, text=True,
                                 timeout=60)
        except (OSError, subprocess.SubprocessError) as exc:
            raise MedplanError(f"SLURM is unreachable: squeue failed: {one_line(exc)}") from None
        if out.returncode != 0:
            raise MedplanError(f"SLURM is unreachable: squeue failed: {one_line((out.stderr or out.stdout)[-2000:])}")

    def _job(self, job_id: str):
        import submitit

        return submitit.SlurmJob(folder=self.folder, job_id=job_id)

    def _executor(self, name: str, after: list[str], cpu_only: bool = False):
        import submitit

        ex = submitit.SlurmExecutor(folder=self.folder, max_num_timeout=3)
        o = self.options
        check_name(name, "SLURM job name")  # built from checked names: no line can leave the #SBATCH line
        params: dict[str, Any] = {"job_name": name, "cpus_per_task": o.cpus_per_job, "time": o.time_min,
                                  "array_parallelism": o.array_parallelism, "ntasks_per_node": 1, "nodes": 1}
        if o.partition:
            params["partition"] = o.partition
        if o.gpus_per_job and not cpu_only:
            params["gpus_per_node"] = o.gpus_per_job
        if o.mem_gb:
            params["mem"] = f"{int(o.mem_gb * 1024)}MB"
        extra: dict[str, Any] = {}
        if after:
            extra["dependency"] = "afterok:" + ":".join(after)
            extra["kill-on-invalid-dep"] = "yes"
        if o.account:
            extra["account"] = o.account
        if o.qos:
            extra["qos"] = o.qos
        if extra:
            params["additional_parameters"] = extra
        for key, value in [*params.items(), *extra.items()]:  # the last guard before the script is written
            if _CONTROL.search(str(value)):
                raise MedplanError(f"SLURM option {key} holds a control character: {str(value)!r}")
        ex.update_parameters(**params)
        return ex

    def submit(self, study: Study, batch: list[Task], after: dict[str, list[str]]) -> dict[str, str]:
        # one array per group sharing dependencies: LR searches, each model's folds, the report
        groups: dict[tuple, list[Task]] = {}
        for t in batch:
            groups.setdefault((t.kind if t.kind != "fold" else f"fold:{t.dataset}/{t.arch}",
                               tuple(after.get(t.key, []))), []).append(t)
        ids: dict[str, str] = {}
        data, env = study.to_json(), _job_env()
        runner = self.runner()
        for (kind, deps), group in groups.items():
            deps = [ids.get(d, d) for d in deps]
            first = group[0]  # the name holds only checked names: dataset, architecture, a fixed word
            name = "medplan_" + (f"fold_{check_name(first.dataset, 'dataset name')}_"
                                 f"{check_name(first.arch, 'architecture name')}"
                                 if first.kind == "fold" else first.kind)
            try:
                ex = self._executor(name, deps)
                jobs = ex.map_array(runner, [data] * len(group), group, [env] * len(group))
                new = {t.key: j.job_id for t, j in zip(group, jobs)}
                for job_id in new.values():
                    if not JOB_ID.fullmatch(str(job_id)):
                        raise MedplanError(f"sbatch gave an unexpected job id {str(job_id)!r}")
            except Exception as exc:  # noqa: BLE001 - submitit's or sbatch's message, one line
                left = self.cancel(ids.values())
                msg = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
                what = "sbatch failed" if not isinstance(exc, MedplanError) else "refused"
                raise MedplanError(f"{what}: {one_line(msg[-1]) if msg else type(exc).__name__}; " + (
                    "nothing of this round was left queued" if not left else
                    f"could not cancel job(s) {', '.join(left)} of this round: cancel them with scancel")) from None
            ids.update(new)
        return ids

    def alive(self, job_ids: Iterable[str]) -> set[str]:
        wanted = set(job_ids)
        if not wanted:
            return set()
        try:
            out = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T", "-u", _user()], capture_output=True,
                                 text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return wanted  # cannot tell: assume they still live rather than submit twice
        if out.returncode != 0:
            return wanted  # cannot tell: assume they still live rather than submit twice
        live = {line.split()[0] for line in out.stdout.splitlines() if line.strip()}
        return wanted & live

    def cancel(self, job_ids: Iterable[str]) -> list[str]:
        """scancel the jobs; returns those it could not cancel."""
        ids = [j for j in job_ids if JOB_ID.fullmatch(str(j)) and str(j)[0].isdigit()]  # never an option
        if not ids:
            return []
        try:
            out = subprocess.run(["scancel", *ids], capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return ids
        return [] if out.returncode == 0 else ids


def _user() -> str:
    import getpass

    return getpass.getuser()


class LocalBackend(_SubmititBackend):
    """submitit's LocalExecutor: one job per visible GPU at a time (one at a time on CPU);
    the driver starts a job once its dependencies are done."""

    name = "local"

    def __init__(self, folder: Path):
        super().__init__(folder)
        import torch

        self.gpus = list(range(torch.cuda.device_count()))
        self.slots = max(1, len(self.gpus))
        self.pending: list[tuple[Task, list[str]]] = []
        self.running: dict[str, Any] = {}   # job_id -> submitit job
        self.free_gpus = list(self.gpus)
        self.gpu_of: dict[str, int] = {}
        self.study: Study | None = None

    def _job(self, job_id: str):
        import submitit

        return submitit.local.local.LocalJob(folder=self.folder, job_id=job_id)

    def submit(self, study: Study, batch: list[Task], after: dict[str, list[str]]) -> dict[str, str]:
        self.study = study
        self.pending = [(t, list(after.get(t.key, []))) for t in batch]
        return {}

    def step(self, on_start: Callable[[Task, str], None], on_end: Callable[[Task, str], None]) -> bool:
        """Reap finished jobs and start ready ones; False once nothing is pending or running."""
        import submitit

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
            if any(not is_done(self.study, d_task) for d_task in _tasks_by_key(self.study, deps)):
                self.pending.remove(item)  # a dependency failed: leave it for the next round
                continue
            ex = submitit.LocalExecutor(folder=self.folder)
            params: dict[str, Any] = {"timeout_min": 60 * 24 * 7}
            if self.free_gpus:
                gpu = self.free_gpus.pop(0)
                params.update(gpus_per_node=1, visible_gpus=[gpu])
            else:
                gpu = None
            ex.update_parameters(**params)
            job = ex.submit(self.runner(), self.study.to_json(), task, _job_env())
            job._cancel_at_deletion = False
            self.pending.remove(item)
            blocked.discard(task.key)
            self.running[job.job_id] = (task, job)
            if gpu is not None:
                self.gpu_of[job.job_id] = gpu
            on_start(task, job.job_id)
        return bool(self.pending or self.running)

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

    def cancel(self, job_ids: Iterable[str]) -> None:
        import signal

        for job_id in job_ids:
            if job_id in self.alive([job_id]):
                os.kill(int(job_id), signal.SIGTERM)


class InlineBackend(Backend):
    """Runs each task in this process, in order (debugging; no isolation)."""

    name = "inline"

    def __init__(self) -> None:
        self.failures: dict[str, str] = {}

    def alive(self, job_ids: Iterable[str]) -> set[str]:
        return set()

    def error(self, job_id: str) -> str | None:
        return self.failures.get(job_id)


def _tasks_by_key(study: Study, keys: Iterable[str]) -> list[Task]:
    wanted = set(keys)
    return [t for t in tasks(study) if t.key in wanted]


def make_backend(study: Study, folder: Path) -> Backend:
    if study.executor == "slurm":
        return SlurmBackend(folder, study.slurm)
    if study.executor == "local":
        return LocalBackend(folder)
    return InlineBackend()


# ----------------------------------------------------------------------------- driver
@dataclass
class RunResult:
    done: list[str]
    failed: dict[str, str]       # key -> "error (log: path)"
    submitted: list[str]

    @property
    def ok(self) -> bool:
        return not self.failed


def plan_jobs(study: Study) -> list[Task]:
    """The tasks still to run (not done on disk)."""
    return [t for t in tasks(study) if not is_done(study, t)]


def _now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


class Driver:
    """Rounds of: adopt live jobs -> submit what is missing -> wait -> record failures."""

    def __init__(self, study: Study, *, results_root: Path | None = None, poll_s: float = 5.0,
                 log: Callable[[str], None] | None = None, backend: Backend | None = None):
        from medplan.paths import results_root as default_root

        self.study = study
        self.root = Path(results_root) if results_root is not None else default_root()
        self.poll_s = poll_s
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.folder = self.root / JOBS_DIR / study.executor
        self.backend = backend or make_backend(study, self.folder)
        self.stale: dict[str, list[str]] = {}

    def save(self) -> None:
        save_study(self.study, self.root)

    def record(self, key: str) -> dict:
        return self.study.jobs.setdefault(key, {"failures": 0})

    # -- bookkeeping
    def _finished(self, task: Task, job_id: str, cancelled: bool = False) -> None:
        rec = self.record(task.key)
        if rec.get("job_id") != job_id:
            return
        if is_done(self.study, task):
            rec.update(state="done", ended=_now())
        elif cancelled:
            rec.update(state="cancelled", ended=_now())
        else:
            rec["failures"] = int(rec.get("failures", 0)) + 1
            rec.update(state="failed", ended=_now(), log=self.backend.log_path(job_id),
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
        by_key = {t.key: t for t in tasks(self.study)}
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
                          if any(d.key in failed_now for d in dependencies(self.study, by_key[k], list(by_key.values())))}
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

    def submit_round(self, batch: list[Task]) -> dict[str, str]:
        all_tasks = tasks(self.study)
        in_batch = {t.key for t in batch}
        after = {t.key: [d.key for d in dependencies(self.study, t, all_tasks) if d.key in in_batch] for t in batch}
        ids = self.backend.submit(self.study, batch, after)
        for key, job_id in ids.items():
            rec = self.record(key)
            rec.update(job_id=job_id, state="submitted", executor=self.study.executor, submitted=_now(),
                       attempt=int(rec.get("attempt", 0)) + 1, log=self.backend.log_path(job_id))
        self.save()
        return ids

    def run_local(self, batch: list[Task]) -> None:
        assert isinstance(self.backend, LocalBackend)
        self.backend.submit(self.study, batch, {})
        all_tasks = tasks(self.study)
        self.backend.pending = [(t, [d.key for d in dependencies(self.study, t, all_tasks) if d in batch])
                                for t in batch]

        def started(task: Task, job_id: str) -> None:
            rec = self.record(task.key)
            rec.update(job_id=job_id, state="submitted", executor="local", submitted=_now(),
                       attempt=int(rec.get("attempt", 0)) + 1, log=self.backend.log_path(job_id))
            self.log(f"{task.key}: started (job {job_id})")
            self.save()

        def ended(task: Task, job_id: str) -> None:
            self._finished(task, job_id)
            self.save()

        try:
            while self.backend.step(started, ended):
                time.sleep(min(self.poll_s, 1.0))
        except BaseException:
            self.backend.cancel(self.backend.running)
            raise

    def run_inline(self, batch: list[Task]) -> None:
        assert isinstance(self.backend, InlineBackend)
        all_tasks = tasks(self.study)
        for n, task in enumerate(batch):
            if any(not is_done(self.study, d) for d in dependencies(self.study, task, all_tasks)):
                continue
            job_id = f"inline-{os.getpid()}-{time.time_ns()}-{n}"
            rec = self.record(task.key)
            rec.update(job_id=job_id, state="submitted", executor="inline", submitted=_now(),
                       attempt=int(rec.get("attempt", 0)) + 1)
            self.save()
            try:
                run_task(self.study.to_json(), task)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:  # noqa: BLE001 - recorded and retried like a failed job
                self.backend.failures[job_id] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            self._finished(task, job_id)
            self.save()

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
            if isinstance(self.backend, LocalBackend):
                self.run_local(batch)
            elif isinstance(self.backend, InlineBackend):
                self.run_inline(batch)
            else:
                ids = self.submit_round(batch)
                if not wait:
                    break
                self.wait(ids)
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
    (see the module docstring) are refused before anything is submitted unless
    ``study.rerun_stale``."""
    check_study(study)
    if not study.rerun_stale:
        stale = stale_folds(study)
        if stale:
            raise MedplanError(stale_advice(stale))
    driver = Driver(study, results_root=results_root, poll_s=poll_s, log=log)
    return driver.run(wait=wait)


# ----------------------------------------------------------------------------- status / dry run
def _metrics_of(fold_dir: Path) -> tuple[float | None, float]:
    from medplan.trainers.progress import read_metrics

    try:
        rows = read_metrics(fold_dir / "metrics.jsonl")
    except (OSError, ValueError):
        return None, 0.0
    values = [r["val_mIoU"] for r in rows if r.get("val_mIoU") is not None]
    return (max(values) if values else None), float(sum(r.get("epoch_time") or 0 for r in rows))


def status_rows(study: Study, backend: Backend | None = None) -> list[dict[str, Any]]:
    """One row per task: state, epochs run, run time, best validation mIoU so far."""
    from medplan.paths import results_dir, results_root

    live: set[str] = set()
    if backend is not None:
        ids = [r["job_id"] for r in study.jobs.values() if r.get("state") == "submitted" and r.get("job_id")]
        try:
            live = backend.alive(ids)
        except Exception:  # noqa: BLE001 - status works without the queue
            live = set()
    rows = []
    for t in tasks(study):
        rec = study.jobs.get(t.key, {})
        best, seconds = None, 0.0
        if t.kind == "fold":
            best, seconds = _metrics_of(results_dir(t.dataset, t.arch, t.fold))
        elif t.kind == "lr_search":
            base = results_dir(t.dataset, t.arch) / "lr_search"
            for run in sorted(base.glob("lr_*/fold_*")) if base.is_dir() else []:
                b, s = _metrics_of(run)
                seconds += s
                best = b if best is None or (b is not None and b > best) else best
        stale = stale_reasons(study, t) if t.kind == "fold" else None
        if is_done(study, t):
            state = "done"
        elif rec.get("state") == "submitted" and rec.get("job_id") in live:
            state = "running" if seconds else "queued"
        elif stale:
            state = "stale"
        elif rec.get("state") == "failed":
            state = f"failed x{rec.get('failures', 1)}"
        elif seconds:
            state = "partial"
        else:
            state = "todo"
        rows.append({"dataset": t.dataset or "-", "arch": t.arch or "-", "stage": t.stage, "state": state,
                     "job": rec.get("job_id") or "-", "time_s": seconds, "best_val_mIoU": best,
                     "log": rec.get("log") if state.startswith("failed") else None,
                     "stale": stale if state == "stale" else None})
    if (results_root() / REPORT_FILE).is_file() and rows[-1]["state"] == "todo":
        rows[-1]["state"] = "outdated"
    return rows


def format_status(rows: list[dict[str, Any]]) -> str:
    header = ["dataset", "arch", "stage", "state", "job", "time", "best val mIoU"]
    body = []
    for r in rows:
        t = r["time_s"]
        body.append([r["dataset"], r["arch"], r["stage"], r["state"], str(r["job"]),
                     "-" if not t else (f"{t / 3600:.1f} h" if t >= 3600 else f"{t:.0f} s"),
                     "-" if r["best_val_mIoU"] is None else f"{100 * r['best_val_mIoU']:.1f}"])
    widths = [max(len(c) for c in col) for col in zip(header, *body)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
             for cells in [header, ["-" * w for w in widths]] + body]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"].split()[0]] = counts.get(r["state"].split()[0], 0) + 1
    lines.append("")
    lines.append(", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    for r in rows:
        if r["log"]:
            lines.append(f"{r['dataset']}/{r['arch']}/{r['stage']}: log {r['log']}")
    stale = [r for r in rows if r.get("stale")]
    for r in stale:
        lines.append(f"{r['dataset']}/{r['arch']}/{r['stage']}: stale: {'; '.join(r['stale'])}")
    if stale:
        lines.append("stale folds do not count as complete; medplan_benchmark --rerun-stale retrains them "
                     "(replacing their results)")
    return "\n".join(lines)


def dry_run(study: Study) -> tuple[list[dict[str, Any]], float | None]:
    """The jobs a run would submit, with an upper-bound GPU-hour estimate per job (None when
    an architecture has no efficiency measurement; ``medplan_models --measure`` makes one)."""
    from medplan.architectures.measure import estimate_seconds, load_measurements
    from medplan.pipeline import load_plan, load_splits

    measured = load_measurements()
    all_tasks = tasks(study)
    jobs, total, known = [], 0.0, True
    for t in plan_jobs(study):
        row: dict[str, Any] = {"job": t.key, "after": [d.key for d in dependencies(study, t, all_tasks)
                                                       if not is_done(study, d)],
                               "epochs": None, "runs": 1, "gpu_hours": None,
                               "stale": stale_reasons(study, t) if t.kind == "fold" else None}
        if t.kind != "report":
            plan = load_plan(t.dataset)
            split = load_splits(t.dataset)[0 if t.kind == "lr_search" else t.fold]
            if t.kind == "lr_search":
                row["epochs"] = int(study.epochs_lr_search or plan["epochs"]["lr_search"])
                row["runs"] = len(study.lrs or plan["lr_grid"])
            else:
                row["epochs"] = int(study.epochs_cv or plan["epochs"]["cv"])
            m = measured.get(t.arch)
            if m:
                seconds = row["runs"] * estimate_seconds(m, plan["input_size"], len(split["train"]),
                                                         len(split["val"]), row["epochs"])
                row["gpu_hours"] = seconds / 3600 * (study.slurm.gpus_per_job if study.executor == "slurm" else 1)
                total += row["gpu_hours"]
            else:
                known = False
        jobs.append(row)
    return jobs, (total if known else None)


def format_dry_run(jobs: list[dict[str, Any]], total: float | None, study: Study) -> str:
    lines = [f"{len(jobs)} job(s) to run with the {study.executor} executor:"]
    for j in jobs:
        cost = "" if j["epochs"] is None else f"  {j['runs']} x {j['epochs']} epochs"
        est = "" if j["gpu_hours"] is None else f"  ~{j['gpu_hours']:.2f} GPU-h"
        after = f"  after {', '.join(j['after'][:3])}{' ...' if len(j['after']) > 3 else ''}" if j["after"] else ""
        stale = f"  STALE: {'; '.join(j['stale'])}" if j.get("stale") else ""
        lines.append(f"  {j['job']}{cost}{est}{after}{stale}")
    n_stale = sum(bool(j.get("stale")) for j in jobs)
    if n_stale:
        lines.append(f"{n_stale} stale fold(s): " + ("retrained (--rerun-stale), replacing their results"
                                                     if study.rerun_stale else
                                                     "a run refuses until you pass --rerun-stale or move them away"))
    if total is None:
        lines.append("GPU-hours: unknown for architectures without a measurement (run medplan_models --measure)")
    else:
        lines.append(f"GPU-hours (upper bound, no early stopping): {total:.2f}")
    return "\n".join(lines)
