"""Worker processes for the per-case passes (fingerprint, preprocess): one map, in order, with
the one progress bar."""
from __future__ import annotations

import multiprocessing
import os
from typing import Any, Callable, Iterator

from medplan.errors import MedplanError
from medplan.progress import progress_bar


def resolve_workers(num_workers: int | None, n_tasks: int) -> int:
    """Worker processes to use: all usable CPUs by default, never more than tasks."""
    if num_workers is None:
        try:
            num_workers = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            num_workers = os.cpu_count() or 1
    if int(num_workers) < 0:
        raise MedplanError(f"num_workers must be >= 0, got {num_workers}")
    return max(0, min(int(num_workers), n_tasks))


def run_tasks(fn: Callable[[Any], Any], tasks: list, *, num_workers: int | None, desc: str, progress: bool,
              chunksize: int | None = None, start_method: str | None = None) -> Iterator[Any]:
    """Map ``fn`` over ``tasks`` in worker processes (in-process for 0/1 worker), in order.

    ``start_method="forkserver"`` where the caller may run in a process whose thread pools
    (torch's, OpenMP's) have started: a plain fork copies their locks held and can hang."""
    workers = resolve_workers(num_workers, len(tasks))
    if workers <= 1:
        yield from progress_bar(map(fn, tasks), total=len(tasks), desc=desc, enabled=progress)
        return
    chunk = chunksize or max(1, min(16, len(tasks) // (workers * 8)))
    with multiprocessing.get_context(start_method).Pool(workers) as pool:
        yield from progress_bar(pool.imap(fn, tasks, chunksize=chunk), total=len(tasks), desc=desc,
                                enabled=progress)
