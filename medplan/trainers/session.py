"""One start of a run in its folder: lock it, decide what to do with what is there, set the
trainer up, resume or start, run the epoch loop, finish, and clean up a start that failed.

Rank 0 holds the fold's lock (``fold_K/.lock``, :mod:`medplan.locks`) from before it reads or
deletes anything of the folder until the run ends, so a second run of the fold (``--force``
included) is refused at once. An interrupted run is never deleted without ``--force``; a
start that fails before its first epoch ends removes what it wrote (and the folders it made).
"""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import medplan.trainers.distributed as ddp
from medplan.errors import MedplanError
from medplan.locks import FileLock
from medplan.rundir import BEST, FINAL, FOLD_PREFIX, LATEST, LOG
from medplan.trainers.progress import RunLog
from medplan.trainers.provenance import header, resume_entry, run_config
from medplan.trainers.settings import resolve_device

if TYPE_CHECKING:  # annotations only: base imports this module
    from medplan.trainers.base import Trainer


class RunSession:
    """Drives one :class:`~medplan.trainers.base.Trainer` through one start of its run."""

    def __init__(self, trainer: "Trainer"):
        self.trainer = trainer
        self.run_dir = trainer.run_dir
        self.lock: FileLock | None = None
        self.written_before: set[str] | None = None  # the run's files that existed when this start began writing

    def run(self, continue_training: bool = False) -> Path:
        """Train (or resume), then predict the validation fold; returns the fold folder."""
        t = self.trainer
        failed = False
        try:
            return self._run(continue_training)
        except KeyboardInterrupt:
            if t.log is not None:
                t.log.info(f"interrupted after epoch {t.state.epoch}; resume with --continue")
            raise
        except Exception:
            failed = True
            raise
        finally:
            t.loop.close()
            if t.log is not None:
                t.log.close()
            undone = failed and self.undo_failed_start()
            if self.lock is not None:
                self.lock.release()
                self.lock = None
            if undone:
                with contextlib.suppress(OSError):
                    self.run_dir.path.rmdir()  # only if nothing else is left in it
            # the process group stays up for the next run of this process (LR search); the
            # command-line entry point tears it down (distributed.cleanup)

    def _run(self, continue_training: bool) -> Path:
        t = self.trainer
        t.ctx = ddp.init_distributed(resolve_device(t.settings.device).type)
        decision: tuple = ("error", "")
        if t.ctx.is_main:  # under DDP only rank 0 locks, reads and writes the folder
            try:
                self.acquire_lock()
                decision = self.decide(continue_training)
            except MedplanError as exc:
                decision = ("error", str(exc))
        decision = ddp.broadcast_object(t.ctx, decision)
        if decision[0] == "error":
            raise MedplanError(decision[1])
        if decision[0] == "complete":
            if t.ctx.is_main:
                print(f"{self.run_dir}: run is already complete ({FINAL}, validation/summary.json); nothing to do")
            return self.run_dir.path
        if decision[0] == "resume":
            self.resume()
        else:
            self.start(decision, continue_training)
        t.log.info(header(t))
        if not t.state.training_done:
            t.loop.run()
        self.finish()
        return self.run_dir.path

    # ------------------------------------------------------------------ deciding
    def acquire_lock(self) -> None:
        t = self.trainer
        purpose = f"train {t.dataset}/{t.arch}/{FOLD_PREFIX}{t.fold}"
        if t.settings.stage != "cv":
            purpose += f" ({t.settings.stage}, lr {t.lr:g})"
        self.lock, removed = self.run_dir.acquire(purpose)
        if removed:
            print(f"{self.run_dir}: removed {len(removed)} temporary file(s) left by an interrupted run",
                  file=sys.stderr)

    def decide(self, continue_training: bool) -> tuple:
        """Fresh start, resume, restart with recorded settings or nothing to do (decided on
        rank 0 while it holds the fold's lock, shared with every rank).

        An interrupted run is never deleted without ``--force``: without ``--continue`` it is
        an error that says how to resume it or start over."""
        t, run = self.trainer, self.run_dir
        force = t.settings.force
        if run.is_complete(validates=bool(t.val_cases)):
            if continue_training and not force:
                return ("complete",)
            if not force:
                raise MedplanError("holds a finished run; use --continue to keep it or --force to train it again",
                                   run.path)
        if continue_training and not force:
            if run.latest.is_file():
                return ("resume",)
            if run.config_path.is_file():
                return ("restart", run.recorded_settings(t.dataset, t.arch, t.fold))
        elif not force and run.is_started():
            raise MedplanError(f"holds an interrupted run ({self.interrupted_at()}); resume with --continue "
                               "or start over with --force", run.path)
        return ("fresh", bool(run.present()))

    def interrupted_at(self) -> str:
        """``epoch k/N`` of the run in the folder, for messages."""
        t = self.trainer
        done: int | str = 0
        total = None
        try:
            progress = t.checkpointer.latest_progress()
        except ValueError:
            done = "?"
        else:
            if progress is not None:
                done, total = progress
        if total is None and self.run_dir.config_path.is_file():
            with contextlib.suppress(MedplanError, AttributeError):
                total = self.run_dir.config().get("epochs")
        return f"epoch {done}/{total if isinstance(total, int) else t.epochs}"

    def keep_run_settings(self, stored: dict[str, Any]) -> None:
        """A resumed or restarted run keeps the budget, LR, batch size, seed and model options
        it started with (a different request is a warning, not a new run)."""
        t = self.trainer
        kept = {"epochs": (t.epochs, int(stored["epochs"])), "lr": (t.lr, float(stored["lr"])),
                "seed": (t.settings.seed, int(stored["seed"])),
                "batch_size": (t.batch_size, int(stored["batch_size"]))}
        for key, (asked, value) in kept.items():
            if asked != value:
                t.log.warning(f"--continue keeps the run's {key} {value:g} (not {asked:g})")
        t.epochs, t.lr, t.settings.seed, t.batch_size = (v[1] for v in kept.values())
        options = stored.get("model_options")
        if isinstance(options, dict):
            def canonical(o: dict) -> str:
                return json.dumps(o, sort_keys=True, default=str)

            if canonical(options) != canonical(t.model_options):
                t.log.warning(f"--continue keeps the run's model options {canonical(options)} "
                              f"(not {canonical(t.model_options)})")
            t.model_options = dict(options)

    def adopt_checkpoint_settings(self, state: dict[str, Any]) -> None:
        """A resumed run keeps the budget, LR, batch size, seed and model options it started with."""
        t = self.trainer
        if state.get("arch") != t.arch or str(state.get("fold")) != str(t.fold):
            raise MedplanError(f"checkpoint is for {state.get('arch')} fold {state.get('fold')}, not "
                               f"{t.arch} fold {t.fold}", self.run_dir.latest)
        saved = state.get("settings", {})
        self.keep_run_settings({"epochs": state["epochs"], "lr": state["lr"],
                                "seed": saved.get("seed", t.settings.seed),
                                "batch_size": state.get("batch_size", t.batch_size),
                                "model_options": state.get("model_options")})
        if state.get("world_size", 1) != ddp.env_world_size():
            t.log.warning(f"resuming a {state.get('world_size', 1)}-process run with {ddp.env_world_size()}")

    # ------------------------------------------------------------------ starting
    def resume(self) -> None:
        t = self.trainer
        t.log = RunLog(self.run_dir.log_path if t.ctx.is_main else None, console=t.ctx.is_main)
        state = t.checkpointer.load(LATEST, map_location="cpu")
        self.adopt_checkpoint_settings(state)
        t.resuming = True
        t.setup()
        t.checkpointer.restore(t, state)
        t.log.info(f"resumed from {LATEST} after epoch {t.state.epoch}/{t.epochs}")
        if t.ctx.is_main:
            self.run_dir.record_resume(resume_entry(t), fallback=lambda: run_config(t))
            self.run_dir.write_metrics(t.state.history)  # drop epochs newer than the checkpoint

    def start(self, decision: tuple, continue_training: bool) -> None:
        t = self.trainer
        # messages wait in memory until the folder is this run's (training.log of an earlier run
        # is only replaced once the new run could be built)
        t.log = RunLog(None, console=t.ctx.is_main, buffer=t.ctx.is_main)
        t.resuming = False
        if decision[0] == "restart":
            self.keep_run_settings(decision[1])
            t.lr_source = decision[1]["lr_source"]
            t.log.warning(f"--continue: no {LATEST} yet; restarting the run from scratch with the settings "
                          f"its config.json recorded (lr {t.lr:g}, epochs {t.epochs}, batch "
                          f"{t.batch_size}, seed {t.settings.seed})")
        elif continue_training and not t.settings.force:
            t.log.warning(f"--continue: no {LATEST} yet, starting from scratch")
        t.setup()
        if t.ctx.is_main:
            self.start_writing(decision)

    def start_writing(self, decision: tuple) -> None:
        """Rank 0, once the run is set up: clear what the decision replaces, then start the
        run's files. Nothing of an earlier run is deleted before the new one could be built."""
        t, run = self.trainer, self.run_dir
        if decision[0] == "restart":
            run.clear(keep=(LOG,))
        elif decision[1]:
            print(f"{run}: removing the files of an earlier run and starting fresh", file=sys.stderr)
            run.clear()
        run.path.mkdir(parents=True, exist_ok=True)
        self.written_before = run.present()
        t.log.attach(run.log_path)
        run.write_config(run_config(t))

    def undo_failed_start(self) -> bool:
        """After a failure before the first epoch ended: remove the files this start wrote, so
        that no half-made run is left for a report to count. True if it removed anything."""
        if self.written_before is None or self.trainer.state.epoch > 0 or not self.trainer.ctx.is_main:
            return False
        self.run_dir.remove_new(self.written_before)
        return True

    # ------------------------------------------------------------------ the end
    def finish(self) -> None:
        """checkpoint_final.pt (last epoch's weights), then the best weights predict the validation fold."""
        t = self.trainer
        state = t.checkpointer.capture(t, full=False)
        if t.ctx.enabled:
            in_sync = ddp.parameters_in_sync(t.ctx, t.model)
            t.log.info(f"{t.ctx.world_size} processes hold identical weights: {in_sync}")
            state["ddp"] = {"world_size": t.ctx.world_size, "ranks_in_sync": in_sync}
        if t.ctx.is_main:
            if not t.val_cases:  # fold "all": nothing to select on, best = final
                t.checkpointer.write(BEST, state)
            t.checkpointer.write(FINAL, state)
        ddp.barrier(t.ctx)
        if t.ctx.is_main and t.val_cases:
            best = t.checkpointer.load(BEST, map_location=t.device)
            ddp.unwrap(t.model).load_state_dict(best["model"])
            summary = t.predict_validation_cases()
            t.log.info(f"validation with the best weights (epoch {t.state.best_epoch}) at original size: "
                       f"mIoU {summary['mIoU']:.4f}  mDSC {summary['mDSC']:.4f}  "
                       f"(at input size: mIoU {summary['at_input_size']['mIoU']:.4f})")
        ddp.barrier(t.ctx)
        t.log.info(f"done: {self.run_dir}")
