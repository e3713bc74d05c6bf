"""Why a weights or checkpoint file was refused, in a few words.

Every ``torch.load`` in medplan is ``weights_only=True``: a pickle that names any callable
beyond plain data is refused before anything in it runs. This module turns torch's refusal
into the words of a one-line :class:`~medplan.errors.MedplanError` (the callables the file
names), for checkpoints (:mod:`medplan.trainers.checkpoint`) and pretrained weights
(:mod:`medplan.architectures.pretrained`) alike.
"""
from __future__ import annotations

import re
from pathlib import PurePath

import torch

#: what a legacy (medplan-checkpoint-1) file may name: numpy's RNG state as a uint32 array
LEGACY_NAMES = {"numpy.ndarray", "numpy.dtype", "numpy.dtypes.UInt32DType",
                "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct"}


def needed_globals(path: PurePath) -> str:
    """The callables a refused file names beyond the legacy allowlist (read from its opcodes,
    nothing executed)."""
    try:
        names = [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(path) if n not in LEGACY_NAMES]
    except Exception:  # noqa: BLE001 - not a zip checkpoint, older torch: say nothing more
        return ""
    return ", ".join(names[:4]) + (" ..." if len(names) > 4 else "")


def unsafe_reason(path: PurePath, exc: BaseException) -> str:
    """Why ``weights_only`` loading refused ``path``, in a few words (the callables it names)."""
    needs = needed_globals(path)
    if not needs:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)|but got <class '([\w.]+)'>", str(exc))
        needs = next((g for g in found.groups() if g), "") if found else ""
    if needs:
        why = f"it names {needs}, which weights_only loading refuses"
    else:
        detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(exc))
        why = "weights_only loading refused it" + (f": {detail.group(1).strip()}" if detail else "")
    return why
