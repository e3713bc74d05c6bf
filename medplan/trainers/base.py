"""The base trainer: the paper's shared protocol, in hooks a per-architecture trainer can override.

Protocol (from the plan): AdamW (fused kernel on CUDA, foreach elsewhere), REX schedule
stepped per optimizer step, the plan's batch size, BCE (binary) or CE (multi-class), mixed
precision on GPU (bf16 where supported, else fp16 with a grad scaler), validation every epoch
on the whole validation fold, early stopping and best checkpoint on validation mIoU. At the
end the best weights predict every validation case at its original size
(``validation/CASE.png`` + ``summary.json``). ``--compile`` runs the training forward through
``torch.compile``; validation, prediction and checkpoints use the plain module.

Hooks, in the spirit of nnU-Net's trainer subclasses (override one, keep the rest):
``build_network``, ``parameter_groups`` / ``configure_optimizers``, ``build_loss``,
``forward_logits`` (internal resolution), ``forward_batch`` (the whole batch: prompts from
labels and other per-model extras), ``train_step``, ``validate``, ``on_epoch_start``
(frozen-encoder epochs), ``on_epoch_end``, ``predict_validation_cases``. A subclass lists
what it changes against the shared protocol in ``deviations``; they land in config.json.

The rest of a run is in parts the trainer holds: its folder (:class:`medplan.rundir.RunDir`),
its :class:`~medplan.trainers.checkpointer.Checkpointer`, the
:class:`~medplan.trainers.loop.EpochLoop` and its :class:`~medplan.trainers.loop.LoopState`,
and the :class:`~medplan.trainers.session.RunSession` that locks the folder, decides between
a fresh start, a resume and nothing to do, and cleans up a failed start.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import medplan.trainers.distributed as ddp
from medplan.architectures import (build_model, count_parameters, list_models, model_card, model_deviations,
                                   model_internal_size, model_parameter_groups)
from medplan.errors import MedplanError
from medplan.paths import preprocessed_dir
from medplan.plan import Plan
from medplan.preprocessing import data_dir
from medplan.rundir import BEST, FINAL, LATEST, RunDir, lr_tag
from medplan.stagefiles import raw_dir_of
from medplan.trainers.checkpointer import Checkpointer
from medplan.trainers.loop import EpochLoop, LoopState
from medplan.trainers.losses import build_loss
from medplan.trainers.progress import RunLog
from medplan.trainers.schedule import build_scheduler
from medplan.trainers.session import RunSession
from medplan.trainers.settings import (DEFAULT_SEED, STAGES, EarlyStopping, TrainSettings, compile_model,
                                       configure_backends, mixed_precision, optimizer_kernels, resolve_device,
                                       seed_everything, use_channels_last)
from medplan.trainers.validation import validation_metrics, write_validation_predictions

__all__ = ["Trainer", "TrainSettings", "EarlyStopping", "DEFAULT_SEED", "STAGES", "LATEST", "BEST", "FINAL",
           "lr_tag", "resolve_device", "seed_everything"]


class Trainer:
    """The shared protocol. Subclass and override a hook; register with ``@register_trainer(arch)``."""

    #: what this trainer changes against the shared protocol (written to config.json)
    deviations: list[str] = []
    #: run the network at this (H, W) and resize logits back; None: the model card's (e.g. 224x224
    #: for HiFormer and MISSFormer, taken over by build_network and recorded in config.json)
    internal_size: tuple[int, int] | None = None
    #: per-class loss weights (None: unweighted, as in the shared protocol)
    class_weights: list[float] | None = None
    #: DDP option for models whose forward skips some parameters
    find_unused_parameters: bool = False

    def __init__(self, dataset: str, arch: str, fold: int | str, *, plan: Plan, splits: list[dict] | None,
                 output_dir: Path, settings: TrainSettings, model_options: dict | None = None,
                 lr: float, lr_source: str):
        # the run: what it trains, on which cases, with which settings (``splits=None``: no cases)
        self.dataset, self.arch, self.fold = dataset, arch, fold
        self.plan, self.splits = plan, splits
        self.run_dir = RunDir(output_dir)  # the fold folder: layout, state, record, lock
        self.settings = settings
        self.model_options = dict(model_options or {})
        self.lr, self.lr_source = float(lr), lr_source
        self.epochs = int(settings.epochs or plan.epochs.for_stage(settings.stage))
        self.batch_size = int(settings.batch_size or plan.batch_size)
        self.train_cases, self.val_cases = self.fold_cases()
        self.notes: list[str] = list(self.deviations)
        # its parts
        self.state = LoopState(EarlyStopping.from_plan(plan))
        self.checkpointer = Checkpointer(self.run_dir)
        self.loop = EpochLoop(self)
        self.ctx = ddp.DistContext()
        self.log: RunLog | None = None
        self.resuming = False  # the session sets it before setup(): a checkpoint will replace the weights
        # made by setup()
        self.device: torch.device | None = None
        self.amp_dtype: torch.dtype | None = None
        self.scaler: torch.amp.GradScaler | None = None
        self.rank_batch_size = self.batch_size
        self.model: nn.Module | None = None
        self.compiled: nn.Module | None = None  # torch.compile's wrapper of model, called by train_step (--compile)
        self.channels_last = False
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.loss_fn: nn.Module | None = None
        self.steps_per_epoch = 0
        self.param_counts: dict[str, int] = {}
        self.pretrained_report: dict | None = None  # what the weights file gave, for config.json

    @classmethod
    def for_prediction(cls, run_dir: str | Path, *, arch: str, plan: Plan, model_options: dict | None = None,
                       dataset: str = "", fold: int | str = "all", lr: float | None = None) -> "Trainer":
        """This trainer for a trained model outside a run (predict, explain): built through
        ``__init__`` like a run's, so every hook sees every attribute, but with no cases, and
        it locks, reads and writes nothing. ``build_network`` and ``forward_logits`` are what
        it is for."""
        return cls(dataset, arch, fold, plan=plan, splits=None, output_dir=Path(run_dir),
                   settings=TrainSettings(epochs=1, batch_size=1), model_options=model_options,
                   lr=float(lr or 0.0), lr_source="checkpoint")

    # ------------------------------------------------------------------ checks
    @classmethod
    def check_architecture(cls, arch: str) -> None:
        """Fail before any folder is made when ``arch`` cannot be built."""
        names = list(list_models())
        if arch not in names:
            raise MedplanError(f"unknown architecture {arch!r} (available: {', '.join(names)})")

    def fold_cases(self) -> tuple[list[str], list[str]]:
        if self.splits is None:
            return [], []
        if self.fold == "all":
            cases = sorted({c for f in self.splits for c in f["val"]} | {c for f in self.splits for c in f["train"]})
            return cases, []
        split = self.splits[int(self.fold)]
        return list(split["train"]), list(split["val"])

    @property
    def data_dir(self) -> Path:
        return data_dir(preprocessed_dir(self.dataset), self.plan.input_size)

    @property
    def class_names(self) -> list[str]:
        return self.plan.class_names

    # ------------------------------------------------------------------ hooks
    def build_network(self) -> nn.Module:
        """The network, built through its model card (weights, input contract); the card's
        deviations, fixed internal size and DDP needs become the run's (config.json)."""
        for note in model_deviations(self.arch, self.model_options, self.plan.input_size):
            if note not in self.notes:
                self.notes.append(note)
        if self.internal_size is None:  # a trainer's own internal size wins
            self.internal_size = model_internal_size(self.arch, self.model_options)
        if model_card(self.arch).find_unused_parameters:
            self.find_unused_parameters = True
        options = dict(self.model_options)
        weights = options.get("pretrained")
        if self.resuming and (weights is True or (isinstance(weights, str) and Path(weights).is_file())):
            # the checkpoint holds every weight, so the file is not needed again (a folder, as
            # llm4seg's, also defines the architecture and is kept)
            options["pretrained"] = False
        return build_model(self.arch, self.plan.channels, self.plan.num_outputs, **options)

    def parameter_groups(self, model: nn.Module) -> list[dict]:
        """Optimizer parameter groups as the model card declares them (no-weight-decay names, head
        LR factor, layer-wise LR decay; one group of everything without). Frozen parameters stay in
        the groups so that unfreezing them later needs no new optimizer."""
        return model_parameter_groups(self.arch, model, self.lr)

    def optimizer_options(self) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
        """The optimizer class and its settings besides parameters, LR and kernel: a trainer that
        follows its authors' recipe changes them here and keeps the fused/foreach kernel."""
        cfg = self.plan.optimizer  # its name is AdamW or Adam (any case), checked with the plan
        optimizer = torch.optim.Adam if cfg.name.lower() == "adam" else torch.optim.AdamW
        return optimizer, {"weight_decay": float(cfg.weight_decay), "betas": tuple(cfg.betas)}

    def configure_optimizers(self, model: nn.Module) -> torch.optim.Optimizer:
        optimizer, options = self.optimizer_options()
        groups = self.parameter_groups(model)
        return optimizer(groups, lr=self.lr, **options, **optimizer_kernels(p for g in groups for p in g["params"]))

    def build_loss(self) -> nn.Module:
        return build_loss(self.plan, self.class_weights)

    def forward_logits(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Logits at the input size; resizes to and from ``internal_size`` when a model needs it (a
        card's internal size is also the built model's own input contract: inputs already at that
        size pass through it untouched, so the two never resize twice)."""
        if self.internal_size is None or tuple(images.shape[-2:]) == tuple(self.internal_size):
            return model(images)
        size = images.shape[-2:]
        small = F.interpolate(images, size=self.internal_size, mode="bilinear", align_corners=False)
        return F.interpolate(model(small), size=size, mode="bilinear", align_corners=False)

    def forward_batch(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """Logits of a whole batch (``image``, ``seg``, ``case_ids``) in training, validation
        and the final prediction: override to give the network more than the images (e.g.
        prompts made from the labels while ``model.training``). Default: :meth:`forward_logits`."""
        return self.forward_logits(model, batch["image"])

    def compute_loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        return self.loss_fn(logits, batch["seg"])

    def train_step(self, batch: dict) -> torch.Tensor:
        """One optimizer step; the forward runs compiled under ``--compile`` (validation and the
        final prediction run the same weights eagerly)."""
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            logits = self.forward_batch(self.model if self.compiled is None else self.compiled, batch)
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

    def validate(self) -> dict | None:
        """Loss and metrics on the whole validation fold at the planned size (rank 0 computes,
        every rank receives the same numbers); None without validation cases."""
        return validation_metrics(self)

    def predict_validation_cases(self) -> dict:
        """Write ``validation/CASE.png`` at each case's original size and ``validation/summary.json``
        (metrics against the raw labels at original size; ``at_input_size`` as the paper reported)."""
        return write_validation_predictions(self)

    def raw_label_path(self, case_id: str) -> Path:
        return raw_dir_of(self.plan) / "labels" / f"{case_id}.png"

    # ------------------------------------------------------------------ running
    def run(self, continue_training: bool = False) -> Path:
        """Train (or resume), then predict the validation fold; returns the fold folder
        (:class:`~medplan.trainers.session.RunSession`: the fold's lock, fresh start, resume,
        restart with recorded settings, nothing to do, cleanup of a failed start)."""
        return RunSession(self).run(continue_training)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def setup(self) -> None:
        """Everything of :meth:`setup_model`, then the loader and the schedule; then the per-rank
        augmentation seed."""
        self.setup_model()
        self.steps_per_epoch = ddp.min_across_ranks(self.ctx, len(self.loop.train_loader(1)), self.device)
        if self.steps_per_epoch < 1:
            raise MedplanError(f"fold {self.fold} has {len(self.train_cases)} training case(s), fewer than one "
                               f"batch of {self.batch_size}; lower --batch-size")
        self.scheduler = build_scheduler(self.optimizer, self.plan.lr_schedule.name,
                                         self.epochs * self.steps_per_epoch)
        seed_everything(self.settings.seed + 1000 * self.ctx.rank)  # per-rank augmentation streams

    def setup_model(self) -> None:
        """Device, precision, network (seeded alike on every rank; channels_last where it pays),
        optimizer, loss and the compiled forward: what a training step needs besides data and a
        schedule (benchmarks/bench_train.py times steps of exactly this)."""
        s = self.settings
        self.device = resolve_device(s.device, self.ctx.local_rank)
        configure_backends(s, self.device)
        self.amp_dtype, self.scaler = mixed_precision(s, self.device)
        if self.ctx.enabled and self.batch_size % self.ctx.world_size:
            raise MedplanError(f"batch size {self.batch_size} is not divisible by {self.ctx.world_size} processes")
        self.rank_batch_size = self.batch_size // self.ctx.world_size

        seed_everything(s.seed)  # same initial weights on every rank
        net = self.build_network().to(self.device)
        self.channels_last = use_channels_last(s, net, self.plan.channels, self.internal_size or self.plan.input_size,
                                               self.device)
        if self.channels_last:  # conv weights NHWC: cuDNN's layout; activations follow from the first conv
            net = net.to(memory_format=torch.channels_last)
        self.param_counts = dict(count_parameters(net))
        self.pretrained_report = getattr(net, "pretrained_report", None)  # set by pretrained builders only
        self.model, notes = ddp.wrap_model(net, self.ctx, self.device,
                                           find_unused_parameters=self.find_unused_parameters)
        self.notes += notes
        self.optimizer = self.configure_optimizers(ddp.unwrap(self.model))
        self.compiled = compile_model(self.model, s.compile) if s.compile else None  # the DDP wrapper, if any
        self.loss_fn = self.build_loss().to(self.device)
