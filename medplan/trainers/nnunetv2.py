"""``nnunetv2``: the real nnU-Net v2, trained by its own code on medplan's folds, in medplan's table.

``medplan_train CAMUS nnunetv2 0`` (``pip install medplan[nnunet]``):

1. exports the plan's kept cases with medplan's folds as ``splits_final.json`` and runs
   ``nnUNetv2_plan_and_preprocess`` once per dataset (:func:`medplan.interop.nnunetv2.prepare_dataset`);
2. runs ``nnUNetv2_train ID 2d K -tr TRAINER -device DEV`` with ``nnUNet_results`` in
   ``fold_K/nnunet`` (``--continue`` passes nnU-Net's ``--c``), its output in ``training.log``;
3. predicts the fold's validation cases with nnU-Net's predictor (its final weights, as its own
   validation) and writes medplan's fold folder: ``validation/CASE.png`` at original size and
   ``summary.json`` by medplan's metric code, ``metrics.jsonl`` from nnU-Net's training log,
   ``progress.png`` (nnU-Net's), ``config.json`` (nnU-Net version, trainer, plans, command
   lines) and, last, ``checkpoint_best.pt``/``checkpoint_final.pt``: small data files (no
   weights) naming nnU-Net's model folder and checkpoint, which prediction follows.

Model options (``--model-opt``): ``trainer`` (an nnU-Net trainer class, default
``nnUNetTrainer``), ``planner`` and ``plans`` (nnU-Net's ``-pl`` / plans identifier),
``configuration`` (``2d``), ``dataset_id`` (default: derived from the dataset name).
``--epochs N`` picks nnU-Net's ``nnUNetTrainer_Nepochs``. nnU-Net's recipe is nnU-Net's: an
explicit ``--lr``/``--batch-size`` or the LR-search stage is refused; amp, compile, seed and
workers are nnU-Net's business (config.json's deviations say so).

The fold's lock is held from the first look at the folder to the end; a finished run is kept
(or replaced with ``--force``), an interrupted one is refused without ``--continue``/``--force``,
and a start that fails before nnU-Net wrote a checkpoint removes what it wrote.
"""
from __future__ import annotations

import contextlib
import dataclasses
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from medplan.architectures import get_entry
from medplan.errors import MedplanError
from medplan.interop.nnunet import nnunet_dataset_name
from medplan.interop.nnunetv2 import (DEFAULT_CONFIGURATION, DEFAULT_TRAINER,
                                      NNUNET_DIR, NnunetFold, NnunetPredictor, PreparedDataset, default_dataset_id,
                                      load_nnunet_checkpoint, metrics_records, model_folder, nnunet_env,
                                      prepare_dataset, require_nnunetv2, run_logged, train_command, trainer_class)
from medplan.io import (atomic_directory, atomic_write_bytes, atomic_write_json, atomic_write_png, read_image,
                        read_json, read_label)
from medplan.metrics import MetricAccumulator, summary_dict
from medplan.preprocessing import prepare_label
from medplan.rundir import FINAL, FOLD_PREFIX, SUMMARY
from medplan.trainers.base import Trainer
from medplan.trainers.checkpoint import save_checkpoint
from medplan.trainers.provenance import git_commit, now, versions
from medplan.trainers.registry import register_trainer
from medplan.trainers.settings import resolve_device

#: nnU-Net's checkpoint that validation and prediction use (nnU-Net's own default)
NNUNET_CHECKPOINT = "checkpoint_final.pth"


@register_trainer("nnunetv2")
class NnUNetV2Trainer(Trainer):
    """Runs nnU-Net v2 itself for a fold and writes medplan's standard fold folder."""

    deviations = ["trained, validated and predicted by nnU-Net v2's own code (its planning, network, SGD + poly "
                  "recipe, epochs of 250 iterations, augmentation, sliding-window prediction with mirroring); "
                  "medplan's optimizer, schedule, batch size, augmentation and early stopping do not apply",
                  "validation label maps from nnU-Net's final weights (checkpoint_final.pth), as nnU-Net validates"]

    @classmethod
    def check_architecture(cls, arch: str) -> None:
        super().check_architecture(arch)
        require_nnunetv2(arch)

    def build_network(self) -> nn.Module:
        raise MedplanError("nnunetv2's network is built and run by nnU-Net, not by medplan")

    # ------------------------------------------------------------------ options
    def nnunet_options(self) -> dict[str, Any]:
        """The model options resolved and checked (one line naming the bad one)."""
        entry = get_entry(self.arch)
        known = {k: v for k, v in entry.options().items() if k != "**"}
        unknown = sorted(set(self.model_options) - set(known) - {"pretrained"})
        if unknown:
            raise MedplanError(f"architecture {self.arch!r} has no option {', '.join(map(repr, unknown))} "
                               f"(its options: {', '.join(known)})")
        opts = {**known, **{k: v for k, v in self.model_options.items() if k != "pretrained"}}
        for key in ("trainer", "plans", "planner"):
            if not isinstance(opts[key], str) or not opts[key].isidentifier():
                raise MedplanError(f"--model-opt {key} must be a class or identifier name, got {opts[key]!r}")
        if opts["configuration"] != DEFAULT_CONFIGURATION:
            raise MedplanError(f"--model-opt configuration must be '2d' (medplan's datasets are 2D), got "
                               f"{opts['configuration']!r}")
        if opts["dataset_id"] is None:
            opts["dataset_id"] = default_dataset_id(self.dataset)
        nnunet_dataset_name(opts["dataset_id"], self.dataset)  # checks the id
        s = self.settings
        if s.stage != "cv":
            raise MedplanError("nnunetv2 has no LR search: nnU-Net's recipe fixes its learning rate")
        for flag, value in (("--lr", s.lr), ("--batch-size", s.batch_size)):
            if value is not None:
                raise MedplanError(f"{flag} does not apply to nnunetv2 (nnU-Net plans it); choose an nnU-Net "
                                   "trainer with --model-opt trainer=...")
        if s.epochs is not None:
            if "trainer" in self.model_options:
                raise MedplanError("give either --epochs or --model-opt trainer=... for nnunetv2, not both")
            opts["trainer"] = f"{DEFAULT_TRAINER}_{int(s.epochs)}epoch{'s' if int(s.epochs) != 1 else ''}"
        trainer_class(opts["trainer"])  # exists, before any folder is made
        return opts

    # ------------------------------------------------------------------ the run
    def decide(self, continue_training: bool) -> str:
        """``complete``, ``continue`` or ``fresh`` (with the fold's lock held)."""
        run, force = self.run_dir, self.settings.force
        started = run.is_started() or (run.path / NNUNET_DIR).exists()
        if run.is_complete(validates=bool(self.val_cases)) and not force:
            if continue_training:
                return "complete"
            raise MedplanError("holds a finished run; use --continue to keep it or --force to train it again",
                               run.path)
        if force:
            if started:
                print(f"{run}: removing the files of an earlier run and starting fresh", file=sys.stderr)
            run.clear()
            shutil.rmtree(run.path / NNUNET_DIR, ignore_errors=True)
            return "fresh"
        if started and not continue_training:
            raise MedplanError("holds an interrupted run; resume with --continue or start over with --force",
                               run.path)
        return "continue" if started else "fresh"

    def run(self, continue_training: bool = False) -> Path:
        """Plan and preprocess (once), train with nnU-Net, predict the validation fold, write the
        fold folder; returns it."""
        opts = self.nnunet_options()
        device = resolve_device(self.settings.device)
        if device.type not in ("cpu", "cuda", "mps"):
            raise MedplanError(f"nnU-Net trains on cpu, cuda or mps, not {device.type}")
        run = self.run_dir
        existed = run.path.exists()
        purpose = f"train {self.dataset}/{self.arch}/{FOLD_PREFIX}{self.fold}"
        lock, _ = run.acquire(purpose)
        before: set[str] | None = None
        failed = False
        try:
            decision = self.decide(continue_training)
            if decision == "complete":
                print(f"{run}: run is already complete ({FINAL}, validation/summary.json); nothing to do")
                return run.path
            before = run.present() | ({NNUNET_DIR} if (run.path / NNUNET_DIR).exists() else set())
            self._train(opts, device.type, decision)
            return run.path
        except BaseException as exc:
            failed = not isinstance(exc, KeyboardInterrupt)
            raise
        finally:
            if failed and before is not None and not self._nnunet_checkpoints(opts):
                run.remove_new(before)
                if NNUNET_DIR not in before:
                    shutil.rmtree(run.path / NNUNET_DIR, ignore_errors=True)
            lock.release()
            if failed and not existed:
                with contextlib.suppress(OSError):
                    run.path.rmdir()  # only if nothing else is left in it

    def _model_dir(self, opts: dict[str, Any]) -> Path:
        name = nnunet_dataset_name(opts["dataset_id"], self.dataset)
        return model_folder(self.run_dir.path / NNUNET_DIR, name, opts["trainer"], opts["plans"],
                            opts["configuration"])

    def _nnunet_checkpoints(self, opts: dict[str, Any]) -> list[Path]:
        folder = self._model_dir(opts) / f"{FOLD_PREFIX}{self.fold}"
        return sorted(folder.glob("checkpoint_*.pth")) if folder.is_dir() else []

    def _train(self, opts: dict[str, Any], device: str, decision: str) -> None:
        run = self.run_dir
        run.path.mkdir(parents=True, exist_ok=True)
        config = self._config(opts, device)
        if decision == "continue" and run.config_path.is_file():
            with contextlib.suppress(MedplanError):
                old = read_json(run.config_path)
                if isinstance(old, dict):
                    config = {**old, "resumes": [*old.get("resumes", []),
                                                 {"time": now(), "command_line": list(sys.argv), "device": device}]}
        run.write_config(config)
        prepared = prepare_dataset(self.dataset, opts["dataset_id"], opts["plans"], opts["configuration"],
                                   run.log_path, opts["planner"])
        resume = decision == "continue" and bool(self._nnunet_checkpoints(opts))
        cmd = train_command(opts["dataset_id"], opts["configuration"], self.fold, opts["trainer"], opts["plans"],
                            device, resume)
        env = nnunet_env(prepared.raw_root, prepared.preprocessed_root, run.path / NNUNET_DIR)
        config["nnunet"]["commands"] = [*config["nnunet"].get("commands", []),
                                        *[list(c) for c in prepared.commands], cmd]
        run.write_config(config)
        run_logged(cmd, env, run.log_path, "nnUNetv2_train")
        self._finish(opts, config, prepared)

    def _config(self, opts: dict[str, Any], device: str) -> dict[str, Any]:
        model_dir = self._model_dir(opts)
        return {
            "dataset": self.dataset, "arch": self.arch, "fold": self.fold, "stage": self.settings.stage,
            "trainer": f"{type(self).__module__}.{type(self).__qualname__}", "created": now(),
            "command_line": list(sys.argv), "settings": dataclasses.asdict(self.settings),
            "lr": None, "lr_source": "nnU-Net", "epochs": None, "batch_size": None, "seed": self.settings.seed,
            "device": device, "model_options": dict(self.model_options),
            "n_train": len(self.train_cases), "n_val": len(self.val_cases),
            "train_cases": self.train_cases, "val_cases": self.val_cases, "deviations": list(self.notes),
            "versions": {**versions(), "nnunetv2": require_nnunetv2(self.arch)}, "hostname": socket.gethostname(),
            "git_commit": git_commit(), "plan": self.plan.to_json(),
            "nnunet": {"version": require_nnunetv2(self.arch), "dataset_id": opts["dataset_id"],
                       "dataset_name": nnunet_dataset_name(opts["dataset_id"], self.dataset),
                       "trainer": opts["trainer"], "planner": opts["planner"], "plans": opts["plans"],
                       "configuration": opts["configuration"],
                       "model_dir": str(model_dir.relative_to(self.run_dir.path)), "commands": []},
        }

    # ------------------------------------------------------------------ the fold folder
    def _finish(self, opts: dict[str, Any], config: dict[str, Any], prepared: PreparedDataset) -> None:
        """metrics.jsonl, progress.png, validation/, config.json, then the checkpoint pointers."""
        run, model_dir = self.run_dir, self._model_dir(opts)
        fold_dir = model_dir / f"{FOLD_PREFIX}{self.fold}"
        state = load_nnunet_checkpoint(fold_dir / NNUNET_CHECKPOINT)
        run.write_metrics(metrics_records(state))
        if (fold_dir / "progress.png").is_file():
            atomic_write_bytes(run.progress_path, (fold_dir / "progress.png").read_bytes())
        nn_plans = read_json(model_dir / "plans.json")
        conf = nn_plans["configurations"][opts["configuration"]]
        config.update(epochs=int(state.get("current_epoch") or 0) or None, batch_size=conf.get("batch_size"))
        config["nnunet"].update(trainer_name=state.get("trainer_name"), plans_json=nn_plans,
                                patch_size=conf.get("patch_size"), checkpoint=NNUNET_CHECKPOINT)
        if self.val_cases:
            fold = NnunetFold(str(self.fold), model_dir, fold_dir / NNUNET_CHECKPOINT)
            summary = self.write_validation(fold, opts, prepared, config["device"])
            config["nnunet"]["summary"] = {"mIoU": summary["mIoU"], "mDSC": summary["mDSC"]}
        run.write_config(config)
        pointer = {"arch": self.arch, "fold": self.fold, "dataset": self.dataset, "trainer": config["trainer"],
                   "model_options": dict(self.model_options), "plan": self.plan.to_json(), "external": "nnunetv2",
                   "epochs": config["epochs"],
                   "nnunet": {"model_dir": config["nnunet"]["model_dir"], "checkpoint": NNUNET_CHECKPOINT,
                              "trainer": opts["trainer"], "version": config["nnunet"]["version"]}}
        save_checkpoint(run.best, pointer)   # medplan's "best" is what the summary reports: nnU-Net's final
        save_checkpoint(run.final, pointer)  # last: the run is complete from here on

    def write_validation(self, fold: NnunetFold, opts: dict[str, Any], prepared: PreparedDataset,
                         device: str) -> dict[str, Any]:
        """``validation/CASE.png`` by nnU-Net's predictor from the exported images (nnU-Net's own
        input) and ``summary.json`` by medplan's metric code; swapped in whole or not at all."""
        label_paths = {c: self.raw_label_path(c) for c in self.val_cases}
        missing = [p for p in label_paths.values() if not p.is_file()]
        if missing:
            raise MedplanError(f"raw label missing ({len(missing)} of {len(label_paths)} validation cases); "
                               "restore the raw dataset, then rerun with --continue", missing[0])
        predictor = NnunetPredictor([fold], self.plan, opts["trainer"], device=device)
        k = self.plan.num_classes
        at_original, at_input = MetricAccumulator(k), MetricAccumulator(k)
        with atomic_directory(self.run_dir.validation) as tmp:
            for case in self.val_cases:
                image = read_image(prepared.export.raw_dir / "imagesTr" / f"{case}_0000.png")
                pred = predictor.predict_one(predictor.load(image))
                gt = read_label(label_paths[case])
                if gt.shape != pred.shape:
                    raise MedplanError(f"raw label is {list(gt.shape)}, nnU-Net predicted {list(pred.shape)}",
                                       label_paths[case])
                atomic_write_png(tmp / f"{case}.png", pred)
                at_original.add(pred, gt, case)
                size = self.plan.input_size
                at_input.add(prepare_label(pred, size), prepare_label(np.asarray(gt, np.uint8), size), case)
            summary = summary_dict(at_original, self.class_names)
            summary["at_input_size"] = at_input.result(self.class_names)
            summary.update(evaluated_at="original_size", checkpoint=f"nnU-Net {NNUNET_CHECKPOINT}", best_epoch=None,
                           dataset=self.dataset, arch=self.arch, fold=self.fold, predicted_by="nnU-Net's predictor",
                           at_input_size_note="label maps resized to the input size (nearest neighbour)")
            atomic_write_json(tmp / SUMMARY, summary)
        return summary


__all__ = ["NnUNetV2Trainer", "NNUNET_CHECKPOINT"]
