"""A run's settings and the small decisions made from them: device, mixed precision, seeds,
early stopping. No training happens here."""
from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medplan.errors import MedplanError
from medplan.plan import Plan

DEFAULT_SEED = 12345
STAGES = ("cv", "lr_search")


@dataclass
class TrainSettings:
    """One run's settings: the plan's protocol unless a command-line flag overrides it."""

    lr: float | None = None            # None: lr_search.json's best_lr, else plan.lr
    epochs: int | None = None          # None: plan.epochs for the stage
    batch_size: int | None = None      # None: plan.batch_size (global batch under DDP)
    device: str = "auto"               # auto | cpu | cuda | mps
    amp: bool = True                   # mixed precision on CUDA (never on CPU/MPS)
    seed: int = DEFAULT_SEED
    deterministic: bool = False
    num_workers: int | None = None     # data loading workers (None: the loader's default)
    checkpoint_every: int = 1          # write checkpoint_latest.pt every N epochs
    stage: str = "cv"                  # cv | lr_search (picks the epoch budget)
    force: bool = False                # start over a finished or interrupted run, deleting its results
    progress: bool | None = None       # progress bar: None = only on a terminal
    val_batch_size: int | None = None  # None: the training batch size

    @classmethod
    def from_overrides(cls, overrides: dict[str, Any] | None) -> "TrainSettings":
        overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise MedplanError(f"unknown training setting(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        s = cls(**overrides)
        if s.device not in ("auto", "cpu", "cuda", "mps"):
            raise MedplanError(f"--device must be auto, cpu, cuda or mps, got {s.device!r}")
        if s.stage not in STAGES:
            raise MedplanError(f"--stage must be cv or lr_search, got {s.stage!r}")
        for name in ("epochs", "batch_size", "checkpoint_every", "val_batch_size"):
            value = getattr(s, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise MedplanError(f"{name} must be a positive integer, got {value!r}")
        if s.lr is not None and not (isinstance(s.lr, (int, float)) and s.lr > 0):
            raise MedplanError(f"--lr must be a positive number, got {s.lr!r}")
        if s.num_workers is not None and s.num_workers < 0:
            raise MedplanError(f"--num-workers must be >= 0, got {s.num_workers}")
        return s


class EarlyStopping:
    """Stop after ``patience`` epochs without an improvement larger than ``min_delta``."""

    def __init__(self, monitor: str = "val_mIoU", mode: str = "max", patience: int | None = 30,
                 min_delta: float = 0.0):
        if mode not in ("max", "min"):  # a plan's mode is checked when it is read (medplan.plan)
            raise ValueError(f"early_stopping.mode must be max or min, got {mode!r}")
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode, patience, float(min_delta)
        self.best: float | None = None
        self.best_epoch = 0
        self.bad_epochs = 0
        self.stopped_epoch: int | None = None

    @classmethod
    def from_plan(cls, plan: Plan) -> "EarlyStopping":
        es = plan.early_stopping
        return cls(es.monitor, es.mode, es.patience, es.min_delta)

    def step(self, value: float, epoch: int) -> bool:
        """Record ``value``; True when training should stop now."""
        sign = 1.0 if self.mode == "max" else -1.0
        if self.best is None or sign * (value - self.best) > self.min_delta:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
        else:
            self.bad_epochs += 1
        if self.patience is not None and self.bad_epochs >= self.patience:
            self.stopped_epoch = epoch
            return True
        return False

    def state_dict(self) -> dict:
        return dict(best=self.best, best_epoch=self.best_epoch, bad_epochs=self.bad_epochs,
                    stopped_epoch=self.stopped_epoch)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an explicit choice that is unavailable is an error."""
    cuda, mps = torch.cuda.is_available(), bool(getattr(torch.backends, "mps", None)
                                                  and torch.backends.mps.is_available())
    if preference == "cuda" and not cuda:
        raise MedplanError("--device cuda: no CUDA device is available (try --device cpu)")
    if preference == "mps" and not mps:
        raise MedplanError("--device mps: Apple MPS is not available (try --device cpu)")
    if preference == "cuda" or (preference == "auto" and cuda):
        return torch.device("cuda", local_rank)
    if preference == "mps" or (preference == "auto" and mps):
        return torch.device("mps")
    return torch.device("cpu")


def configure_backends(settings: TrainSettings, device: torch.device) -> None:
    """Deterministic algorithms when asked; else cuDNN autotuning on CUDA."""
    if settings.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def mixed_precision(settings: TrainSettings, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler]:
    """The autocast dtype (bf16 where supported, else fp16; None: full precision) and the grad
    scaler (enabled for fp16 only)."""
    amp_dtype = None
    use_scaler = False
    if settings.amp and device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            amp_dtype = torch.bfloat16
        else:
            amp_dtype, use_scaler = torch.float16, True
    return amp_dtype, torch.amp.GradScaler(device.type if use_scaler else "cpu", enabled=use_scaler)
