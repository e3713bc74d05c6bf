"""Training and validation batches from the preprocessed uint8 arrays.

:class:`TrainLoader` streams augmented, normalized batches to the training device:

- Background workers are forked processes (:mod:`medplan.data.shm`); each reads memory-mapped
  uint8 arrays and writes its batches into shared-memory slots that are reused round-robin; only
  a few bytes per batch go through a pipe, and the main process copies a slot out (one memcpy)
  and hands it back. ``augment_on="device"`` (the default on CUDA): workers only load (uint8
  slots), and the main process augments the whole batch on the GPU. ``augment_on="workers"``
  (the default on CPU): the same :class:`~medplan.data.augmentation.BatchAugmenter` runs inside
  the workers on CPU tensors (one torch thread each) and they write normalized float32 images,
  so the main process yields what ``num_workers=0`` computes in-process.
- ``plan.augmentation.backend == "nnunet"``: nnU-Net v2's 2D augmentation
  (:class:`~medplan.data.nnunet_aug.NnunetAugmenter`, batchgeneratorsv2) replaces the
  BatchAugmenter, per sample on the normalized image, in the workers or in-process. It is CPU
  only: ``augment_on="auto"`` picks the workers even on CUDA, ``augment_on="device"`` is refused.
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
import weakref
from functools import partial
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np
import torch

from medplan.data.augmentation import BatchAugmenter, build_augmentation
from medplan.data.nnunet_aug import NnunetAugmenter
from medplan.data.shm import SlotBuffer, WorkerPool
from medplan.errors import MedplanError
from medplan.plan import Plan
from medplan.preprocessing import load_case, normalize

log = logging.getLogger(__name__)

_TAG_ORDER = 0x0D0E  # keeps the loader's streams apart from other users of (seed, epoch)
_TAG_AUG = 0xA06
SLOTS_PER_WORKER = 2  # batches each worker has in hand (making one, one ready) while the trainer works
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


def make_augmenter(plan: Plan) -> BatchAugmenter | NnunetAugmenter:
    """The augmenter of the plan's ``augmentation.backend``: medplan's, or nnU-Net's (CPU only)."""
    if plan.augmentation.backend == "nnunet":
        return NnunetAugmenter(plan.num_classes)
    return build_augmentation(plan.augmentation)


def next_batch(key: tuple[int, int], per_epoch: int) -> tuple[int, int]:
    """The (epoch, k) after ``key``: workers run ahead across epoch boundaries."""
    epoch, k = key
    return (epoch, k + 1) if k + 1 < per_epoch else (epoch + 1, 0)


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
                cache: dict | None = None,
                out: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stack cases into uint8 arrays (``out``, e.g. a shared slot, or fresh ones); ``cache`` keeps
    their memory maps open between batches."""
    if out is None:
        n = len(case_ids)
        out = (np.empty((n, *shape), dtype=np.uint8), np.empty((n, *shape[1:]), dtype=np.uint8))
    images, segs = out
    for i, case_id in enumerate(case_ids):
        arrays = None if cache is None else cache.get(case_id)
        if arrays is None:
            image, seg, _ = load_case(data_dir, case_id, mmap=True)
            arrays = (image, seg)
            if cache is not None and len(cache) < _MAX_OPEN_CASES:
                cache[case_id] = arrays
        images[i], segs[i] = arrays
    return images, segs


class _BatchSource:
    """Makes batch ``k`` of epoch ``e``, in the main process or, into a shared slot, in a worker."""

    def __init__(self, data_dir: Path, case_ids: list[str], plan: Plan, batch_size: int, seed: int, augment: bool):
        self.data_dir = data_dir
        self.case_ids = case_ids
        self.plan = plan
        self.batch_size = batch_size
        self.seed = seed
        self.augmenter: BatchAugmenter | NnunetAugmenter | None = make_augmenter(plan) if augment else None
        self.shape = (plan.channels, *plan.input_size)
        self.image_dtype = torch.uint8 if self.augmenter is None else torch.float32
        self._open: dict = {}  # case id -> memory maps, filled lazily in each process
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its case order)
        self._affine: tuple[torch.Tensor, torch.Tensor] | None = None  # per-channel (scale, shift)

    def batch_cases(self, epoch: int, k: int) -> list[str]:
        if self._order is None or self._order[0] != epoch:
            order = epoch_order(len(self.case_ids), self.seed, epoch)
            if len(order) < self.batch_size:  # fewer cases than a batch: repeat them to fill it
                order = np.resize(order, self.batch_size)
            self._order = (epoch, order)
        order = self._order[1]
        return [self.case_ids[i] for i in order[k * self.batch_size:(k + 1) * self.batch_size]]

    def make(self, epoch: int, k: int,
             out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Batch ``k`` of ``epoch``: uint8 images (load only) or augmented, normalized float32
        ones, and uint8 labels; written into ``out`` (a worker's slot, its first rows) if given."""
        cases = self.batch_cases(epoch, k)
        b = len(cases)
        if self.augmenter is None:
            if out is None:
                out = (torch.empty((b, *self.shape), dtype=torch.uint8),
                       torch.empty((b, *self.shape[1:]), dtype=torch.uint8))
            image, seg = out[0][:b], out[1][:b]
            _load_batch(self.data_dir, cases, self.shape, self._open, out=(image.numpy(), seg.numpy()))
            return image, seg, cases
        images, segs = _load_batch(self.data_dir, cases, self.shape, self._open)
        # in a worker the augmenter works in the slot itself: no batch-sized allocation to page in
        slot = None if out is None else out[0][:b]
        gen = batch_generator(self.seed, epoch, k)
        if isinstance(self.augmenter, NnunetAugmenter):  # nnU-Net augments normalized images
            x = torch.empty((b, *self.shape), dtype=torch.float32) if slot is None else slot
            self._normalize(torch.from_numpy(images), x)
            x, y = self.augmenter(x, torch.from_numpy(segs), gen, out=x)
        else:  # medplan's augments on the 0..255 scale, then normalizes
            x, y = self.augmenter(torch.from_numpy(images), torch.from_numpy(segs), gen, out=slot)
            self._normalize(x, x)  # x is ours (fresh, or the slot): in place
        if out is None:
            return x, y, cases
        out[1][:b].copy_(y)
        return x, out[1][:b], cases

    def _normalize(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The plan's normalization as one per-channel multiply-add written into ``out``.

        Why: ``normalize`` allocates two batch-sized temporaries; in place it costs a quarter.
        Scale and shift are read off ``normalize`` itself (at 0 and 255), so every scheme it
        knows stays one definition.
        """
        if self._affine is None:
            probe = torch.tensor([0.0, 255.0]).view(2, 1, 1, 1).expand(2, self.shape[0], 1, 1).contiguous()
            ends = normalize(probe, self.plan.normalization)
            self._affine = ((ends[1:] - ends[:1]) / 255.0, ends[:1].clone())
        scale, shift = self._affine
        return torch.addcmul(shift, x, scale, out=out)

    def fill(self, key: tuple[int, int], image: torch.Tensor, seg: torch.Tensor) -> dict:
        """A worker's job: batch ``key = (epoch, k)`` into the slot; the case ids go back by pipe."""
        return {"case_ids": self.make(*key, out=(image, seg))[2]}


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
        cpu_only = plan.augmentation.backend == "nnunet"
        if augment_on == "auto":
            augment_on = "device" if self.device.type == "cuda" and not cpu_only else "workers"
        if augment_on not in ("device", "workers"):
            raise MedplanError(f"augment_on must be auto, device or workers, got {augment_on!r}")
        if augment_on == "device" and cpu_only:
            raise MedplanError("augment_on=device: augmentation.backend=nnunet (batchgeneratorsv2) runs on the CPU "
                               "only; use augment_on=workers (or auto)")
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
        # the main process augments only on the device; in the workers the source's augmenter does
        self.augmenter: BatchAugmenter | None = build_augmentation(plan.augmentation) if augment_on == "device" else None
        shape = (plan.channels, *plan.input_size)
        _check_cases(self.data_dir, sorted(set(self.case_ids)), shape)
        self._source = _BatchSource(self.data_dir, self.case_ids, plan, batch_size, seed,
                                    augment=augment_on == "workers")
        self._epoch = 0
        self._pool: WorkerPool | None = None
        self._finalizer: weakref.finalize | None = None

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
            image, seg, cases = self._fetch(epoch, k)
            yield self._to_device(image, seg, epoch, k, cases)
        self._epoch = epoch + 1

    def _fetch(self, epoch: int, k: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Batch ``k`` of ``epoch`` as tensors of our own (CPU, pinned, or on the device already)."""
        if self.num_workers == 0:
            return self._source.make(epoch, k)
        if self._pool is None:
            self._start()
        try:
            return self._pool.take((epoch, k), self._copy_out)
        except BaseException:  # a worker's error or death, or Ctrl-C: stop them all before raising
            self.close()
            raise

    def _copy_out(self, image: torch.Tensor, seg: torch.Tensor,
                  answer: dict) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Copy a worker's slot (its first rows) before it is reused: the one copy of the hand-over."""
        cases = list(answer["case_ids"])
        image, seg = image[:len(cases)], seg[:len(cases)]
        if self.device.type == "cpu":  # the labels widened to long in the same pass, when nothing else reads them
            return image.clone(), (seg.long() if self.augment_on == "workers" else seg.clone()), cases
        if self.pin_memory:
            return image.pin_memory(), seg.pin_memory(), cases
        return image.to(self.device), seg.to(self.device), cases

    def _start(self) -> None:
        """Fork the workers and their slots (once per loader, again after :meth:`close`)."""
        self.close()
        count = SLOTS_PER_WORKER * self.num_workers
        src = self._source
        slots = SlotBuffer(count, (self.batch_size, *src.shape), src.image_dtype, (self.batch_size, *src.shape[1:]))
        try:
            # nothing the pool holds may refer to the loader, or the finalizer would keep it alive
            self._pool = WorkerPool(src.fill, slots, self.num_workers, partial(next_batch, per_epoch=self._len),
                                    SLOTS_PER_WORKER, name="medplan-train-loader")
        except BaseException:
            slots.close()
            raise
        self._finalizer = weakref.finalize(self, self._pool.close)

    def _to_device(self, image: torch.Tensor, seg: torch.Tensor, epoch: int, k: int, cases: list[str]) -> dict:
        if self.pin_memory and not image.is_pinned():
            image, seg = image.pin_memory(), seg.pin_memory()
        non_blocking = self.pin_memory
        image = image.to(self.device, non_blocking=non_blocking)
        seg = seg.to(self.device, non_blocking=non_blocking)
        if self.augmenter is not None:  # augment_on == "device"
            image, seg = self.augmenter(image, seg, batch_generator(self.seed, epoch, k))
            image = normalize(image, self.plan.normalization)
        return {"image": image.contiguous(), "seg": seg.long(), "case_ids": cases}

    def close(self) -> None:
        """Stop the background workers and free their shared memory (idempotent); iterating
        again restarts them."""
        if self._finalizer is not None:
            self._finalizer()  # runs WorkerPool.close once
            self._finalizer = None
        self._pool = None

    def __enter__(self) -> "TrainLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


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
