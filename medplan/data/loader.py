"""Training and validation batches from the preprocessed uint8 arrays.

:class:`TrainLoader` streams augmented, normalized batches to the training device:

- Background workers are batchgenerators' ``MultiThreadedAugmenter`` processes; each reads
  memory-mapped uint8 arrays. ``augment_on="device"`` (the default on CUDA): workers only load,
  and the main process augments the whole batch on the GPU. ``augment_on="workers"`` (the
  default on CPU): the same :class:`~medplan.data.augmentation.BatchAugmenter` runs inside the
  workers on CPU tensors (one torch thread each) and they hand over normalized float16
  batches (half the bytes of float32 through the pipe; the rounding is below 0.07 grey levels),
  turned into float32 on arrival.
- Everything random is a function of ``(seed, epoch)``: the epoch's case order comes from
  ``(seed, epoch)`` and batch ``k``'s augmentation from a generator seeded by
  ``(seed, epoch, k)``. So the batches do not depend on the number of workers, and a run
  resumed at epoch ``e`` (``set_epoch(e)``) sees exactly the batches the first run saw.
- Workers run ahead across epoch boundaries, so an epoch starts with batches already made;
  a jump to another epoch than the next one (or an epoch left half-read) restarts them.

Distributed training: give each rank only its own cases, equally many per rank, e.g.
``medplan.trainers.distributed.shard_cases(train_ids, rank, world_size, seed=s, epoch=e)``, and
a per-rank ``seed`` (``seed + rank``) so that ranks do not draw the same augmentation.
``num_workers`` defaults to the usable CPUs divided by ``LOCAL_WORLD_SIZE``.
"""
from __future__ import annotations

import logging
import os
import traceback
import weakref
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np
import torch
from batchgenerators.dataloading.data_loader import SlimDataLoaderBase

from medplan.data.augmentation import BatchAugmenter, build_augmentation
from medplan.errors import MedplanError
from medplan.plan import Plan
from medplan.preprocessing import load_case, normalize

log = logging.getLogger(__name__)

_TAG_ORDER = 0x0D0E  # keeps the loader's streams apart from other users of (seed, epoch)
_TAG_AUG = 0xA06
_WIRE_DTYPE = torch.float16  # what workers hand over after augmenting and normalizing
MAX_DEFAULT_WORKERS = 8
_MAX_OPEN_CASES = 4096  # memory maps a loader process keeps open (two per case)


def default_num_workers(augment_on: str) -> int:
    """Usable CPUs shared among the ranks of this node, at most 8 (4 when they only load)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    cpus //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(cpus, MAX_DEFAULT_WORKERS if augment_on == "workers" else 4))


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The case order of ``epoch``: a permutation of range(n) drawn from (seed, epoch)."""
    return np.random.default_rng([_TAG_ORDER, seed, epoch]).permutation(n)


def batch_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The CPU generator that draws batch ``index`` of ``epoch``'s augmentation."""
    state = np.random.SeedSequence([_TAG_AUG, seed, epoch, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def _check_cases(data_dir: Path, case_ids: Sequence[str], shape: tuple[int, int, int]) -> None:
    """Every case present, at the planned size and channels: an error now, not in a worker later."""
    for case_id in case_ids:
        image, seg, _ = load_case(data_dir, case_id, mmap=True)
        if tuple(image.shape) != shape or tuple(seg.shape) != shape[1:] or image.dtype != np.uint8 \
                or seg.dtype != np.uint8:
            raise MedplanError(f"case {case_id} has arrays {image.dtype}{list(image.shape)} / "
                               f"{seg.dtype}{list(seg.shape)}, the plan expects uint8 {list(shape)} / "
                               f"uint8 {list(shape[1:])}; rerun medplan_preprocess", data_dir / f"{case_id}.npy")


def _load_batch(data_dir: Path, case_ids: Sequence[str], shape: tuple[int, int, int],
                cache: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stack cases into fresh uint8 arrays; ``cache`` keeps their memory maps open between batches."""
    images = np.empty((len(case_ids), *shape), dtype=np.uint8)
    segs = np.empty((len(case_ids), *shape[1:]), dtype=np.uint8)
    for i, case_id in enumerate(case_ids):
        arrays = None if cache is None else cache.get(case_id)
        if arrays is None:
            image, seg, _ = load_case(data_dir, case_id, mmap=True)
            arrays = (image, seg)
            if cache is not None and len(cache) < _MAX_OPEN_CASES:
                cache[case_id] = arrays
        images[i], segs[i] = arrays
    return images, segs


class _BatchSource(SlimDataLoaderBase):
    """Makes batch ``k`` of epoch ``e`` on demand; in a worker, the stream t, t+n, t+2n, ...

    The global batch number g counts from ``start_epoch``: epoch = start_epoch + g // per_epoch,
    k = g % per_epoch. MultiThreadedAugmenter reads its workers' queues round-robin, so the main
    process receives g = 0, 1, 2, ... in order. Errors travel as items, raised in the main process.
    """

    def __init__(self, data_dir: Path, case_ids: list[str], plan: Plan, batch_size: int, seed: int,
                 per_epoch: int, augment: bool, num_workers: int, start_epoch: int):
        super().__init__(None, batch_size, max(1, num_workers))
        self.data_dir = data_dir
        self.case_ids = case_ids
        self.plan = plan
        self.seed = seed
        self.per_epoch = per_epoch
        self.augmenter: BatchAugmenter | None = build_augmentation(plan.augmentation) if augment else None
        self.shape = (plan.channels, *plan.input_size)
        self.start_epoch = start_epoch
        self._next_g: int | None = None
        self._open: dict = {}  # case id -> memory maps, filled lazily in each process
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its case order)

    def __getstate__(self) -> dict:  # spawned workers open their own memory maps
        return {**self.__dict__, "_open": {}, "_order": None}

    def batch_cases(self, epoch: int, k: int) -> list[str]:
        if self._order is None or self._order[0] != epoch:
            order = epoch_order(len(self.case_ids), self.seed, epoch)
            if len(order) < self.batch_size:  # fewer cases than a batch: repeat them to fill it
                order = np.resize(order, self.batch_size)
            self._order = (epoch, order)
        order = self._order[1]
        return [self.case_ids[i] for i in order[k * self.batch_size:(k + 1) * self.batch_size]]

    def make(self, epoch: int, k: int) -> dict:
        """Batch ``k`` of ``epoch``: uint8 arrays, or augmented + normalized float16 ones."""
        cases = self.batch_cases(epoch, k)
        images, segs = _load_batch(self.data_dir, cases, self.shape, self._open)
        out = {"epoch": epoch, "index": k, "case_ids": cases}
        if self.augmenter is None:
            out.update(image=images, seg=segs)
            return out
        x, y = self.augmenter(torch.from_numpy(images), torch.from_numpy(segs), batch_generator(self.seed, epoch, k))
        out.update(image=normalize(x, self.plan.normalization).to(_WIRE_DTYPE).numpy(), seg=y.numpy())
        return out

    def generate_train_batch(self) -> dict:
        if self._next_g is None:  # first call, in a freshly started worker process
            self._next_g = self.thread_id
            torch.set_num_threads(1)
        g = self._next_g
        self._next_g += self.number_of_threads_in_multithreaded
        epoch, k = self.start_epoch + g // self.per_epoch, g % self.per_epoch
        try:
            return self.make(epoch, k)
        except Exception as exc:  # the main process raises it, with this worker's traceback
            return {"error": str(exc), "error_type": type(exc).__name__,
                    "medplan_error": isinstance(exc, MedplanError), "traceback": traceback.format_exc(),
                    "epoch": epoch, "index": k}


class TrainLoader:
    """Endless-worker training loader; one pass of ``for batch in loader`` is one epoch.

    ``len(loader)`` batches per epoch: ``len(case_ids) // batch_size`` (``drop_last``, the
    default) or rounded up, at least 1 (with fewer cases than ``batch_size`` the one batch
    repeats cases). Each batch is ``{"image": float32 (B, C, H, W) normalized, "seg": long
    (B, H, W), "case_ids": [...]}`` on ``device``. After a full pass the epoch advances by one
    by itself; ``set_epoch(e)`` sets it explicitly. Call :meth:`close` (or use ``with``) to stop
    the workers; they are also stopped when the loader is garbage-collected or at exit.
    """

    def __init__(self, data_dir: str | Path, case_ids: list[str], plan: Plan, *, batch_size: int,
                 num_workers: int | None = None, seed: int = 0, device: str | torch.device = "cpu",
                 augment_on: Literal["auto", "device", "workers"] = "auto", pin_memory: bool | None = None,
                 drop_last: bool = True):
        self.data_dir = Path(data_dir)
        self.case_ids = [str(c) for c in case_ids]
        self.plan = plan
        self.device = torch.device(device)
        if not self.case_ids:
            raise MedplanError("no training cases to load", self.data_dir)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise MedplanError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(seed, int) or seed < 0:
            raise MedplanError(f"seed must be a non-negative integer, got {seed!r}")
        if augment_on == "auto":
            augment_on = "device" if self.device.type == "cuda" else "workers"
        if augment_on not in ("device", "workers"):
            raise MedplanError(f"augment_on must be auto, device or workers, got {augment_on!r}")
        self.augment_on = augment_on
        self.num_workers = default_num_workers(augment_on) if num_workers is None else int(num_workers)
        if self.num_workers < 0:
            raise MedplanError(f"num_workers must be >= 0, got {num_workers}")
        self.pin_memory = (self.device.type == "cuda") if pin_memory is None else bool(pin_memory)
        self.pin_memory = self.pin_memory and self.device.type == "cuda"
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        n = len(self.case_ids)
        self._len = max(1, n // batch_size if drop_last else -(-n // batch_size))
        self.augmenter = build_augmentation(plan.augmentation)
        shape = (plan.channels, *plan.input_size)
        _check_cases(self.data_dir, sorted(set(self.case_ids)), shape)
        self._source = _BatchSource(self.data_dir, self.case_ids, plan, batch_size, seed, self._len,
                                    augment=augment_on == "workers", num_workers=self.num_workers, start_epoch=0)
        self._epoch = 0
        self._mta = None
        self._next: tuple[int, int] | None = None  # (epoch, k) the running workers deliver next
        self._finalizer = None

    def __len__(self) -> int:
        return self._len

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s case order and augmentation for the next pass."""
        if not isinstance(epoch, int) or epoch < 0:
            raise MedplanError(f"epoch must be a non-negative integer, got {epoch!r}")
        self._epoch = epoch

    def __iter__(self) -> Iterator[dict]:
        epoch = self._epoch
        for k in range(self._len):
            item = self._fetch(epoch, k)
            yield self._to_device(item)
        self._epoch = epoch + 1

    def _fetch(self, epoch: int, k: int) -> dict:
        if self.num_workers == 0:
            item = self._source.make(epoch, k)
        else:
            if self._mta is None or self._next != (epoch, k):
                self._start(epoch, k)
            try:
                item = next(self._mta)
            except RuntimeError as exc:  # a worker died without reporting (killed, out of memory)
                self.close()
                raise RuntimeError(f"training loader: {exc}") from None
            self._next = (epoch, k + 1) if k + 1 < self._len else (epoch + 1, 0)
        if "error" in item:
            self.close()
            if item["medplan_error"]:
                raise MedplanError(item["error"])
            raise RuntimeError(f"training loader worker failed on batch {item['index']} of epoch {item['epoch']}: "
                               f"{item['error_type']}: {item['error']}\n{item['traceback']}")
        if (item["epoch"], item["index"]) != (epoch, k):  # the round-robin order is what we rely on
            self.close()
            raise RuntimeError(f"training loader out of order: expected batch {k} of epoch {epoch}, "
                               f"got {item['index']} of {item['epoch']}")
        return item

    def _start(self, epoch: int, k: int) -> None:
        """(Re)start the workers so that they deliver batch ``k`` of ``epoch`` first."""
        from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter

        self.close()
        if k != 0:  # only ever asked at an epoch start; keep the arithmetic honest anyway
            raise RuntimeError("training loader can only start at the beginning of an epoch")
        self._source.start_epoch = epoch
        seeds = [int(np.random.SeedSequence([self.seed, epoch, w]).generate_state(1)[0])
                 for w in range(self.num_workers)]
        self._mta = MultiThreadedAugmenter(self._source, None, self.num_workers, num_cached_per_queue=2,
                                           seeds=seeds, pin_memory=False)
        self._finalizer = weakref.finalize(self, _stop, self._mta)
        self._next = (epoch, 0)

    def _to_device(self, item: dict) -> dict:
        image = torch.from_numpy(item["image"])
        seg = torch.from_numpy(item["seg"])
        if self.pin_memory:
            image, seg = image.pin_memory(), seg.pin_memory()
        non_blocking = self.pin_memory
        image = image.to(self.device, non_blocking=non_blocking)
        seg = seg.to(self.device, non_blocking=non_blocking)
        if self.augment_on == "device":
            gen = batch_generator(self.seed, item["epoch"], item["index"])
            image, seg = self.augmenter(image, seg, gen)
            image = normalize(image, self.plan.normalization)
        else:
            image = image.to(torch.float32)
        return {"image": image.contiguous(), "seg": seg.long(), "case_ids": list(item["case_ids"])}

    def close(self) -> None:
        """Stop the background workers (idempotent); iterating again restarts them."""
        if self._finalizer is not None:
            self._finalizer()  # runs _stop once
            self._finalizer = None
        self._mta = None
        self._next = None

    def __enter__(self) -> "TrainLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


def _stop(mta) -> None:
    try:
        mta._finish()
    except Exception as exc:  # never let shutdown raise
        log.debug("stopping loader workers: %s", exc)


def iterate_validation(data_dir: str | Path, case_ids: Sequence[str], plan: Plan, *, batch_size: int,
                       device: str | torch.device = "cpu") -> Iterator[dict]:
    """Whole validation images in the given order, normalized, without augmentation.

    Yields ``{"image": float32 (B, C, H, W), "seg": long (B, H, W), "case_ids": [...]}``; the
    last batch may be smaller.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise MedplanError(f"batch_size must be a positive integer, got {batch_size!r}")
    data_dir, device = Path(data_dir), torch.device(device)
    shape = (plan.channels, *plan.input_size)
    ids = [str(c) for c in case_ids]
    _check_cases(data_dir, sorted(set(ids)), shape)
    for start in range(0, len(ids), batch_size):
        cases = ids[start:start + batch_size]
        images, segs = _load_batch(data_dir, cases, shape)
        image = torch.from_numpy(images).to(device)
        yield {"image": normalize(image.to(torch.float32), plan.normalization), "seg": torch.from_numpy(segs).to(device).long(),
               "case_ids": cases}
