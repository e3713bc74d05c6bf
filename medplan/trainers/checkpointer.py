"""What a run saves and restores: weights, optimizer, schedule, scaler, where the loop stands,
and the RNG streams of every rank, so a resumed run ends like an uninterrupted one.

The file format (``medplan-checkpoint-2``) and its safe loading live in
:mod:`medplan.trainers.checkpoint`; this module decides what goes in and where it comes back.
Keys of a checkpoint: ``trainer arch dataset fold epoch epochs model model_options plan settings
lr batch_size best_metric best_epoch training_done`` and, in ``checkpoint_latest.pt`` (a *full*
state), ``optimizer scheduler scaler early_stopping history world_size rng``.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

import medplan.trainers.distributed as ddp
from medplan.errors import MedplanError
from medplan.rundir import LATEST, RunDir
from medplan.trainers.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint

if TYPE_CHECKING:  # annotations only: base imports this module
    from medplan.trainers.base import Trainer


class Checkpointer:
    """Captures, writes and restores one trainer's state in its run folder."""

    def __init__(self, run: RunDir):
        self.run = run

    def capture(self, trainer: "Trainer", full: bool) -> dict[str, Any]:
        """The trainer's state; ``full`` adds what resuming needs (collective under DDP: the
        RNG states of every rank are gathered, so every rank calls it)."""
        loop = trainer.state
        state = {
            "trainer": type(trainer).__qualname__, "arch": trainer.arch, "dataset": trainer.dataset,
            "fold": trainer.fold, "epoch": loop.epoch, "epochs": trainer.epochs,
            "model": ddp.unwrap(trainer.model).state_dict(),
            "model_options": trainer.model_options, "plan": trainer.plan.to_json(),
            "settings": dataclasses.asdict(trainer.settings), "lr": trainer.lr, "batch_size": trainer.batch_size,
            "best_metric": loop.best_metric, "best_epoch": loop.best_epoch, "training_done": loop.training_done,
        }
        if full:
            state.update(optimizer=trainer.optimizer.state_dict(), scheduler=trainer.scheduler.state_dict(),
                         scaler=trainer.scaler.state_dict(), early_stopping=loop.early_stopping.state_dict(),
                         history=loop.history, world_size=trainer.ctx.world_size,
                         rng=ddp.gather_objects(trainer.ctx, capture_rng_state()))
        return state

    def write(self, name: str, state: dict[str, Any]) -> None:
        """Write ``state`` as checkpoint ``name`` of the run folder (atomic)."""
        save_checkpoint(self.run.file(name), state)

    def save(self, trainer: "Trainer", name: str, full: bool) -> None:
        """Capture on every rank, write on rank 0."""
        state = self.capture(trainer, full)
        if trainer.ctx.is_main:
            self.write(name, state)

    def load(self, name: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        return load_checkpoint(self.run.file(name), map_location=map_location)

    def restore(self, trainer: "Trainer", state: dict[str, Any]) -> None:
        """Put a full state back: weights (into the plain module, compiled or not), optimizer
        (keeping this device's fused/foreach choice), schedule, scaler, the loop's state and
        this rank's RNG streams (rank 0's, with a warning, when the process count changed)."""
        ddp.unwrap(trainer.model).load_state_dict(state["model"])
        # this device's kernel, not the one of the device that wrote the file (set before loading,
        # so torch puts the step counters where that kernel wants them)
        kernels = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in trainer.optimizer.param_groups]
        saved = state["optimizer"]
        trainer.optimizer.load_state_dict({**saved, "param_groups": [{**g, **k} for g, k in
                                                                     zip(saved["param_groups"], kernels)]})
        trainer.scheduler.load_state_dict(state["scheduler"])
        trainer.scaler.load_state_dict(state["scaler"])
        trainer.state.load_state_dict(state)
        rngs = state["rng"]
        if len(rngs) == trainer.ctx.world_size:
            restore_rng_state(rngs[trainer.ctx.rank])
        else:
            trainer.log.warning(f"checkpoint was written by {len(rngs)} process(es), this run has "
                                f"{trainer.ctx.world_size}: random streams differ from an uninterrupted run")
            restore_rng_state(rngs[0])

    def latest_progress(self) -> tuple[int, int] | None:
        """(completed epochs, epoch budget) of ``checkpoint_latest.pt``; None when there is none,
        ValueError when it cannot say."""
        if not self.run.latest.is_file():
            return None
        try:
            state = self.load(LATEST)
            return int(state["epoch"]), int(state["epochs"])
        except (MedplanError, KeyError, TypeError) as exc:
            raise ValueError(str(exc)) from None
