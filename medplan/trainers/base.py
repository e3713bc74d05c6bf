"""The base trainer: the paper's shared protocol, in methods a per-architecture trainer can override.

Protocol (from the plan): AdamW, REX schedule stepped per optimizer step, the plan's batch
size, BCE (binary) or CE (multi-class), mixed precision on GPU (bf16 where supported, else
fp16 with a grad scaler), validation every epoch on the whole validation fold, early
stopping and best checkpoint on validation mIoU. At the end the best weights predict every
validation case at its original size (``validation/CASE.png`` + ``summary.json``).

Hooks, in the spirit of nnU-Net's trainer subclasses (override one, keep the rest):
``build_network``, ``parameter_groups`` / ``configure_optimizers``, ``build_loss``,
``forward_logits`` (internal resolution), ``train_step``, ``validate``, ``on_epoch_start``
(frozen-encoder epochs), ``on_epoch_end``, ``predict_validation_cases``. A subclass lists
what it changes against the shared protocol in ``deviations``; they land in config.json.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import medplan
from medplan.errors import MedplanError
from medplan.io import (atomic_directory, atomic_write_json, atomic_write_png, read_image, read_json, read_label,
                        remove_stale_temporaries)
from medplan.locks import LOCK_NAME, FileLock
from medplan.trainers import distributed as ddp
from medplan.trainers.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from medplan.trainers.losses import build_loss
from medplan.trainers.progress import RunLog, format_epoch_line, plot_progress, progress_bar, write_metrics
from medplan.trainers.schedule import build_scheduler

DEFAULT_SEED = 12345
STAGES = ("cv", "lr_search")
LATEST, BEST, FINAL = "checkpoint_latest.pt", "checkpoint_best.pt", "checkpoint_final.pt"
PLOT_INTERVAL_S = 60.0
RUN_FILES = (LATEST, BEST, FINAL, "metrics.jsonl", "progress.png", "training.log", "config.json")
#: files whose presence means a run was started and got somewhere (never deleted without --force)
RUN_STARTED_FILES = (LATEST, BEST, FINAL, "metrics.jsonl", "config.json")
#: what --continue keeps of a run killed before its first checkpoint (restarted with these settings)
RECORDED_SETTINGS = ("lr", "epochs", "batch_size", "seed", "model_options")


@dataclass
class TrainSettings:
    """One run's settings: the plan's protocol unless a command-line flag overrides it."""

    lr: float | None = None            # None: lr_search.json's best_lr, else plan["lr"]
    epochs: int | None = None          # None: plan["epochs"][stage]
    batch_size: int | None = None      # None: plan["batch_size"] (global batch under DDP)
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
        if mode not in ("max", "min"):
            raise MedplanError(f"early_stopping.mode must be max or min, got {mode!r}", "plans.json")
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode, patience, float(min_delta)
        self.best: float | None = None
        self.best_epoch = 0
        self.bad_epochs = 0
        self.stopped_epoch: int | None = None

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


def lr_tag(lr: float) -> str:
    """``1e-04``, ``5e-05``, ``2.5e-05``: a folder/key name that keeps every digit of the LR."""
    mantissa, exponent = f"{float(lr):.6e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{exponent}"


def _git_commit() -> str | None:
    try:
        root = Path(medplan.__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version(), "medplan": medplan.__version__,
                                       "torch": torch.__version__, "numpy": np.__version__,
                                       "cuda": torch.version.cuda, "cudnn": None}
    if torch.backends.cudnn.is_available():
        versions["cudnn"] = str(torch.backends.cudnn.version())
    try:
        import timm

        versions["timm"] = timm.__version__
    except ImportError:
        versions["timm"] = None
    return versions


class Trainer:
    """The shared protocol. Subclass and override a hook; register with ``@register_trainer(arch)``."""

    #: what this trainer changes against the shared protocol (written to config.json)
    deviations: list[str] = []
    #: run the network at this (H, W) and resize logits back (e.g. a model fixed at 224x224)
    internal_size: tuple[int, int] | None = None
    #: per-class loss weights (None: unweighted, as in the shared protocol)
    class_weights: list[float] | None = None
    #: DDP option for models whose forward skips some parameters
    find_unused_parameters: bool = False

    def __init__(self, dataset: str, arch: str, fold: int | str, *, plan: dict, splits: list[dict],
                 output_dir: Path, settings: TrainSettings, model_options: dict | None = None,
                 lr: float, lr_source: str):
        self.dataset, self.arch, self.fold = dataset, arch, fold
        self.plan, self.splits = plan, splits
        self.output_dir = Path(output_dir)
        self.settings = settings
        self.model_options = dict(model_options or {})
        self.lr, self.lr_source = float(lr), lr_source
        self.epochs = int(settings.epochs or plan["epochs"][settings.stage])
        self.batch_size = int(settings.batch_size or plan["batch_size"])
        self.train_cases, self.val_cases = self.fold_cases()
        self.notes: list[str] = list(self.deviations)
        self.history: list[dict] = []
        self.epoch = 0  # completed epochs
        self.best_metric: float | None = None
        self.best_epoch = 0
        self.training_done = False
        es = plan.get("early_stopping") or {}
        self.early_stopping = EarlyStopping(es.get("monitor", "val_mIoU"), es.get("mode", "max"),
                                            es.get("patience"), es.get("min_delta", 0.0))
        self.ctx = ddp.DistContext()
        self.log: RunLog | None = None

    # ------------------------------------------------------------------ checks
    @classmethod
    def check_architecture(cls, arch: str) -> None:
        """Fail before any folder is made when ``arch`` cannot be built."""
        from medplan.architectures import list_models

        names = list(list_models())
        if arch not in names:
            raise MedplanError(f"unknown architecture {arch!r} (available: {', '.join(names)})")

    def fold_cases(self) -> tuple[list[str], list[str]]:
        if self.fold == "all":
            cases = sorted({c for f in self.splits for c in f["val"]} | {c for f in self.splits for c in f["train"]})
            return cases, []
        split = self.splits[int(self.fold)]
        return list(split["train"]), list(split["val"])

    @property
    def data_dir(self) -> Path:
        from medplan.paths import preprocessed_dir
        from medplan.preprocessing import data_dir

        return data_dir(preprocessed_dir(self.dataset), self.plan["input_size"])

    @property
    def class_names(self) -> list[str]:
        return [name for name, _ in sorted(self.plan["labels"].items(), key=lambda kv: kv[1])]

    def path(self, name: str) -> Path:
        return self.output_dir / name

    def is_complete(self) -> bool:
        if not self.path(FINAL).is_file():
            return False
        return not self.val_cases or (self.output_dir / "validation" / "summary.json").is_file()

    # ------------------------------------------------------------------ hooks
    def build_network(self) -> nn.Module:
        from medplan.architectures import build_model

        options = dict(self.model_options)
        weights = options.get("pretrained")
        if getattr(self, "resuming", False) and (weights is True or (isinstance(weights, str) and Path(weights).is_file())):
            # the checkpoint holds every weight, so the file is not needed again (a folder, as
            # llm4seg's, also defines the architecture and is kept)
            options["pretrained"] = False
        return build_model(self.arch, int(self.plan["channels"]), int(self.plan["num_outputs"]), **options)

    def parameter_groups(self, model: nn.Module) -> list[dict]:
        """Optimizer parameter groups (override for e.g. a lower encoder LR). Frozen parameters
        stay in the groups so that unfreezing them later needs no new optimizer."""
        return [{"params": list(model.parameters())}]

    def configure_optimizers(self, model: nn.Module) -> torch.optim.Optimizer:
        cfg = self.plan.get("optimizer") or {}
        name = str(cfg.get("name", "AdamW"))
        groups = self.parameter_groups(model)
        kwargs = dict(lr=self.lr, weight_decay=float(cfg.get("weight_decay", 0.01)),
                      betas=tuple(cfg.get("betas", (0.9, 0.999))))
        if name.lower() == "adamw":
            return torch.optim.AdamW(groups, **kwargs)
        if name.lower() == "adam":
            return torch.optim.Adam(groups, **kwargs)
        raise MedplanError(f"unknown optimizer {name!r} (AdamW or Adam)", "plans.json")

    def build_loss(self) -> nn.Module:
        return build_loss(self.plan, self.class_weights)

    def forward_logits(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Logits at the input size; resizes to and from ``internal_size`` when a model needs it."""
        if self.internal_size is None or tuple(images.shape[-2:]) == tuple(self.internal_size):
            return model(images)
        size = images.shape[-2:]
        small = F.interpolate(images, size=self.internal_size, mode="bilinear", align_corners=False)
        return F.interpolate(model(small), size=size, mode="bilinear", align_corners=False)

    def compute_loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        return self.loss_fn(logits, batch["seg"])

    def train_step(self, batch: dict) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            logits = self.forward_logits(self.model, batch["image"])
            loss = self.compute_loss(logits, batch)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.detach()

    def on_epoch_start(self, epoch: int) -> None:
        """Called before epoch ``epoch`` (1-based); e.g. freeze or unfreeze an encoder here.

        Under DDP, parameters frozen when the model is wrapped are never synchronised later:
        freeze by setting that parameter group's LR to 0 instead, or set
        ``find_unused_parameters = True``."""

    def on_epoch_end(self, record: dict) -> None:
        """Called with the epoch's metrics record before it is written."""

    # ------------------------------------------------------------------ setup
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _setup(self) -> None:
        s = self.settings
        self.device = resolve_device(s.device, self.ctx.local_rank)
        if s.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.amp_dtype = None
        use_scaler = False
        if s.amp and self.device.type == "cuda":
            if torch.cuda.is_bf16_supported():
                self.amp_dtype = torch.bfloat16
            else:
                self.amp_dtype, use_scaler = torch.float16, True
        self.scaler = torch.amp.GradScaler(self.device.type if use_scaler else "cpu", enabled=use_scaler)
        if self.ctx.enabled and self.batch_size % self.ctx.world_size:
            raise MedplanError(f"batch size {self.batch_size} is not divisible by {self.ctx.world_size} processes")
        self.rank_batch_size = self.batch_size // self.ctx.world_size

        seed_everything(s.seed)  # same initial weights on every rank
        net = self.build_network().to(self.device)
        from medplan.architectures import count_parameters

        self.param_counts = dict(count_parameters(net))
        self.pretrained_report = getattr(net, "pretrained_report", None)  # what the weights file gave, for config.json
        self.model, notes = ddp.wrap_model(net, self.ctx, self.device,
                                           find_unused_parameters=self.find_unused_parameters)
        self.notes += notes
        self.optimizer = self.configure_optimizers(ddp.unwrap(self.model))
        self.loss_fn = self.build_loss().to(self.device)
        self._loader = None
        self._loader_epoch: int | None = None
        self.steps_per_epoch = ddp.min_across_ranks(self.ctx, len(self._train_loader(1)), self.device)
        if self.steps_per_epoch < 1:
            raise MedplanError(f"fold {self.fold} has {len(self.train_cases)} training case(s), fewer than one "
                               f"batch of {self.batch_size}; lower --batch-size")
        self.scheduler = build_scheduler(self.optimizer, self.plan.get("lr_schedule"),
                                         self.epochs * self.steps_per_epoch)
        seed_everything(s.seed + 1000 * self.ctx.rank)  # per-rank augmentation streams

    def _train_loader(self, epoch: int):
        """The loader for ``epoch``: one for the whole run, or under DDP a new one per epoch
        holding this rank's share of that epoch's shuffled cases."""
        from medplan.data import TrainLoader

        if self._loader is not None and (not self.ctx.enabled or self._loader_epoch == epoch):
            return self._loader
        if self._loader is not None:
            self._loader.close()
        cases = ddp.shard_cases(self.train_cases, self.ctx.rank, self.ctx.world_size, seed=self.settings.seed,
                                epoch=epoch)
        kwargs = {} if self.settings.num_workers is None else {"num_workers": self.settings.num_workers}
        self._loader = TrainLoader(self.data_dir, cases, self.plan, batch_size=self.rank_batch_size,
                                   seed=self.settings.seed + 1000 * self.ctx.rank, device=self.device, **kwargs)
        self._loader_epoch = epoch
        return self._loader

    # ------------------------------------------------------------------ state
    def _model_state(self) -> dict:
        return ddp.unwrap(self.model).state_dict()

    def checkpoint_state(self, full: bool) -> dict:
        state = {
            "trainer": type(self).__qualname__, "arch": self.arch, "dataset": self.dataset, "fold": self.fold,
            "epoch": self.epoch, "epochs": self.epochs, "model": self._model_state(),
            "model_options": self.model_options, "plan": self.plan, "settings": dataclasses.asdict(self.settings),
            "lr": self.lr, "batch_size": self.batch_size, "best_metric": self.best_metric, "best_epoch": self.best_epoch,
            "training_done": self.training_done,
        }
        if full:
            state.update(optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                         scaler=self.scaler.state_dict(), early_stopping=self.early_stopping.state_dict(),
                         history=self.history, world_size=self.ctx.world_size,
                         rng=ddp.gather_objects(self.ctx, capture_rng_state()))
        return state

    def save(self, name: str, full: bool) -> None:
        state = self.checkpoint_state(full)  # collective (RNG gather): every rank calls it
        if self.ctx.is_main:
            save_checkpoint(self.path(name), state)

    def restore(self, state: dict) -> None:
        ddp.unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.early_stopping.load_state_dict(state["early_stopping"])
        self.history = list(state["history"])
        self.epoch = int(state["epoch"])
        self.best_metric, self.best_epoch = state["best_metric"], state["best_epoch"]
        self.training_done = bool(state["training_done"])
        rngs = state["rng"]
        if len(rngs) == self.ctx.world_size:
            restore_rng_state(rngs[self.ctx.rank])
        else:
            self.log.warning(f"checkpoint was written by {len(rngs)} process(es), this run has "
                             f"{self.ctx.world_size}: random streams differ from an uninterrupted run")
            restore_rng_state(rngs[0])

    # ------------------------------------------------------------------ run
    def run(self, continue_training: bool = False) -> Path:
        """Train (or resume), then predict the validation fold; returns the fold folder.

        Rank 0 holds the fold's lock (``fold_K/.lock``, :mod:`medplan.locks`) from before it
        reads or deletes anything of the folder until the run ends, so a second run of the
        fold (``--force`` included) is refused at once. A start that fails before its first
        epoch ends removes what it wrote (and the folders it created)."""
        self._lock: FileLock | None = None
        self._start_written: set[str] | None = None  # names that existed when this start began writing
        failed = False
        try:
            return self._run(continue_training)
        except KeyboardInterrupt:
            if self.log is not None:
                self.log.info(f"interrupted after epoch {self.epoch}; resume with --continue")
            raise
        except Exception:
            failed = True
            raise
        finally:
            if getattr(self, "_loader", None) is not None:
                self._loader.close()
            if self.log is not None:
                self.log.close()
            undone = failed and self._undo_failed_start()
            if self._lock is not None:
                self._lock.release()
                self._lock = None
            if undone:
                with contextlib.suppress(OSError):
                    self.output_dir.rmdir()  # only if nothing else is left in it
            # the process group stays up for the next run of this process (LR search); the
            # command-line entry point tears it down (distributed.cleanup)

    def _acquire_lock(self) -> None:
        """Take the fold's lock (creating the folder if needed), then remove the temporaries
        that a killed run left in it."""
        purpose = f"train {self.dataset}/{self.arch}/fold_{self.fold}"
        if self.settings.stage != "cv":
            purpose += f" ({self.settings.stage}, lr {self.lr:g})"
        self._lock = FileLock(self.path(LOCK_NAME), purpose).acquire()
        try:
            removed = remove_stale_temporaries(self.output_dir, recursive=True)
        except OSError as exc:
            raise MedplanError(f"cannot remove the temporary files of an interrupted run "
                               f"({exc.strerror or exc})", exc.filename or self.output_dir) from None
        if removed:
            print(f"{self.output_dir}: removed {len(removed)} temporary file(s) left by an interrupted run",
                  file=sys.stderr)

    def _decide(self, continue_training: bool) -> tuple:
        """Fresh start, resume, restart with recorded settings or nothing to do (decided on
        rank 0 while it holds the fold's lock, shared with every rank).

        An interrupted run is never deleted without ``--force``: without ``--continue`` it is
        an error that says how to resume it or start over."""
        force = self.settings.force
        if self.is_complete():
            if continue_training and not force:
                return ("complete",)
            if not force:
                raise MedplanError("holds a finished run; use --continue to keep it or --force to train it again",
                                   self.output_dir)
        if continue_training and not force:
            if self.path(LATEST).is_file():
                return ("resume",)
            if self.path("config.json").is_file():
                return ("restart", self._recorded_settings())
        elif not force and any(self.path(n).exists() for n in RUN_STARTED_FILES):
            raise MedplanError(f"holds an interrupted run ({self._interrupted_at()}); resume with --continue "
                               "or start over with --force", self.output_dir)
        return ("fresh", any(self.path(n).exists() for n in RUN_FILES) or (self.output_dir / "validation").exists())

    def _interrupted_at(self) -> str:
        """``epoch k/N`` of the run in the folder, for messages."""
        done: int | str = 0
        total = None
        if self.path(LATEST).is_file():
            try:
                state = load_checkpoint(self.path(LATEST), map_location="cpu")
                done, total = int(state["epoch"]), int(state["epochs"])
            except (MedplanError, KeyError, TypeError, ValueError):
                done = "?"
        if total is None and self.path("config.json").is_file():
            with contextlib.suppress(MedplanError, AttributeError):
                total = read_json(self.path("config.json")).get("epochs")
        return f"epoch {done}/{total if isinstance(total, int) else self.epochs}"

    def _recorded_settings(self) -> dict:
        """The settings config.json recorded when the run started (checked: anyone may edit it)."""
        path = self.path("config.json")
        cfg = read_json(path)
        again = "; start over with --force"
        if not isinstance(cfg, dict):
            raise MedplanError(f"not a run's config.json (expected a JSON object){again}", path)
        for key, mine in (("dataset", self.dataset), ("arch", self.arch), ("fold", self.fold)):
            if key in cfg and str(cfg[key]) != str(mine):
                raise MedplanError(f"records {key} {cfg[key]!r}, not {mine!r}{again}", path)
        checks = {"lr": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf"),
                  "epochs": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                  "batch_size": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                  "seed": lambda v: isinstance(v, int) and not isinstance(v, bool),
                  "model_options": lambda v: isinstance(v, dict)}
        recorded = {}
        for key in RECORDED_SETTINGS:
            if key not in cfg or not checks[key](cfg[key]):
                raise MedplanError(f"{key} is {cfg.get(key)!r}, not a valid setting{again}", path)
            recorded[key] = cfg[key]
        recorded["lr_source"] = str(cfg.get("lr_source", "config.json"))
        return recorded

    def _keep_run_settings(self, stored: dict) -> None:
        """A resumed or restarted run keeps the budget, LR, batch size, seed and model options
        it started with (a different request is a warning, not a new run)."""
        kept = {"epochs": (self.epochs, int(stored["epochs"])), "lr": (self.lr, float(stored["lr"])),
                "seed": (self.settings.seed, int(stored["seed"])),
                "batch_size": (self.batch_size, int(stored["batch_size"]))}
        for key, (asked, value) in kept.items():
            if asked != value:
                self.log.warning(f"--continue keeps the run's {key} {value:g} (not {asked:g})")
        self.epochs, self.lr, self.settings.seed, self.batch_size = (v[1] for v in kept.values())
        options = stored.get("model_options")
        if isinstance(options, dict):
            def canonical(o: dict) -> str:
                return json.dumps(o, sort_keys=True, default=str)

            if canonical(options) != canonical(self.model_options):
                self.log.warning(f"--continue keeps the run's model options {canonical(options)} "
                                 f"(not {canonical(self.model_options)})")
            self.model_options = dict(options)

    def _clear_folder(self, keep: tuple[str, ...] = ()) -> None:
        for name in RUN_FILES:
            if name not in keep and self.path(name).exists():
                self.path(name).unlink()
        shutil.rmtree(self.output_dir / "validation", ignore_errors=True)

    def _start_writing(self, decision: tuple) -> None:
        """Rank 0, once the run is set up: clear what the decision replaces, then start the
        run's files. Nothing of an earlier run is deleted before the new one could be built."""
        if decision[0] == "restart":
            self._clear_folder(keep=("training.log",))
        elif decision[1]:
            print(f"{self.output_dir}: removing the files of an earlier run and starting fresh", file=sys.stderr)
            self._clear_folder()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._start_written = {n for n in (*RUN_FILES, "validation") if self.path(n).exists()}
        self.log.attach(self.path("training.log"))
        self._write_config()

    def _undo_failed_start(self) -> bool:
        """After a failure before the first epoch ended: remove the files this start wrote, so
        that no half-made run is left for a report to count. True if it removed anything."""
        if self._start_written is None or self.epoch > 0 or not self.ctx.is_main:
            return False
        for name in RUN_FILES:
            if name not in self._start_written:
                with contextlib.suppress(OSError):  # never hide the error that ended the run
                    self.path(name).unlink()
        if "validation" not in self._start_written:
            shutil.rmtree(self.output_dir / "validation", ignore_errors=True)
        return True

    def _run(self, continue_training: bool) -> Path:
        self.ctx = ddp.init_distributed(resolve_device(self.settings.device).type)
        decision: tuple = ("error", "")
        if self.ctx.is_main:  # under DDP only rank 0 locks, reads and writes the folder
            try:
                self._acquire_lock()
                decision = self._decide(continue_training)
            except MedplanError as exc:
                decision = ("error", str(exc))
        decision = ddp.broadcast_object(self.ctx, decision)
        if decision[0] == "error":
            raise MedplanError(decision[1])
        if decision[0] == "complete":
            if self.ctx.is_main:
                print(f"{self.output_dir}: run is already complete (checkpoint_final.pt, validation/summary.json); "
                      "nothing to do")
            return self.output_dir
        if decision[0] == "resume":
            self.log = RunLog(self.path("training.log") if self.ctx.is_main else None, console=self.ctx.is_main)
            resume = load_checkpoint(self.path(LATEST), map_location="cpu")
            self._adopt_run_settings(resume)
            self.resuming = True
            self._setup()
            self.restore(resume)
            self.log.info(f"resumed from {LATEST} after epoch {self.epoch}/{self.epochs}")
            self._update_config_on_resume()
            if self.ctx.is_main:
                write_metrics(self.history, self.path("metrics.jsonl"))  # drop epochs newer than the checkpoint
        else:
            # messages wait in memory until the folder is this run's (training.log of an earlier run
            # is only replaced once the new run could be built)
            self.log = RunLog(None, console=self.ctx.is_main, buffer=self.ctx.is_main)
            self.resuming = False
            if decision[0] == "restart":
                self._keep_run_settings(decision[1])
                self.lr_source = decision[1]["lr_source"]
                self.log.warning(f"--continue: no {LATEST} yet; restarting the run from scratch with the settings "
                                 f"its config.json recorded (lr {self.lr:g}, epochs {self.epochs}, batch "
                                 f"{self.batch_size}, seed {self.settings.seed})")
            elif continue_training and not self.settings.force:
                self.log.warning(f"--continue: no {LATEST} yet, starting from scratch")
            self._setup()
            if self.ctx.is_main:
                self._start_writing(decision)
        self.log.info(self._header())
        if not self.training_done:
            self.train_loop()
        self.finish()
        return self.output_dir

    def _adopt_run_settings(self, state: dict) -> None:
        """A resumed run keeps the budget, LR, batch size, seed and model options it started with."""
        if state.get("arch") != self.arch or str(state.get("fold")) != str(self.fold):
            raise MedplanError(f"checkpoint is for {state.get('arch')} fold {state.get('fold')}, not "
                               f"{self.arch} fold {self.fold}", self.path(LATEST))
        saved = state.get("settings", {})
        self._keep_run_settings({"epochs": state["epochs"], "lr": state["lr"],
                                 "seed": saved.get("seed", self.settings.seed),
                                 "batch_size": state.get("batch_size", self.batch_size),
                                 "model_options": state.get("model_options")})
        if state.get("world_size", 1) != ddp.env_world_size():
            self.log.warning(f"resuming a {state.get('world_size', 1)}-process run with {ddp.env_world_size()}")

    def _header(self) -> str:
        amp = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16 + grad scaler"}[self.amp_dtype]
        return (f"{type(self).__name__}: {self.dataset} / {self.arch} / fold {self.fold} ({self.settings.stage}): "
                f"{len(self.train_cases)} train, {len(self.val_cases)} val cases; {self.epochs} epochs x "
                f"{self.steps_per_epoch} steps, batch {self.batch_size}, lr {self.lr:g} ({self.lr_source}), "
                f"device {self.device}, amp {amp}, processes {self.ctx.world_size}, seed {self.settings.seed}")

    def config(self) -> dict:
        return {
            "dataset": self.dataset, "arch": self.arch, "fold": self.fold, "stage": self.settings.stage,
            "trainer": f"{type(self).__module__}.{type(self).__qualname__}",
            "created": _dt.datetime.now().isoformat(timespec="seconds"),
            "command_line": list(sys.argv),
            "settings": dataclasses.asdict(self.settings),
            "lr": self.lr, "lr_source": self.lr_source, "epochs": self.epochs, "batch_size": self.batch_size,
            "steps_per_epoch": self.steps_per_epoch, "seed": self.settings.seed,
            "deterministic": self.settings.deterministic,
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else platform.processor() or platform.machine(),
            "amp": None if self.amp_dtype is None else str(self.amp_dtype).replace("torch.", ""),
            "world_size": self.ctx.world_size,
            "schedule": {"name": (self.plan.get("lr_schedule") or {}).get("name", "rex"), "stepped": "per optimizer step",
                         "total_steps": self.epochs * self.steps_per_epoch},
            "loss": self.plan["loss"], "class_weights": self.class_weights, "internal_size": self.internal_size,
            "model_options": self.model_options, "parameters": self.param_counts,
            "pretrained": self.model_options.get("pretrained", False), "pretrained_report": self.pretrained_report,
            "n_train": len(self.train_cases), "n_val": len(self.val_cases),
            "train_cases": self.train_cases, "val_cases": self.val_cases,
            "deviations": self.notes,
            "versions": _versions(), "hostname": socket.gethostname(), "git_commit": _git_commit(),
            "plan": self.plan,
        }

    def _write_config(self) -> None:
        if self.ctx.is_main:
            atomic_write_json(self.path("config.json"), self.config())

    def _update_config_on_resume(self) -> None:
        if not self.ctx.is_main:
            return
        path = self.path("config.json")
        cfg = read_json(path) if path.is_file() else self.config()
        cfg.setdefault("resumes", []).append({"time": _dt.datetime.now().isoformat(timespec="seconds"),
                                              "after_epoch": self.epoch, "command_line": list(sys.argv),
                                              "device": str(self.device), "world_size": self.ctx.world_size})
        atomic_write_json(path, cfg)

    # ------------------------------------------------------------------ loop
    def train_loop(self) -> None:
        stop = False
        self._last_plot = -float("inf")
        while self.epoch < self.epochs and not stop:
            epoch = self.epoch + 1
            t0 = time.perf_counter()
            self.on_epoch_start(epoch)
            train_loss = self.train_epoch(epoch)
            val = self.validate()
            self.epoch = epoch
            record = {"epoch": epoch, "train_loss": train_loss,
                      "val_loss": None if val is None else val["loss"],
                      "val_mIoU": None if val is None else val["mIoU"],
                      "val_mDSC": None if val is None else val["mDSC"],
                      "lr": self._epoch_lr,
                      "epoch_time": time.perf_counter() - t0,
                      "timestamp": _dt.datetime.now().isoformat(timespec="seconds")}
            improved = val is not None and (self.best_metric is None or val["mIoU"] > self.best_metric)
            if improved:
                self.best_metric, self.best_epoch = val["mIoU"], epoch
            record["best"] = improved
            if val is not None:
                stop = self.early_stopping.step(val[self.early_stopping.monitor.replace("val_", "")], epoch)
            self.on_epoch_end(record)
            self.history.append(record)
            if stop or epoch >= self.epochs:
                self.training_done = True
            if improved:
                self.save(BEST, full=False)
            if self.ctx.is_main:
                write_metrics(self.history, self.path("metrics.jsonl"))
                # the plot costs ~0.3 s: redrawn at most every PLOT_INTERVAL_S, always at the end
                now = time.monotonic()
                if self.training_done or now - self._last_plot >= PLOT_INTERVAL_S:
                    plot_progress(self.history, self.path("progress.png"))
                    self._last_plot = now
            if self.training_done or epoch % self.settings.checkpoint_every == 0:
                self.save(LATEST, full=True)
            self.log.info(format_epoch_line(record, self.epochs))
            if stop:
                self.log.info(f"early stopping: no {self.early_stopping.monitor} improvement > "
                              f"{self.early_stopping.min_delta:g} for {self.early_stopping.bad_epochs} epochs "
                              f"(best {self.early_stopping.best:.4f} at epoch {self.early_stopping.best_epoch})")

    def train_epoch(self, epoch: int) -> float:
        self.model.train()
        loader = self._train_loader(epoch)
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        self._epoch_lr = self.optimizer.param_groups[0]["lr"]  # LR at the epoch's first step
        total = torch.zeros((), device=self.device)
        steps = 0
        show = self.ctx.is_main and self.settings.progress is not False
        batches = progress_bar(loader, total=self.steps_per_epoch, desc=f"epoch {epoch}/{self.epochs}",
                               enabled=None if self.settings.progress is None else self.settings.progress) if show else loader
        for batch in batches:
            if steps >= self.steps_per_epoch:
                break
            total += self.train_step(batch).float()
            steps += 1
        if steps == 0:
            raise MedplanError(f"the training loader yielded no batch in epoch {epoch}")
        return ddp.mean_across_ranks(self.ctx, float(total.item()) / steps, self.device)

    @torch.no_grad()
    def _predict(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.forward_logits(model, images).float()

    def _validation_batches(self) -> Iterable[dict]:
        from medplan.data import iterate_validation

        return iterate_validation(self.data_dir, self.val_cases, self.plan,
                                  batch_size=self.settings.val_batch_size or self.batch_size, device=self.device)

    def validate(self) -> dict | None:
        """Loss and metrics on the whole validation fold at the planned size (rank 0 computes,
        every rank receives the same numbers)."""
        if not self.val_cases:
            return None
        result = None
        if self.ctx.is_main:
            from medplan.evaluation.metrics import MetricAccumulator, logits_to_labels

            model = ddp.unwrap(self.model)
            model.eval()
            acc = MetricAccumulator(int(self.plan["num_classes"]))
            loss_sum, n = 0.0, 0
            for batch in self._validation_batches():
                logits = self._predict(model, batch["image"])
                loss_sum += float(self.compute_loss(logits, batch)) * logits.shape[0]
                n += logits.shape[0]
                acc.add(logits_to_labels(logits, self.plan["loss"]), batch["seg"], list(batch["case_ids"]))
            metrics = acc.result(self.class_names)
            result = {"loss": loss_sum / max(n, 1), "mIoU": float(metrics["mIoU"]), "mDSC": float(metrics["mDSC"])}
            model.train()
        return ddp.broadcast_object(self.ctx, result)

    # ------------------------------------------------------------------ end of run
    def finish(self) -> None:
        """checkpoint_final.pt (last epoch's weights), then the best weights predict the validation fold."""
        state = self.checkpoint_state(full=False)
        if self.ctx.enabled:
            in_sync = ddp.parameters_in_sync(self.ctx, self.model)
            self.log.info(f"{self.ctx.world_size} processes hold identical weights: {in_sync}")
            state["ddp"] = {"world_size": self.ctx.world_size, "ranks_in_sync": in_sync}
        if self.ctx.is_main:
            if not self.val_cases:  # fold "all": nothing to select on, best = final
                save_checkpoint(self.path(BEST), state)
            save_checkpoint(self.path(FINAL), state)
        ddp.barrier(self.ctx)
        if self.ctx.is_main and self.val_cases:
            best = load_checkpoint(self.path(BEST), map_location=self.device)
            ddp.unwrap(self.model).load_state_dict(best["model"])
            summary = self.predict_validation_cases()
            self.log.info(f"validation with the best weights (epoch {self.best_epoch}) at original size: "
                          f"mIoU {summary['mIoU']:.4f}  mDSC {summary['mDSC']:.4f}  "
                          f"(at input size: mIoU {summary['at_input_size']['mIoU']:.4f})")
        ddp.barrier(self.ctx)
        self.log.info(f"done: {self.output_dir}")

    def raw_label_path(self, case_id: str) -> Path:
        from medplan.pipeline import raw_dir_of

        return raw_dir_of(self.plan) / "labels" / f"{case_id}.png"

    def predict_validation_cases(self) -> dict:
        """Write ``validation/CASE.png`` at each case's original size and ``validation/summary.json``
        (metrics against the raw labels at original size; ``at_input_size`` as the paper reported)."""
        from medplan.evaluation.metrics import MetricAccumulator, logits_to_labels, logits_to_probs, summary_dict
        from medplan.preprocessing import load_case

        label_paths = {c: self.raw_label_path(c) for c in self.val_cases}
        missing = [p for p in label_paths.values() if not p.is_file()]
        if missing:
            raise MedplanError(f"raw label missing ({len(missing)} of {len(label_paths)} validation cases); "
                               "restore the raw dataset, then rerun with --continue", missing[0])
        model = ddp.unwrap(self.model)
        model.eval()
        k = int(self.plan["num_classes"])
        at_original, at_input = MetricAccumulator(k), MetricAccumulator(k)
        loss = self.plan["loss"]
        with atomic_directory(self.output_dir / "validation") as tmp:
            batches = progress_bar(self._validation_batches(), total=-(-len(self.val_cases) // (self.settings.val_batch_size or self.batch_size)),
                                   desc="predicting validation cases", enabled=self.settings.progress)
            for batch in batches:
                logits = self._predict(model, batch["image"])
                at_input.add(logits_to_labels(logits, loss), batch["seg"], list(batch["case_ids"]))
                probs = logits_to_probs(logits, loss)  # (B, K, h, w); [1 - p, p] for bce
                for i, case_id in enumerate(batch["case_ids"]):
                    size = [int(v) for v in load_case(self.data_dir, case_id)[2]["original_size"]]
                    # bilinear on probabilities at the original size, then the most probable class
                    # (for bce: p > 0.5, the same rule as logits_to_labels)
                    up = F.interpolate(probs[i:i + 1], size=size, mode="bilinear", align_corners=False)
                    pred = up[0].argmax(dim=0).to(torch.uint8).cpu().numpy()
                    gt = read_label(label_paths[case_id])
                    if gt.shape != pred.shape:
                        raise MedplanError(f"raw label is {list(gt.shape)}, the case's original size is {size}",
                                           label_paths[case_id])
                    atomic_write_png(tmp / f"{case_id}.png", pred)
                    at_original.add(pred, gt, case_id)
            summary = summary_dict(at_original, self.class_names)
            summary["at_input_size"] = at_input.result(self.class_names)
            summary.update(evaluated_at="original_size", checkpoint=BEST, best_epoch=self.best_epoch,
                           dataset=self.dataset, arch=self.arch, fold=self.fold)
            atomic_write_json(tmp / "summary.json", summary)
        model.train()
        return summary
