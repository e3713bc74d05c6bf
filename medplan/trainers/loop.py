"""The epoch loop: train an epoch, validate, track the best epoch, stop early, write
metrics.jsonl, progress.png and the checkpoints. The trainer's hooks do the work of each step
(:meth:`~medplan.trainers.base.Trainer.train_step`, ``validate``, ``on_epoch_start``,
``on_epoch_end``); this module decides when they run and what is recorded: the epoch line
with the whole run's ETA, progress.png (titled with the run) and, when installed and not
switched off, the TensorBoard stream (:mod:`medplan.trainers.tensorboard`, rank 0 only).

Order within an epoch (what a kill at any moment leaves): metrics.jsonl is rewritten before
``checkpoint_latest.pt``, so the metrics are never behind the checkpoint; a resume rewrites
them from the checkpoint's history, dropping an epoch the checkpoint does not hold.
"""
from __future__ import annotations

import datetime as _dt
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

import medplan.trainers.distributed as ddp
from medplan.data import TrainLoader
from medplan.errors import MedplanError
from medplan.progress import progress_bar
from medplan.rundir import BEST, LATEST
from medplan.trainers.progress import (RunEta, format_duration, format_epoch_line, format_eta, plot_progress,
                                       progress_title, run_eta)
from medplan.trainers.settings import EarlyStopping
from medplan.trainers.tensorboard import (GPU_MEMORY_TAG, IMAGES_PER_S_TAG, OVERLAY_CASES, TENSORBOARD_DIR,
                                          TensorBoardLog)
from medplan.trainers.validation import validation_samples

if TYPE_CHECKING:  # annotations only: base imports this module
    from medplan.trainers.base import Trainer

#: progress.png costs ~0.3 s: redrawn at most this often, and always at the end
PLOT_INTERVAL_S = 60.0


@dataclass
class LoopState:
    """Where a run stands: completed epochs, the per-epoch records, the best epoch so far,
    early stopping, and whether training is over (the final validation may still be due)."""

    early_stopping: EarlyStopping
    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best_metric: float | None = None
    best_epoch: int = 0
    training_done: bool = False

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """From a full checkpoint (its ``early_stopping history epoch best_metric best_epoch
        training_done``)."""
        self.early_stopping.load_state_dict(state["early_stopping"])
        self.history = list(state["history"])
        self.epoch = int(state["epoch"])
        self.best_metric, self.best_epoch = state["best_metric"], state["best_epoch"]
        self.training_done = bool(state["training_done"])


class EpochLoop:
    """Runs a set-up trainer's epochs until its budget is spent or early stopping ends them."""

    def __init__(self, trainer: "Trainer"):
        self.trainer = trainer
        self.loader: TrainLoader | None = None
        self.loader_epoch: int | None = None
        self.last_plot = -float("inf")
        self.epoch_lr: float | None = None  # LR at the current epoch's first step
        self.images_per_s: float | None = None  # training throughput of the current epoch (all ranks)
        self.board: TensorBoardLog | None = None

    # ------------------------------------------------------------------ loader
    def train_loader(self, epoch: int) -> TrainLoader:
        """The loader for ``epoch``: one for the whole run, or under DDP a new one per epoch
        holding this rank's share of that epoch's shuffled cases."""
        t = self.trainer
        if self.loader is not None and (not t.ctx.enabled or self.loader_epoch == epoch):
            return self.loader
        if self.loader is not None:
            self.loader.close()
        cases = ddp.shard_cases(t.train_cases, t.ctx.rank, t.ctx.world_size, seed=t.settings.seed, epoch=epoch)
        kwargs = {} if t.settings.num_workers is None else {"num_workers": t.settings.num_workers}
        self.loader = TrainLoader(t.data_dir, cases, t.plan, batch_size=t.rank_batch_size,
                                  seed=t.settings.seed + 1000 * t.ctx.rank, device=t.device, **kwargs)
        self.loader_epoch = epoch
        return self.loader

    def close(self) -> None:
        if self.loader is not None:
            self.loader.close()
        if self.board is not None:
            self.board.close()

    # ------------------------------------------------------------------ watching
    def eta(self, epochs_done: int) -> RunEta | None:
        """The whole run's ETA after ``epochs_done`` epochs (:func:`~medplan.trainers.progress.run_eta`):
        the epoch times so far, the budget, and early stopping's patience left where it can stop."""
        t, state = self.trainer, self.trainer.state
        es = state.early_stopping
        patience_left = None if es.patience is None or not t.val_cases else es.patience - es.bad_epochs
        return run_eta([r.get("epoch_time") for r in state.history], epochs_done, t.epochs, patience_left)

    def open_board(self) -> TensorBoardLog:
        """This start's TensorBoard stream in ``fold_K/tensorboard`` (rank 0, unless switched off)."""
        t = self.trainer
        return TensorBoardLog(t.run_dir.path / TENSORBOARD_DIR, enabled=t.settings.tensorboard and t.ctx.is_main,
                              first_epoch=t.state.epoch + 1, say=t.log.info, warn=t.log.warning)

    def watch(self, record: dict) -> None:
        """The epoch to TensorBoard: its metrics.jsonl record, images/s, peak GPU memory, and
        the first validation cases as image / ground truth / prediction."""
        t = self.trainer
        if self.board is None or not self.board.open():
            return
        extra = {IMAGES_PER_S_TAG: self.images_per_s}
        if t.device.type == "cuda":
            extra[GPU_MEMORY_TAG] = torch.cuda.max_memory_allocated(t.device) / 2**30
        samples = validation_samples(t, OVERLAY_CASES) if t.val_cases else []
        self.board.write_epoch(record, extra, samples)

    # ------------------------------------------------------------------ epochs
    def run(self) -> None:
        t, state = self.trainer, self.trainer.state
        stop = False
        self.last_plot = -float("inf")
        if self.board is None:
            self.board = self.open_board()
        while state.epoch < t.epochs and not stop:
            epoch = state.epoch + 1
            t0 = time.perf_counter()
            if t.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(t.device)
            t.on_epoch_start(epoch)
            train_loss = self.train_epoch(epoch)
            val = t.validate()
            state.epoch = epoch
            record, improved = self._record(epoch, train_loss, val, t0)
            if val is not None:
                stop = state.early_stopping.step(val[state.early_stopping.monitor.replace("val_", "")], epoch)
            t.on_epoch_end(record)
            state.history.append(record)
            if stop or epoch >= t.epochs:
                state.training_done = True
            self._write(epoch, improved)
            t.log.info(format_epoch_line(record, t.epochs, "" if state.training_done else format_eta(self.eta(epoch))))
            if stop:
                es = state.early_stopping
                t.log.info(f"early stopping: no {es.monitor} improvement > {es.min_delta:g} for {es.bad_epochs} "
                           f"epochs (best {es.best:.4f} at epoch {es.best_epoch})")

    def _record(self, epoch: int, train_loss: float, val: dict | None, t0: float) -> tuple[dict, bool]:
        """The epoch's metrics.jsonl line; updates the best epoch (validation mIoU)."""
        state = self.trainer.state
        record = {"epoch": epoch, "train_loss": train_loss,
                  "val_loss": None if val is None else val["loss"],
                  "val_mIoU": None if val is None else val["mIoU"],
                  "val_mDSC": None if val is None else val["mDSC"],
                  "lr": self.epoch_lr,
                  "epoch_time": time.perf_counter() - t0,
                  "timestamp": _dt.datetime.now().isoformat(timespec="seconds")}
        improved = val is not None and (state.best_metric is None or val["mIoU"] > state.best_metric)
        if improved:
            state.best_metric, state.best_epoch = val["mIoU"], epoch
        record["best"] = improved
        return record, improved

    def _write(self, epoch: int, improved: bool) -> None:
        """checkpoint_best.pt, metrics.jsonl, progress.png, then checkpoint_latest.pt."""
        t, state = self.trainer, self.trainer.state
        if improved:
            t.checkpointer.save(t, BEST, full=False)
        if t.ctx.is_main:
            t.run_dir.write_metrics(state.history)
            self.watch(state.history[-1])
            now = time.monotonic()
            if state.training_done or now - self.last_plot >= PLOT_INTERVAL_S:
                plot_progress(state.history, t.run_dir.progress_path, self.title())
                self.last_plot = now
        if state.training_done or epoch % t.settings.checkpoint_every == 0:
            t.checkpointer.save(t, LATEST, full=True)

    def title(self) -> str:
        """progress.png's title: dataset, architecture, fold (and the LR of an LR-search run)."""
        t = self.trainer
        return progress_title(t.dataset, t.arch, t.fold, t.lr if t.settings.stage == "lr_search" else None)

    def train_epoch(self, epoch: int) -> float:
        """One pass over the training loader (``steps_per_epoch`` steps); the mean loss over ranks."""
        t = self.trainer
        t.model.train()
        loader = self.train_loader(epoch)
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        self.epoch_lr = t.optimizer.param_groups[0]["lr"]
        total = torch.zeros((), device=t.device)
        steps = 0
        start = time.perf_counter()
        show = t.ctx.is_main and t.settings.progress is not False
        desc = f"epoch {epoch}/{t.epochs}"
        eta = self.eta(epoch - 1) if show else None
        if eta is not None:  # the bar times this epoch; the label says what the whole run has left
            desc += f" (run left {'<= ' if eta.earliest_stop_epoch else '~'}{format_duration(eta.seconds_left)})"
        batches = progress_bar(loader, total=t.steps_per_epoch, desc=desc,
                               enabled=None if t.settings.progress is None else t.settings.progress, unit="batch",
                               leave=False) if show else loader
        for batch in batches:
            if steps >= t.steps_per_epoch:
                break
            total += t.train_step(batch).float()
            steps += 1
        if steps == 0:
            raise MedplanError(f"the training loader yielded no batch in epoch {epoch}")
        loss = float(total.item())  # waits for the device, so the time below is the epoch's
        self.images_per_s = steps * t.rank_batch_size * t.ctx.world_size / max(time.perf_counter() - start, 1e-9)
        return ddp.mean_across_ranks(t.ctx, loss / steps, t.device)
