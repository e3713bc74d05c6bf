"""Distributed data parallel training (the paper trained on two GPUs).

Runs under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK in the environment), or through
``medplan_train ... --num-gpus N``, which relaunches itself with ``torch.distributed.run``.
Backend: nccl on CUDA, gloo otherwise (gloo on CPU is what the tests use).

Choices:
- the plan's batch size is the *global* batch: each of N ranks takes ``batch_size // N``;
- each rank trains on a disjoint, equally long shard of the training cases, reshuffled
  deterministically every epoch (every rank draws the same permutation from seed and epoch);
- rank 0 validates the whole validation fold and broadcasts the result, so early stopping and
  best-checkpoint decisions are identical on every rank;
- only rank 0 writes files; checkpoints hold every rank's RNG state for an exact resume.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from medplan.errors import MedplanError


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device_type: str) -> DistContext:
    """Join the process group torchrun set up; a single-process context when there is none."""
    world = env_world_size()
    if world <= 1:
        return DistContext()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, backend=backend)


def cleanup() -> None:
    """Leave the process group (call once, when the process is done training)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def broadcast_object(ctx: DistContext, obj: Any, src: int = 0) -> Any:
    if not ctx.enabled:
        return obj
    box = [obj if ctx.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(ctx: DistContext, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def min_across_ranks(ctx: DistContext, value: int, device: torch.device) -> int:
    if not ctx.enabled:
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def mean_across_ranks(ctx: DistContext, value: float, device: torch.device) -> float:
    if not ctx.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / ctx.world_size


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def wrap_model(model: nn.Module, ctx: DistContext, device: torch.device, *,
               find_unused_parameters: bool = False) -> tuple[nn.Module, list[str]]:
    """DDP-wrap ``model`` (SyncBatchNorm first where it has BN and the device supports it).

    Returns the wrapped model and the deviations to record (SyncBatchNorm has no CPU kernel:
    on CPU, BN statistics stay per rank and DDP broadcasts rank 0's buffers every step).
    """
    notes: list[str] = []
    if not ctx.enabled:
        return model, notes
    if has_batchnorm(model):
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            notes.append(f"SyncBatchNorm not available on {device.type}: per-rank BN statistics "
                         "(rank 0's buffers broadcast every step)")
    ids = [device.index] if device.type == "cuda" else None
    wrapped = nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused_parameters)
    return wrapped, notes


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def shard_cases(case_ids: Sequence[str], rank: int, world_size: int, *, seed: int, epoch: int) -> list[str]:
    """This rank's share of the training cases for ``epoch``: disjoint across ranks, equally
    long (the permutation is padded by wrapping around, like DistributedSampler)."""
    ids = sorted(case_ids)
    if world_size <= 1:
        return ids
    rng = np.random.default_rng([seed, epoch])
    order = [ids[i] for i in rng.permutation(len(ids))]
    per_rank = -(-len(order) // world_size)
    padded = (order * (per_rank * world_size // max(1, len(order)) + 1))[: per_rank * world_size]
    return padded[rank::world_size]


def parameters_in_sync(ctx: DistContext, model: nn.Module) -> bool:
    """True when every rank holds the same weights (a checksum per parameter, compared across
    ranks). Buffers such as BN running statistics are left out: each rank updates its own in
    its last forward pass; DDP broadcasts rank 0's at every step and only rank 0's are saved."""
    if not ctx.enabled:
        return True
    with torch.no_grad():
        checksum = [float(p.detach().double().sum().cpu()) for p in unwrap(model).parameters()]
    sums = gather_objects(ctx, checksum)
    return all(np.allclose(s, sums[0], rtol=0, atol=1e-6) for s in sums)


def relaunch_with_torchrun(num_procs: int, module: str, argv: list[str]) -> int:
    """Run ``python -m module argv`` in ``num_procs`` processes via torch.distributed.run."""
    if num_procs < 1:
        raise MedplanError(f"--num-gpus must be >= 1, got {num_procs}")
    from torch.distributed import run as torchrun

    args = ["--standalone", "--nnodes", "1", "--nproc_per_node", str(num_procs), "-m", module, *argv]
    try:
        torchrun.main(args)
    except SystemExit as exc:  # torchrun exits on completion
        return int(exc.code or 0)
    except Exception as exc:  # ChildFailedError: the rank's own error is already on stderr
        codes = [getattr(f, "exitcode", 1) for f in getattr(exc, "failures", {}).values()]
        print(f"distributed run failed: {type(exc).__name__}", file=sys.stderr)
        return next((c for c in codes if c and c > 0), 1)
    return 0
