"""The SLURM backend: sbatch through submitit, one array job per stage, with dependencies.

Nothing unchecked reaches a batch script: the job name is built only from checked names, and
every value that would be written into the script is refused if it holds a control character.
Every way SLURM or submitit can refuse (no ``sbatch``/``squeue``/``srun`` on PATH, a refused
partition, sbatch failing) is one :class:`MedplanError` line, with the jobs of the round that
were already queued cancelled.
"""
from __future__ import annotations

import getpass
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterable

import submitit

from medplan.errors import MedplanError
from medplan.names import check_name
from medplan.study.backends import JobEvents, SubmititBackend
from medplan.study.jobs import job_env, one_line
from medplan.study.model import CONTROL, JOB_ID, SlurmOptions, Study, Task


def _user() -> str:
    return getpass.getuser()


class SlurmBackend(SubmititBackend):
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
        if CONTROL.search(str(folder)):
            raise MedplanError("the results folder's path holds a control character; it would reach the "
                               "SLURM batch script", repr(str(folder)))
        try:
            out = subprocess.run(["squeue", "-h", "-o", "%i", "-u", _user()], capture_output=True, text=True,
                                 timeout=60)
        except (OSError, subprocess.SubprocessError) as exc:
            raise MedplanError(f"SLURM is unreachable: squeue failed: {one_line(exc)}") from None
        if out.returncode != 0:
            raise MedplanError(f"SLURM is unreachable: squeue failed: {one_line((out.stderr or out.stdout)[-2000:])}")

    def job(self, job_id: str) -> Any:
        return submitit.SlurmJob(folder=self.folder, job_id=job_id)

    def run_round(self, study: Study, batch: list[Task], after: dict[str, list[str]],
                  events: JobEvents) -> dict[str, str]:
        """Submit the round and return at once: the queue runs it, the driver waits."""
        ids = self.submit(study, batch, after)
        by_key = {t.key: t for t in batch}
        events.jobs_started({by_key[key]: job_id for key, job_id in ids.items()})
        return ids

    def _executor(self, name: str, after: list[str], cpu_only: bool = False) -> submitit.SlurmExecutor:
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
            if CONTROL.search(str(value)):
                raise MedplanError(f"SLURM option {key} holds a control character: {str(value)!r}")
        ex.update_parameters(**params)
        return ex

    def submit(self, study: Study, batch: list[Task], after: dict[str, list[str]]) -> dict[str, str]:
        """sbatch the round (key -> job id); on any refusal, cancel what this round queued."""
        # one array per group sharing dependencies: LR searches, each model's folds, the report
        groups: dict[tuple, list[Task]] = {}
        for t in batch:
            groups.setdefault((t.kind if t.kind != "fold" else f"fold:{t.dataset}/{t.arch}",
                               tuple(after.get(t.key, []))), []).append(t)
        ids: dict[str, str] = {}
        data, env = study.to_json(), job_env()
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
