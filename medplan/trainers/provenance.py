"""What config.json records about a run: who ran it, how, with what versions, on which cases.

The keys are the file format (docs/formats.md); :meth:`medplan.rundir.RunDir.provenance`
reads them back.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

import medplan
from medplan.trainers.settings import compile_backend, optimizer_kernel_name

if TYPE_CHECKING:  # annotations only: base imports this module
    from medplan.trainers.base import Trainer


def git_commit() -> str | None:
    try:
        root = Path(medplan.__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version(), "medplan": medplan.__version__,
                                    "torch": torch.__version__, "numpy": np.__version__,
                                    "cuda": torch.version.cuda, "cudnn": None}
    if torch.backends.cudnn.is_available():
        found["cudnn"] = str(torch.backends.cudnn.version())
    try:
        import timm  # optional: recorded when installed

        found["timm"] = timm.__version__
    except ImportError:
        found["timm"] = None
    return found


def now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


def run_config(t: "Trainer") -> dict[str, Any]:
    """config.json of a set-up trainer."""
    return {
        "dataset": t.dataset, "arch": t.arch, "fold": t.fold, "stage": t.settings.stage,
        "trainer": f"{type(t).__module__}.{type(t).__qualname__}",
        "created": now(),
        "command_line": list(sys.argv),
        "settings": dataclasses.asdict(t.settings),
        "lr": t.lr, "lr_source": t.lr_source, "epochs": t.epochs, "batch_size": t.batch_size,
        "steps_per_epoch": t.steps_per_epoch, "seed": t.settings.seed,
        "deterministic": t.settings.deterministic,
        "device": str(t.device),
        "device_name": torch.cuda.get_device_name(t.device) if t.device.type == "cuda" else platform.processor() or platform.machine(),
        "amp": None if t.amp_dtype is None else str(t.amp_dtype).replace("torch.", ""),
        **speed_record(t),
        "world_size": t.ctx.world_size,
        "schedule": {"name": t.plan.lr_schedule.name, "stepped": "per optimizer step",
                     "total_steps": t.epochs * t.steps_per_epoch},
        "loss": t.plan.loss, "class_weights": t.class_weights, "internal_size": t.internal_size,
        "model_options": t.model_options, "parameters": t.param_counts,
        "pretrained": t.model_options.get("pretrained", False), "pretrained_report": t.pretrained_report,
        "n_train": len(t.train_cases), "n_val": len(t.val_cases),
        "train_cases": t.train_cases, "val_cases": t.val_cases,
        "deviations": t.notes,
        "versions": versions(), "hostname": socket.gethostname(), "git_commit": git_commit(),
        "plan": t.plan.to_json(),
    }


def speed_record(t: "Trainer") -> dict[str, Any]:
    """How the run was made fast, none of which changes what it computes beyond rounding:
    ``compile`` (the torch.compile backend of the training forward, None: eager),
    ``channels_last`` and ``optimizer_kernel`` (fused, foreach or for-loop)."""
    return {"compile": compile_backend(t.settings.compile), "channels_last": bool(t.channels_last),
            "optimizer_kernel": optimizer_kernel_name(t.optimizer) if t.optimizer is not None else None}


def resume_entry(t: "Trainer") -> dict[str, Any]:
    """One item of config.json's ``resumes`` (a resume may change the speed choices)."""
    return {"time": now(), "after_epoch": t.state.epoch, "command_line": list(sys.argv),
            "device": str(t.device), "world_size": t.ctx.world_size, **speed_record(t)}


def header(t: "Trainer") -> str:
    """The run's first log line."""
    amp = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16 + grad scaler"}[t.amp_dtype]
    return (f"{type(t).__name__}: {t.dataset} / {t.arch} / fold {t.fold} ({t.settings.stage}): "
            f"{len(t.train_cases)} train, {len(t.val_cases)} val cases; {t.epochs} epochs x "
            f"{t.steps_per_epoch} steps, batch {t.batch_size}, lr {t.lr:g} ({t.lr_source}), "
            f"device {t.device}, amp {amp}, processes {t.ctx.world_size}, seed {t.settings.seed}"
            + (f", torch.compile ({compile_backend(t.settings.compile)})" if t.settings.compile else "")
            + (", channels_last" if t.channels_last else ""))
