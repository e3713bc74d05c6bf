"""Worker processes that hand batches to the main process through shared-memory slots.

Why: handing a batch over through a pipe (batchgenerators' MultiThreadedAugmenter pickles it
in the worker, the main process unpickles it, both poll their queues) cost about as much CPU as
augmenting it. Here each worker writes its batches straight into slots of one shared mapping,
the slots are reused round-robin, and only a few bytes per batch travel through a pipe: the
request (sequence number, generation, key, slot) and the answer (a small dict, or the error).

The mapping is anonymous (``mmap(-1, n)``: MAP_SHARED | MAP_ANONYMOUS) and inherited by forked
workers, so it has no name under /dev/shm: nothing can be left behind there whatever happens
to the processes, it is not bounded by the size of /dev/shm (64 MB in a default Docker
container), and the kernel frees it when the last process that maps it unmaps it or exits.
Workers are therefore started with ``fork`` (Linux, macOS).

Protocol: request ``seq`` goes to worker ``seq % n`` and to slot ``seq % (depth * n)``; each
worker owns ``depth`` slots, serves its requests in order, and a slot is asked for again only
after the main process has copied out the batch that used it before. Requests of an older
generation (the main process jumped elsewhere) are answered "skipped" without work.
"""
from __future__ import annotations

import logging
import math
import mmap
import multiprocessing as mp
import os
import signal
import time
import traceback
from collections import deque
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Hashable, TypeVar

import torch

from medplan.errors import MedplanError

log = logging.getLogger(__name__)

T = TypeVar("T")
Fill = Callable[[Any, torch.Tensor, torch.Tensor], dict]  # (key, image slot, seg slot) -> small dict
_ALIGN = 4096  # slots start on page boundaries
_PARENT_CHECK_S = 5.0  # how often an idle worker checks that the main process is still there
_JOIN_S = 2.0  # how long close() waits for workers to finish the batch in hand before killing them


class WorkerDied(RuntimeError):
    """A worker exited (killed, out of memory) without answering."""


class SlotBuffer:
    """``count`` pairs of (image, seg) tensors laid out in one anonymous shared mapping, after a
    header page whose first int64 is the pool's generation (no multiprocessing heap: it lives
    in /dev/shm)."""

    def __init__(self, count: int, image_shape: tuple[int, ...], image_dtype: torch.dtype,
                 seg_shape: tuple[int, ...], seg_dtype: torch.dtype = torch.uint8):
        def padded(shape: tuple[int, ...], dtype: torch.dtype) -> int:
            n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            return -(-n // _ALIGN) * _ALIGN

        img_bytes, seg_bytes = padded(image_shape, image_dtype), padded(seg_shape, seg_dtype)
        self.nbytes = _ALIGN + count * (img_bytes + seg_bytes)
        self._map: mmap.mmap | None = mmap.mmap(-1, self.nbytes)
        base = torch.frombuffer(self._map, dtype=torch.uint8)
        self.header = base[:8].view(torch.int64)
        self.images: list[torch.Tensor] = []
        self.segs: list[torch.Tensor] = []
        for i in range(count):
            start = _ALIGN + i * (img_bytes + seg_bytes)
            self.images.append(base[start:start + img_bytes].view(image_dtype)[:math.prod(image_shape)]
                               .view(image_shape))
            start += img_bytes
            self.segs.append(base[start:start + seg_bytes].view(seg_dtype)[:math.prod(seg_shape)].view(seg_shape))

    def close(self) -> None:
        """Unmap (idempotent); the pages go when no process maps them any more."""
        self.images, self.segs, self.header = [], [], torch.zeros(1, dtype=torch.int64)
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a view is still alive somewhere: the mapping goes with it
                log.debug("loader slots still referenced; unmapped when the last view is freed")
            self._map = None


class WorkerPool:
    """``num_workers`` forked processes that run ``fill(key, image_slot, seg_slot)`` ahead of need.

    :meth:`take` returns what ``copy(image_slot, seg_slot, answer)`` returns for ``key``, having
    asked for the keys after it (``next_key``) so that every worker has ``depth`` batches in hand.
    Asking for another key than the one expected next drops (skips) the batches asked for ahead.
    """

    def __init__(self, fill: Fill, slots: SlotBuffer, num_workers: int, next_key: Callable[[Any], Any],
                 depth: int, name: str = "medplan-loader"):
        if "fork" not in mp.get_all_start_methods():
            raise MedplanError("loader workers need the fork start method (Linux, macOS); use num_workers=0")
        if len(slots.images) != depth * num_workers:
            raise ValueError(f"{len(slots.images)} slots for {num_workers} workers x depth {depth}")
        ctx = mp.get_context("fork")
        self.slots = slots
        self.n = num_workers
        self._next_key = next_key
        self._pending: deque[tuple[int, Hashable]] = deque()  # (seq, key) asked for, not yet taken
        self._seq = 0
        self._cursor: Any = None  # the key to ask for next
        pipes = [ctx.Pipe() for _ in range(num_workers)]  # all before any fork: see _serve
        self._conns: list[Connection] = [mine for mine, _ in pipes]
        self.processes: list[mp.process.BaseProcess] = []
        try:
            for w, (_, theirs) in enumerate(pipes):
                p = ctx.Process(target=_serve, args=(fill, slots, theirs, self._conns, os.getpid()),
                                name=f"{name}-{w}", daemon=True)
                p.start()
                self.processes.append(p)
        except BaseException:  # e.g. fork failed for lack of memory: stop those already started
            self.close()
            raise
        finally:
            for _, theirs in pipes:
                theirs.close()

    def take(self, key: Hashable, copy: Callable[[torch.Tensor, torch.Tensor, dict], T]) -> T:
        """``copy(image_slot, seg_slot, answer)`` for batch ``key``, while the slot is not reused."""
        if self._pending and self._pending[0][1] != key:
            self._cancel()
        if not self._pending:
            self._cursor = key
        self._ask()
        seq, _ = self._pending.popleft()
        status, answer = self._receive(seq, key)
        if status == "error":
            _raise_worker_error(seq % self.n, key, answer)
        slot = seq % len(self.slots.images)
        out = copy(self.slots.images[slot], self.slots.segs[slot], answer)
        self._ask()  # the slot is free again: the worker can start on it while the caller works
        return out

    def _ask(self) -> None:
        gen = int(self.slots.header[0])
        while len(self._pending) < len(self.slots.images):
            seq, key = self._seq, self._cursor
            self._conns[seq % self.n].send((seq, gen, key, seq % len(self.slots.images)))
            self._pending.append((seq, key))
            self._seq += 1
            self._cursor = self._next_key(key)

    def _cancel(self) -> None:
        """Drop what was asked for ahead: bump the generation, then collect (mostly skipped) answers."""
        self.slots.header[0] += 1
        while self._pending:
            seq, key = self._pending.popleft()
            self._receive(seq, key)  # an error of a batch nobody needs shows if it is asked for again

    def _receive(self, seq: int, key: Hashable) -> tuple[str, dict | None]:
        """(status, answer) of request ``seq``; :class:`WorkerDied` if its worker is gone."""
        w = seq % self.n
        conn, proc = self._conns[w], self.processes[w]
        while True:
            ready = wait([conn, proc.sentinel])
            if conn in ready:
                try:
                    got, status, answer = conn.recv()
                except (EOFError, OSError):
                    break
                if got != seq:
                    raise RuntimeError(f"loader worker {w} answered request {got}, expected {seq}")
                return status, answer
            if not conn.poll(0):  # exited, and nothing left in the pipe
                break
        proc.join(0.5)
        code = proc.exitcode
        how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        raise WorkerDied(f"training loader worker {w} (pid {proc.pid}) died ({how}) before delivering batch "
                           f"{key}: out of memory, or killed? Try fewer num_workers")

    def close(self) -> None:
        """Stop the workers (gracefully, then by force) and unmap the slots; idempotent."""
        if not self.processes:
            return
        self.slots.header[0] += 1  # whatever they still have queued is skipped
        for conn in self._conns:
            try:
                conn.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + _JOIN_S
        for p in self.processes:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.processes:
            if p.is_alive():
                p.kill()
                p.join()
        for conn in self._conns:
            conn.close()
        self.processes, self._pending = [], deque()
        self.slots.close()


def _raise_worker_error(w: int, key: Hashable, answer: dict) -> None:
    """A worker's exception as one line: MedplanError as it was, anything else as a RuntimeError."""
    if answer["medplan_error"]:
        raise MedplanError(answer["error"])
    exc = RuntimeError(f"training loader worker {w} failed on batch {key}: {answer['error_type']}: "
                       f"{answer['error']}".replace("\n", " "))
    if hasattr(exc, "add_note"):  # Python >= 3.11: the worker's traceback under the one-line message
        exc.add_note("worker traceback:\n" + answer["traceback"])
    raise exc


def _serve(fill: Fill, slots: SlotBuffer, conn: Connection, parent_conns: list[Connection], parent_pid: int) -> None:
    """A worker's loop: answer requests in order until told to stop or the main process is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    for c in parent_conns:  # so that the main process's end closing (it died) reads as EOF here
        c.close()
    torch.set_num_threads(1)
    while True:
        try:
            while not conn.poll(_PARENT_CHECK_S):
                if os.getppid() != parent_pid:
                    return
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        seq, gen, key, slot = msg
        if gen != int(slots.header[0]):
            reply: tuple = (seq, "skipped", None)
        else:
            try:
                reply = (seq, "ok", fill(key, slots.images[slot], slots.segs[slot]))
            except Exception as exc:  # the main process raises it, with this traceback attached
                reply = (seq, "error", {"error": str(exc), "error_type": type(exc).__name__,
                                        "medplan_error": isinstance(exc, MedplanError),
                                        "traceback": traceback.format_exc()})
        try:
            conn.send(reply)
        except OSError:
            return
