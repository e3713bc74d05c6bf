"""Will this run fit, and how long will it take? A short probe before any run folder exists.

Why: a run that does not fit is otherwise found out by the OOM killer, minutes or hours in
and without a word (``medplan_train CAMUS swin_umamba 0`` at 512x512 on CPU was killed at
19.4 GB after 6.5 minutes). :func:`check_run_budget` builds the run's network through its
trainer's own hooks (its loss, its prompts, its internal size; no weights file is read) and
times three training steps on synthetic batches:

* CPU: at reduced sizes (64x64 and up to 128x128, batch 1), since a full-size step is what
  might not fit; the process's peak resident memory (RSS) and the step time are then
  extrapolated **linearly in pixels x batch** to the run's size and batch, and the memory
  multiplied by :data:`CPU_MEMORY_OVERHEAD` (measured on CPU, unet: a whole run's peak RSS was
  1.15x the extrapolation at 256x256 batch 8 and 1.30x at 512x512 batch 8; unet_small 1.23x at
  128x128 batch 4);
* CUDA / MPS: at the run's size, batch 1 and 2, extrapolated linearly in batch; on CUDA the
  peak is the caching allocator's peak reservation, and a step that does not fit even at
  batch 1 is the refusal.

The estimate covers the network's training step and validation forwards, not the data
loader (its workers hold some memory and may be the bottleneck for small networks), and the
whole-run time assumes every epoch of the budget runs (early stopping may end it sooner).
Steps of at most :data:`SMALL_STEP` pixels x batch are not probed: the first training step
costs no more than the probe and shows a failure as quickly.
"""
from __future__ import annotations

import gc
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from medplan.errors import MedplanError
from medplan.trainers.progress import format_duration
from medplan.trainers.settings import mixed_precision, resolve_device

if TYPE_CHECKING:  # annotations only: base imports what this module imports
    from medplan.trainers.base import Trainer

__all__ = ["SMALL_STEP", "Estimate", "available_memory", "check_run_budget", "estimate_run", "process_rss"]

#: pixels x batch of a training step below which no probe runs (64x64 at batch 4)
SMALL_STEP = 64 * 64 * 4
#: CPU probe sides: the smaller point, and the largest side of the larger one
PROBE_SMALL_SIDE, PROBE_MAX_SIDE = 64, 128
#: warn (without refusing) when the estimate is above this share of the available memory
WARN_SHARE = 0.85
#: a whole CPU run's peak RSS over the probe's extrapolation (allocator overhead, validation,
#: the loader's batch): 1.15-1.30 measured (module docstring)
CPU_MEMORY_OVERHEAD = 1.2
_SAMPLE_S = 0.002  # RSS sampling interval during a CPU probe step


# ----------------------------------------------------------------------------- memory of the machine
def _read(path: str | Path) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def process_rss() -> int | None:
    """This process's resident memory in bytes (Linux ``/proc``); None elsewhere."""
    text = _read("/proc/self/statm")
    if text is None:
        return None
    return int(text.split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _max_rss() -> int | None:
    """The process's peak resident memory so far (getrusage), in bytes; None where unknown."""
    try:
        import resource  # noqa: PLC0415 -- not on Windows
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if os.uname().sysname == "Darwin" else int(peak) * 1024


def _meminfo_available() -> int | None:
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def _cgroup_dirs() -> list[Path]:
    """Memory cgroup folders of this process, innermost first, with their ancestors (v2, then v1)."""
    out: list[Path] = []
    for line in (_read("/proc/self/cgroup") or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if controllers == "":
            root = Path("/sys/fs/cgroup")
        elif "memory" in controllers.split(","):
            root = Path("/sys/fs/cgroup/memory")
        else:
            continue
        rel_path = Path(rel.lstrip("/"))
        for anc in [rel_path, *rel_path.parents]:
            out.append(root / anc)
    return out


def _cgroup_available() -> int | None:
    """Room left under the tightest memory cgroup limit (page cache that can be dropped counts
    as room); None without a limit."""
    best: int | None = None
    for folder in _cgroup_dirs():
        for limit_name, usage_name, inactive_key in (("memory.max", "memory.current", "inactive_file"),
                                                     ("memory.limit_in_bytes", "memory.usage_in_bytes",
                                                      "total_inactive_file")):
            limit_text, usage_text = _read(folder / limit_name), _read(folder / usage_name)
            if limit_text is None or usage_text is None:
                continue
            limit_text = limit_text.strip()
            if limit_text == "max" or int(limit_text) >= 1 << 60:
                continue  # no limit here
            inactive = 0
            for line in (_read(folder / "memory.stat") or "").splitlines():
                key, _, value = line.partition(" ")
                if key == inactive_key:
                    inactive = int(value)
            room = int(limit_text) - max(0, int(usage_text) - inactive)
            best = room if best is None else min(best, room)
    return best


def available_memory(device: torch.device) -> int | None:
    """Bytes this process can still take on ``device``: on CPU the smaller of MemAvailable and
    the room under the cgroup limit; on CUDA the free device memory plus the allocator's
    cache; None where it cannot be told (MPS, systems without ``/proc``)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free) + int(torch.cuda.memory_reserved(device))
    if device.type != "cpu":
        return None
    found = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
    return max(0, min(found)) if found else None


# ----------------------------------------------------------------------------- the estimate
def _size_text(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def format_bytes(n: float) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


@dataclass(frozen=True)
class Estimate:
    """What a probe predicts for one run (``peak_bytes``/``available_bytes`` None: not known)."""

    arch: str
    size: tuple[int, int]          # the planned input size
    batch: int                     # per process
    processes: int
    device: str
    peak_bytes: int | None         # per process (CPU: resident memory of the process; CUDA: reserved)
    available_bytes: int | None    # what the processes can reach together (CPU) or per device (CUDA)
    step_s: float
    steps_per_epoch: int
    val_images: int
    val_s: float                   # validation forwards of one epoch
    epochs: int
    runs: int = 1                  # runs of this shape (the LR search trains one per LR)
    how: str = ""

    @property
    def need_bytes(self) -> int | None:
        """Memory the run needs where ``available_bytes`` is counted (every process on one host)."""
        if self.peak_bytes is None:
            return None
        return self.peak_bytes * (self.processes if self.device == "cpu" else 1)

    @property
    def fits(self) -> bool:
        return self.need_bytes is None or self.available_bytes is None or self.need_bytes <= self.available_bytes

    @property
    def tight(self) -> bool:
        return (self.fits and self.need_bytes is not None and self.available_bytes is not None
                and self.need_bytes > WARN_SHARE * self.available_bytes)

    @property
    def epoch_s(self) -> float:
        return self.steps_per_epoch * self.step_s + self.val_s

    @property
    def run_s(self) -> float:
        return self.runs * self.epochs * self.epoch_s

    def what(self) -> str:
        procs = f" x {self.processes} processes" if self.processes > 1 else ""
        return f"{self.arch} at {_size_text(self.size)}, batch {self.batch}{procs} on {self.device}"

    def memory_text(self) -> str:
        if self.need_bytes is None:
            return "peak memory not measured on this device"
        avail = "" if self.available_bytes is None else f" of {format_bytes(self.available_bytes)} available"
        return f"peak memory ~{format_bytes(self.need_bytes)}{avail}"

    def summary(self) -> str:
        """One line: memory, time per step, per epoch and for the whole run, and how it was estimated."""
        runs = f" x {self.runs} runs" if self.runs > 1 else ""
        val = f" + {self.val_images} validation images" if self.val_images else ""
        return (f"estimate for {self.what()}: {self.memory_text()}; ~{format_duration(self.step_s)} per step, "
                f"~{format_duration(self.epoch_s)} per epoch ({_count(self.steps_per_epoch, 'step')}{val}), "
                f"~{format_duration(self.run_s)} for {_count(self.epochs, 'epoch')}{runs} (early stopping may end "
                "it sooner) "
                f"[{self.how}; network only, data loading not included]")

    def refusal(self) -> str:
        """The one-line refusal: what, how much it needs, what there is, how to go on."""
        gpu = self.device.startswith("cuda")
        ways = ("lower --batch-size, spread the batch over more GPUs (--num-gpus N), or run on the CPU "
                "(--device cpu)" if gpu else "lower --batch-size (or the plan's input_size), train on a GPU "
                "(--device cuda)")
        return (f"{self.what()} needs ~{format_bytes(self.need_bytes or 0)} of memory at its peak "
                f"({self.how}), but {format_bytes(self.available_bytes or 0)} are available: {ways}, or pass "
                "--skip-memory-check to try anyway")


class _PeakMeter:
    """Peak memory during a block: CUDA's peak reservation, else the process's peak RSS
    (sampled every few ms, and getrusage's high-water mark when that rose in the block)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(_SAMPLE_S):
            rss = process_rss()
            if rss is not None and (self.peak is None or rss > self.peak):
                self.peak = rss

    def __enter__(self) -> "_PeakMeter":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.device.type == "cpu":
            self._before_max = _max_rss()
            self.peak = process_rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_reserved(self.device))
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            after = _max_rss()
            if after is not None and (self._before_max is None or after > self._before_max):
                self.peak = max(self.peak or 0, after)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _net_size(trainer: "Trainer") -> tuple[int, int]:
    size = trainer.internal_size or trainer.plan.input_size
    return int(size[0]), int(size[1])


def probe_points(net_size: tuple[int, int], batch: int, device_type: str,
                 fixed_size: bool) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """The probe's two (batch, H, W) points: on CPU batch 1 at 64x64 and at the run's size scaled
    to at most 128 a side (multiples of 64, so no model pads them); batch 1 and 2 at the run's
    size on GPUs, for networks with a fixed internal size, and when the two CPU sizes coincide."""
    h, w = net_size
    if device_type == "cpu" and not fixed_size:
        scale = min(1.0, PROBE_MAX_SIDE / max(h, w))
        big = tuple(max(PROBE_SMALL_SIDE, round(s * scale / PROBE_SMALL_SIDE) * PROBE_SMALL_SIDE) for s in (h, w))
        small = (PROBE_SMALL_SIDE, PROBE_SMALL_SIDE)
        if big != small and big[0] * big[1] < h * w:
            return (1, *small), (1, *big)
        return (1, h, w), (2, h, w)
    return (1, h, w), (2 if batch > 1 else 1, h, w)


def _synthetic_batch(trainer: "Trainer", point: tuple[int, int, int], device: torch.device) -> dict:
    b, h, w = point
    classes = max(2, len(trainer.plan.class_names))
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(b, trainer.plan.channels, h, w, generator=gen).to(device)
    seg = torch.randint(0, classes, (b, h, w), generator=gen).to(device)
    return {"image": image, "seg": seg, "case_ids": [f"probe_{i}" for i in range(b)]}


def _probe_trainer(trainer: "Trainer") -> "Trainer":
    """A second trainer of the same class for the probe: built like one for prediction, so the
    run's trainer (its notes, its internal size) stays untouched; ``resuming`` skips the weights
    file, which the probe's random weights do not need."""
    probe = type(trainer).for_prediction(trainer.run_dir.path, arch=trainer.arch, plan=trainer.plan,
                                         model_options=trainer.model_options, dataset=trainer.dataset,
                                         fold=trainer.fold, lr=trainer.lr)
    probe.resuming = True
    return probe


def _measure(trainer: "Trainer", device: torch.device, batch: int) -> dict:
    """Three probe steps (warm-up and memory at point 1, time at point 1, memory and time at
    point 2) and one validation forward; the network is freed before returning."""
    probe = _probe_trainer(trainer)
    probe.device = device
    probe.amp_dtype, _ = mixed_precision(trainer.settings, device)
    model = probe.build_network().to(device)
    fixed = probe.internal_size is not None
    net = (int(probe.internal_size[0]), int(probe.internal_size[1])) if fixed else _net_size(trainer)
    p1, p2 = probe_points(net, batch, device.type, fixed)
    optimizer = probe.configure_optimizers(model)
    probe.loss_fn = probe.build_loss().to(device)
    model.train()

    def step(point: tuple[int, int, int]) -> tuple[int | None, float]:
        data = _synthetic_batch(trainer, point, device)
        with _PeakMeter(device) as meter:
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            with probe.autocast():
                loss = probe.compute_loss(probe.forward_batch(model, data), data)
            loss.backward()
            optimizer.step()
            _sync(device)
            seconds = time.perf_counter() - t0
        return meter.peak, seconds

    try:
        m1, _ = step(p1)            # warm-up: optimizer state, first-call costs
        _, t1 = step(p1)
        m2, t2 = step(p2) if p2 != p1 else (m1, t1)
        model.eval()
        data = _synthetic_batch(trainer, p2, device)
        with torch.no_grad(), probe.autocast():
            t0 = time.perf_counter()
            probe.forward_batch(model, data)
            _sync(device)
            t_eval = time.perf_counter() - t0
    finally:
        del model, optimizer, probe
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"points": (p1, p2), "net": net, "fixed": fixed, "m": (m1, m2), "t": (t1, t2), "t_eval": t_eval}


def _linear(x1: float, y1: float, x2: float, y2: float, x: float, proportional_floor: bool) -> float:
    """y at x on the line through two points; a falling line (measurement noise) becomes the
    proportional one through the second point (time) or a flat one (memory)."""
    slope = (y2 - y1) / (x2 - x1) if x2 != x1 else 0.0
    if slope <= 0:
        slope = y2 / x2 if proportional_floor else 0.0
    return max(0.0, y2 + slope * (x - x2))


def estimate_run(trainer: "Trainer", *, processes: int = 1, epochs: int | None = None, runs: int = 1,
                 available: Callable[[torch.device], int | None] | None = None) -> Estimate | None:
    """Probe ``trainer``'s network and estimate its run's peak memory and time; None for a step
    of at most :data:`SMALL_STEP` pixels x batch (not worth a probe). ``processes``: data-parallel
    processes sharing the global batch. The random streams are left as they were."""
    processes = max(1, int(processes))
    batch = max(1, trainer.batch_size // processes)
    net = _net_size(trainer)
    if batch * net[0] * net[1] <= SMALL_STEP:
        return None
    device = resolve_device(trainer.settings.device)
    avail_fn = available or available_memory
    base = process_rss() if device.type == "cpu" else 0
    room = avail_fn(device)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            found = _measure(trainer, device, batch)
    except torch.OutOfMemoryError:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        free = "" if room is None else f" ({format_bytes(room)} available)"
        raise MedplanError(f"{trainer.arch} at {_size_text(net)} on {device}: one training step does not fit in "
                           f"memory even at batch 1{free}: lower the plan's input_size, use a larger GPU or run on "
                           "the CPU (--device cpu), or pass --skip-memory-check to try anyway") from None
    (p1, p2), (m1, m2), (t1, t2) = found["points"], found["m"], found["t"]
    x1, x2 = (p[0] * p[1] * p[2] for p in (p1, p2))
    target = batch * found["net"][0] * found["net"][1]
    if p1[1:] == p2[1:]:
        how = f"probe at {_size_text(p2[1:])}, batch {p1[0]}" + (f" and {p2[0]}" if p2 != p1 else "")
        how += ", extrapolated linearly in batch" if p2 != p1 or batch != p1[0] else ""
    else:
        how = f"probe at {_size_text(p1[1:])} and {_size_text(p2[1:])}, batch 1, extrapolated linearly in pixels x batch"
    if found["fixed"]:
        how += f" (network runs at {_size_text(found['net'])})"
    if device.type == "cpu":
        how += f", memory +{round(100 * (CPU_MEMORY_OVERHEAD - 1))}% for the allocator"
    peak = None
    if m1 is not None and m2 is not None:
        peak = _linear(x1, m1, x2, m2, target, proportional_floor=False)
        peak = int(peak * (CPU_MEMORY_OVERHEAD if device.type == "cpu" else 1.0))
    available_total = None
    if room is not None:
        available_total = room + (base or 0) if device.type == "cpu" else room
    step_s = _linear(x1, t1, x2, t2, target, proportional_floor=True)
    val_images = len(trainer.val_cases)
    val_s = val_images * found["t_eval"] / x2 * found["net"][0] * found["net"][1]
    return Estimate(trainer.arch, (int(trainer.plan.input_size[0]), int(trainer.plan.input_size[1])), batch,
                    processes, str(device), peak_bytes=peak, available_bytes=available_total, step_s=step_s,
                    steps_per_epoch=max(1, len(trainer.train_cases) // trainer.batch_size), val_images=val_images,
                    val_s=val_s, epochs=int(epochs or trainer.epochs), runs=runs, how=how)


def check_run_budget(trainer: "Trainer", *, processes: int = 1, epochs: int | None = None, runs: int = 1,
                     continue_training: bool = False, log: Callable[[str], None] = print) -> Estimate | None:
    """Estimate the run and say so in one line; a MedplanError (one line: what, need, available,
    how to go on) when it will not fit. Nothing is probed for a finished run that
    ``--continue`` leaves as it is, or for a small step (:data:`SMALL_STEP`)."""
    if continue_training and not trainer.settings.force and \
            trainer.run_dir.is_complete(validates=bool(trainer.val_cases)):
        return None
    estimate = estimate_run(trainer, processes=processes, epochs=epochs, runs=runs)
    if estimate is None:
        return None
    if not estimate.fits:
        raise MedplanError(estimate.refusal())
    log(estimate.summary())
    if estimate.tight:
        log(f"warning: {estimate.what()} will use ~{format_bytes(estimate.need_bytes or 0)} of the "
            f"{format_bytes(estimate.available_bytes or 0)} available; other programs may push it out of memory")
    return estimate

