"""A run's settings and the small decisions made from them: device, mixed precision, seeds,
early stopping, and the speed choices (torch.compile, channels_last, fused/foreach AdamW). No
training happens here."""
from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

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
    compile: bool | str = False        # torch.compile the training forward (medplan_train --compile): True =
                                       # inductor; a string names another backend (e.g. aot_eager, for tests)
    channels_last: bool | None = None  # None: on CUDA when convolutions do most of the FLOPs (use_channels_last)
    tensorboard: bool = True           # stream scalars to TensorBoard when the package is installed

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
        if not isinstance(s.compile, (bool, str)) or s.compile == "":
            raise MedplanError(f"compile must be true, false or a torch.compile backend name, got {s.compile!r}")
        if s.channels_last not in (None, True, False):
            raise MedplanError(f"channels_last must be true, false or unset, got {s.channels_last!r}")
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


# ----------------------------------------------------------------------------- speed choices
#: channels_last (NHWC) pays on CUDA when convolutions dominate: cuDNN's tensor-core kernels
#: under bf16/fp16 are NHWC-native, so NCHW convolutions pay a transpose on each side. Where
#: attention and MLPs dominate, the layout changes around the few convolutions cost more
#: than they save, so below this share of forward FLOPs the default layout stays.
CHANNELS_LAST_MIN_CONV_SHARE = 0.8


def compile_backend(choice: bool | str) -> str | None:
    """The torch.compile backend a ``compile`` setting asks for (None: no compilation)."""
    if choice is False:
        return None
    return "inductor" if choice is True else str(choice)


def compile_model(model: nn.Module, choice: bool | str) -> nn.Module:
    """``model`` wrapped by ``torch.compile`` (shares its parameters; the plain module stays what
    checkpoints save, so their keys carry no ``_orig_mod.`` prefix)."""
    backend = compile_backend(choice)
    if backend is None:
        return model
    try:
        return torch.compile(model, backend=backend)
    except RuntimeError as exc:  # torch._dynamo.exc.InvalidBackend is a RuntimeError
        raise MedplanError(f"--compile: {str(exc).splitlines()[0]}") from None


def conv_flop_share(model: nn.Module, in_channels: int, size: tuple[int, int] | list[int],
                    device: torch.device) -> float | None:
    """Share of a batch-1 evaluation forward's FLOPs done by convolutions; None when they cannot
    be counted. The RNG streams are left as they were (some models draw in every forward)."""
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad(), \
                FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, in_channels, int(size[0]), int(size[1]), device=device))
        counts = counter.get_flop_counts().get("Global", {})
    except Exception:  # noqa: BLE001 - a model the counter cannot follow keeps the default layout
        return None
    finally:
        model.train(was_training)
    total = sum(counts.values())
    conv = sum(v for op, v in counts.items() if "convolution" in str(op))
    return conv / total if total else None


def use_channels_last(settings: TrainSettings, model: nn.Module, in_channels: int, size: tuple[int, int] | list[int],
                      device: torch.device) -> bool:
    """``settings.channels_last`` when set; else on CUDA for networks whose convolutions do at least
    :data:`CHANNELS_LAST_MIN_CONV_SHARE` of the forward FLOPs at the run's input size."""
    if settings.channels_last is not None:
        return settings.channels_last
    if device.type != "cuda":
        return False  # not shown to pay on CPU or MPS: set channels_last=True to try it there
    share = conv_flop_share(model, in_channels, size, device)
    return share is not None and share >= CHANNELS_LAST_MIN_CONV_SHARE


def optimizer_kernels(params: Iterable[torch.Tensor]) -> dict[str, bool]:
    """Adam/AdamW's fastest implementation for these parameters: ``fused`` (one kernel for every
    tensor) when they are all floating-point CUDA tensors, else ``foreach`` (one call per group
    of tensors instead of a Python loop over them)."""
    params = [p for p in params if isinstance(p, torch.Tensor)]
    if params and all(p.is_cuda and p.is_floating_point() for p in params):
        return {"fused": True}
    return {"foreach": True}


def optimizer_kernel_name(optimizer: torch.optim.Optimizer) -> str:
    """``fused``, ``foreach`` or ``for-loop``, as config.json records it."""
    group = optimizer.param_groups[0] if optimizer.param_groups else {}
    return "fused" if group.get("fused") else "foreach" if group.get("foreach") else "for-loop"
