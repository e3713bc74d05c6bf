"""A throwaway single-node SLURM cluster for tests: munged + slurmctld + slurmd on localhost.

Everything lives in one temporary folder (slurm.conf, munge key and socket, state, spool,
logs); clients find it through ``SLURM_CONF``. Every daemon is started by this module as a
foreground child process and stopped by its PID. When the binaries are missing or the
daemons do not come up, :func:`start_cluster` raises :class:`ClusterUnavailable` with the
reason, which the fixture turns into a skip.

Debian/Ubuntu: ``apt-get install -y slurm-wlm munge`` (``.ci/run`` does it when it can).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

BINARIES = ("sbatch", "squeue", "sinfo", "scancel", "slurmctld", "slurmd", "munged")
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"])


class ClusterUnavailable(RuntimeError):
    """Why no test cluster could be started (the tests skip with this message)."""


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    partition: str
    cpus: int
    env: dict[str, str]
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(self, *cmd: str, check: bool = True) -> str:
        out = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=30)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip()}")
        return out.stdout

    def queue(self) -> list[str]:
        """Job ids still known to the controller (pending or running)."""
        return self.run("squeue", "-h", "-o", "%i").split()

    def logs(self) -> str:
        parts = []
        for name in ("munged.log", "slurmctld.log", "slurmd.log"):
            path = self.root / name
            if path.is_file():
                parts.append(f"--- {name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-20:]))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel leftover jobs, then stop each daemon we started, by its PID (slurmd first)."""
        if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--user", _user()], env=self.env, capture_output=True, timeout=30)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.processes.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b, path=SEARCH_PATH) is None]


def _write_conf(root: Path, cpus: int, memory_mb: int, partition: str) -> Path:
    user = _user()
    (root / "state").mkdir()
    (root / "spool").mkdir()
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=medplantest
SlurmctldHost=localhost
SlurmUser={user}
SlurmdUser={user}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root / 'munge.socket'}
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}
SlurmctldPidFile={root / 'slurmctld.pid'}
SlurmdPidFile={root / 'slurmd.pid'}
SlurmctldLogFile={root / 'slurmctld.log'}
SlurmdLogFile={root / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=5
MinJobAge=300
SlurmdTimeout=30
InactiveLimit=0
NodeName=localhost NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName={partition} Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")
    return conf


def _start(cluster: SlurmCluster, name: str, cmd: list[str]) -> None:
    log = open(cluster.root / f"{name}.out", "wb")
    cluster.processes[name] = subprocess.Popen(cmd, env=cluster.env, stdout=log, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL)
    log.close()


def _wait(predicate, timeout: float, what: str, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in cluster.processes.items():
            if proc.poll() is not None:
                raise ClusterUnavailable(f"{name} exited with code {proc.returncode} while waiting for {what}\n"
                                         f"{cluster.logs()}")
        try:
            if predicate():
                return
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
        time.sleep(0.3)
    raise ClusterUnavailable(f"timed out after {timeout:.0f} s waiting for {what}\n{cluster.logs()}")


def start_cluster(root: Path, *, cpus: int = 2, memory_mb: int = 2000, partition: str = "debug",
                  timeout: float = 60.0) -> SlurmCluster:
    """Start munged, slurmctld and slurmd for ``root``; return once the node is idle."""
    missing = missing_binaries()
    if missing:
        raise ClusterUnavailable(f"SLURM/munge not installed (missing {', '.join(missing)}; "
                                 "apt-get install slurm-wlm munge)")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    conf = _write_conf(root, cpus, memory_mb, partition)
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    env = {**os.environ, "SLURM_CONF": str(conf), "PATH": SEARCH_PATH}
    cluster = SlurmCluster(root=root, conf=conf, partition=partition, cpus=cpus, env=env)
    which = {b: shutil.which(b, path=SEARCH_PATH) for b in BINARIES}
    try:
        _start(cluster, "munged", [which["munged"], "-F", "--force", f"--key-file={key}",
                                   f"--socket={root / 'munge.socket'}", f"--pid-file={root / 'munged.pid'}",
                                   f"--log-file={root / 'munged.log'}", f"--seed-file={root / 'munge.seed'}"])
        _wait(lambda: (root / "munge.socket").exists(), 15, "munged's socket", cluster)
        _start(cluster, "slurmctld", [which["slurmctld"], "-D", "-i", "-f", str(conf)])
        _wait(lambda: "localhost" in cluster.run("sinfo", "-h", "-o", "%N"), timeout, "slurmctld", cluster)
        _start(cluster, "slurmd", [which["slurmd"], "-D", "-N", "localhost", "-f", str(conf)])
        _wait(lambda: cluster.run("sinfo", "-h", "-n", "localhost", "-o", "%t").strip() == "idle", timeout,
              "the node to be idle", cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster
