"""Checkpoints: everything a run needs to continue exactly where it stopped, written atomically.

A checkpoint is a plain dict (``torch.save``): model weights, optimizer, scheduler, grad scaler,
early-stopping state, the metrics history, and the RNG states of python, numpy and torch (CPU
and CUDA) of every rank. It is written to a temporary sibling and renamed, so a kill at any
moment leaves the previous checkpoint or the new one, never half a file.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medplan.errors import MedplanError
from medplan.io import atomic_open

CHECKPOINT_FORMAT = "medplan-checkpoint-1"


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Atomic: a kill mid-write leaves the previous checkpoint, never a truncated one."""
    with atomic_open(path) as f:
        torch.save({"format": CHECKPOINT_FORMAT, **state}, f)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a medplan checkpoint; MedplanError naming the file if it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise MedplanError("checkpoint not found", path)
    try:
        # our own files hold numpy RNG states and plain dicts, hence weights_only=False
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # truncated or foreign files raise many types
        raise MedplanError(f"cannot read checkpoint ({type(exc).__name__}: {exc})".splitlines()[0], path) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise MedplanError("not a medplan checkpoint", path)
    return state


def capture_rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu() if hasattr(state["torch"], "cpu") else state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])
