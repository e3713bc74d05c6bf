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
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from medplan.errors import MedplanError
from medplan.io import atomic_write_json, atomic_write_text, read_json

STUDY_FILE = "study.json"
REPORT_FILE = "study_report.md"
REPORT_STATE = "study_report.json"
EXECUTORS = ("local", "slurm", "inline")
JOBS_DIR = "study_jobs"


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
        slurm = SlurmOptions(**{k: v for k, v in (data.pop("slurm", None) or {}).items()
                                if k in {f.name for f in dataclasses.fields(SlurmOptions)}})
        return cls(**data, slurm=slurm)


def study_path(results_root: str | Path | None = None) -> Path:
    from medplan.paths import results_root as default_root

    return (Path(results_root) if results_root is not None else default_root()) / STUDY_FILE


def load_study(results_root: str | Path | None = None) -> Study:
    path = study_path(results_root)
    if not path.is_file():
        raise MedplanError("no study yet: start one with medplan_benchmark -d DATASET... -a ARCH...", path)
    return Study.from_json(read_json(path), path)


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


def completed_folds(study: Study) -> list[str]:
    from medplan.paths import results_dir

    return [t.key for t in tasks(study) if t.kind == "fold"
            and fold_complete(results_dir(t.dataset, t.arch, t.fold))]


def is_done(study: Study, task: Task) -> bool:
    """Done = its results are on disk (never what a job said about itself)."""
    from medplan.paths import results_dir, results_root

    if task.kind == "lr_search":
        return _lr_search_summary(study, task.dataset, task.arch) is not None
    if task.kind == "fold":
        return fold_complete(results_dir(task.dataset, task.arch, task.fold))
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


class TaskRunner(_Checkpointable):  # type: ignore[misc]
    def __call__(self, study_json: dict, task: Task, env: dict[str, str]) -> str:
        return run_task(study_json, task, env)


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
        """Last line of the job's traceback when it failed inside Python."""
        import pickle

        path = self._result_pickle(job_id)
        if path is None or not path.is_file():
            return None
        try:
            with open(path, "rb") as f:
                status, payload = pickle.load(f)
        except Exception:  # noqa: BLE001 - a torn pickle is no error message
            return None
        if status == "error":
            lines = [ln for ln in str(payload).strip().splitlines() if ln.strip()]
            return lines[-1] if lines else "failed"
        return None

    def _result_pickle(self, job_id: str) -> Path | None:
        return None


class _SubmititBackend(Backend):
    def __init__(self, folder: Path):
        self.folder = folder

    def _job(self, job_id: str):
        raise NotImplementedError

    def log_path(self, job_id: str) -> str | None:
        return str(self._job(job_id).paths.stderr)

    def _result_pickle(self, job_id: str) -> Path | None:
        return self._job(job_id).paths.result_pickle


class SlurmBackend(_SubmititBackend):
    """sbatch through submitit: the LR searches as one array, each model's folds as an array
    that waits for its LR search (``afterok``), the report after every fold."""

    name = "slurm"

    def __init__(self, folder: Path, options: SlurmOptions):
        super().__init__(folder)
        self.options = options
        if shutil.which("sbatch") is None or shutil.which("squeue") is None:
            raise MedplanError("SLURM is unreachable: sbatch/squeue not found on PATH")
        out = subprocess.run(["squeue", "-h", "-o", "%i", "-u", _user()], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise MedplanError(f"SLURM is unreachable: squeue failed: {(out.stderr or out.stdout).strip().splitlines()[-1:]}")

    def _job(self, job_id: str):
        import submitit

        return submitit.SlurmJob(folder=self.folder, job_id=job_id)

    def _executor(self, name: str, after: list[str], cpu_only: bool = False):
        import submitit

        ex = submitit.SlurmExecutor(folder=self.folder, max_num_timeout=3)
        o = self.options
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
        runner = TaskRunner()
        for (kind, deps), group in groups.items():
            deps = [ids.get(d, d) for d in deps]
            name = "medplan_" + kind.replace(":", "_").replace("/", "_")
            ex = self._executor(name, deps)
            try:
                jobs = ex.map_array(runner, [data] * len(group), group, [env] * len(group))
            except Exception as exc:  # noqa: BLE001 - sbatch's message, one line
                self.cancel(ids.values())
                msg = str(exc).strip().splitlines()
                raise MedplanError(f"sbatch failed: {msg[-1] if msg else type(exc).__name__}; "
                                   "nothing of this round was left queued") from None
            ids.update({t.key: j.job_id for t, j in zip(group, jobs)})
        return ids

    def alive(self, job_ids: Iterable[str]) -> set[str]:
        wanted = set(job_ids)
        if not wanted:
            return set()
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T", "-u", _user()], capture_output=True, text=True,
                             timeout=60)
        if out.returncode != 0:
            return wanted  # cannot tell: assume they still live rather than submit twice
        live = {line.split()[0] for line in out.stdout.splitlines() if line.strip()}
        return wanted & live

    def cancel(self, job_ids: Iterable[str]) -> None:
        ids = list(job_ids)
        if ids:
            subprocess.run(["scancel", *ids], capture_output=True, timeout=60)


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
            job = ex.submit(TaskRunner(), self.study.to_json(), task, _job_env())
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
        return RunResult(done=done, failed=failed, submitted=submitted)


def run_study(study: Study, *, wait: bool = True, poll_s: float = 5.0, results_root: Path | None = None,
              log: Callable[[str], None] | None = None) -> RunResult:
    """Check the study, then run it to the end (or until only failures remain)."""
    check_study(study)
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
        if is_done(study, t):
            state = "done"
        elif rec.get("state") == "submitted" and rec.get("job_id") in live:
            state = "running" if seconds else "queued"
        elif rec.get("state") == "failed":
            state = f"failed x{rec.get('failures', 1)}"
        elif seconds:
            state = "partial"
        else:
            state = "todo"
        rows.append({"dataset": t.dataset or "-", "arch": t.arch or "-", "stage": t.stage, "state": state,
                     "job": rec.get("job_id") or "-", "time_s": seconds, "best_val_mIoU": best,
                     "log": rec.get("log") if state.startswith("failed") else None})
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
                               "epochs": None, "runs": 1, "gpu_hours": None}
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
        lines.append(f"  {j['job']}{cost}{est}{after}")
    if total is None:
        lines.append("GPU-hours: unknown for architectures without a measurement (run medplan_models --measure)")
    else:
        lines.append(f"GPU-hours (upper bound, no early stopping): {total:.2f}")
    return "\n".join(lines)
