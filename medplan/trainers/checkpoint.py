"""Checkpoints: everything a run needs to continue exactly where it stopped, written atomically.

A checkpoint is a plain dict (``torch.save``): model weights, optimizer, scheduler, grad scaler,
early-stopping state, the metrics history, and the RNG states of python, numpy and torch (CPU
and CUDA) of every rank. It is written to a temporary sibling and renamed, so a kill at any
moment leaves the previous checkpoint or the new one, never half a file.

Checkpoints hold data, never code. They are saved as tensors, numbers, strings, bools, None,
lists, tuples and dicts only (:func:`plain` converts numpy values and paths on the way), and
every load is ``torch.load(weights_only=True)``, whose unpickler builds nothing but those: a
file whose pickle names any other callable (``os.system``, a class with ``__reduce__``) is
refused before anything in it runs, with one line naming the file.

Formats: ``medplan-checkpoint-2`` (written now) stores the RNG states as plain content (the
numpy key as a tensor). ``medplan-checkpoint-1`` (earlier medplan) stored numpy's RNG state
as an ``ndarray``; such files still load, with ``weights_only=True`` plus an allowlist of
exactly the numpy pieces a uint32 array needs (``_reconstruct``, ``ndarray``, ``dtype``,
``UInt32DType``), none of which can run code from the file. Where this torch has no
allowlist, an old file is refused with how to convert it on purpose (:func:`convert_legacy`).
"""
from __future__ import annotations

import pickle
import random
import warnings
from collections import OrderedDict
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch

from medplan.errors import MedplanError
from medplan.io import atomic_open
from medplan.safeload import unsafe_reason

CHECKPOINT_FORMAT = "medplan-checkpoint-2"
LEGACY_FORMAT = "medplan-checkpoint-1"
FORMATS = (CHECKPOINT_FORMAT, LEGACY_FORMAT)
UNSAFE = "not a medplan checkpoint or not safe to load"


# ----------------------------------------------------------------------------- saving
def plain(obj: Any) -> Any:
    """``obj`` as content ``torch.load(weights_only=True)`` reads back: numpy scalars become
    python numbers, numpy arrays tensors, paths strings; containers are converted throughout.
    Anything else (an arbitrary object) is an error here, not a checkpoint that cannot load."""
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.Tensor, torch.dtype, torch.device,
                                       torch.Size)):
        return obj
    if isinstance(obj, np.generic):
        return plain(obj.item())  # a datetime64's datetime is refused like any object
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj).copy())
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, dict):  # OrderedDict (state dicts) stays an OrderedDict
        out: dict = OrderedDict() if isinstance(obj, OrderedDict) else {}
        for k, v in obj.items():
            out[plain(k)] = plain(v)
        if isinstance(out, OrderedDict) and isinstance(getattr(obj, "_metadata", None), dict):  # module versions
            out._metadata = plain(obj._metadata)  # type: ignore[attr-defined]
        return out
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = [plain(v) for v in obj]
        return tuple(items) if isinstance(obj, tuple) else items
    raise TypeError(f"a checkpoint holds data only; cannot store {type(obj).__module__}.{type(obj).__qualname__}")


def save_checkpoint(path: str | PurePath, state: dict[str, Any]) -> None:
    """Atomic: a kill mid-write leaves the previous checkpoint, never a truncated one."""
    content = plain({**state, "format": CHECKPOINT_FORMAT})
    with atomic_open(path) as f:
        torch.save(content, f)


# ----------------------------------------------------------------------------- loading
def _legacy_globals() -> list | None:
    """Exactly what numpy's legacy RNG state (a uint32 ndarray) needs to unpickle; None where
    this torch cannot allowlist."""
    if not hasattr(torch.serialization, "safe_globals"):
        return None
    try:
        from numpy._core.multiarray import _reconstruct  # numpy 2
        modules = ["numpy._core.multiarray", "numpy.core.multiarray"]
    except ImportError:  # numpy 1
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
        modules = ["numpy.core.multiarray"]
    allowed: list = [np.ndarray, np.dtype]
    try:
        from numpy.dtypes import UInt32DType
        allowed.append(UInt32DType)
    except ImportError:  # numpy < 1.25: dtype instances are plain np.dtype
        pass
    # the file names the function by the module of the numpy that wrote it
    allowed += [(_reconstruct, f"{m}._reconstruct") for m in modules]
    return allowed


def _refusal(path: PurePath, exc: BaseException) -> MedplanError:
    return MedplanError(f"{UNSAFE} ({unsafe_reason(path, exc)}); medplan runs no code from checkpoint files", path)


def _torch_load(path: Path, map_location: Any) -> Any:
    with warnings.catch_warnings():  # foreign pickles make torch warn about their protocol
        warnings.simplefilter("ignore")
        return torch.load(path, map_location=map_location, weights_only=True)


def load_checkpoint(path: str | PurePath, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a medplan checkpoint (``weights_only=True``, nothing in the file runs); MedplanError
    naming the file if it is missing, unreadable, not ours or needs more than data to load."""
    path = Path(path)
    if not path.is_file():
        raise MedplanError("checkpoint not found", path)
    try:
        state = _torch_load(path, map_location)
    except pickle.UnpicklingError as exc:
        state = _load_legacy(path, map_location, exc)
    except Exception as exc:  # truncated or foreign files raise many types
        raise MedplanError(f"cannot read checkpoint ({type(exc).__name__}: {exc})".splitlines()[0], path) from None
    if not isinstance(state, dict) or state.get("format") not in FORMATS:
        raise MedplanError(f"{UNSAFE} (no medplan format tag)", path)
    return state


def _load_legacy(path, map_location, first: pickle.UnpicklingError) -> dict[str, Any]:
    """A medplan-checkpoint-1 file: numpy's RNG state as an ndarray, and nothing else."""
    allowed = _legacy_globals()
    if allowed is None:
        raise MedplanError(f"{UNSAFE}: an older medplan checkpoint needs torch >= 2.5 to load safely; if you "
                           "trust the file, convert it on purpose with "
                           f"python -c \"from medplan.trainers.checkpoint import convert_legacy; "
                           f"convert_legacy('{path}', trust=True)\"", path)
    try:
        with torch.serialization.safe_globals(allowed):
            state = _torch_load(path, map_location)
    except Exception as exc:  # noqa: BLE001 - a foreign or malicious file
        raise _refusal(path, first if isinstance(exc, pickle.UnpicklingError) else exc) from None
    if not isinstance(state, dict) or state.get("format") != LEGACY_FORMAT:
        raise _refusal(path, first)  # numpy arrays are accepted only in files of the old format
    return state


def convert_legacy(path: str | PurePath, trust: bool = False) -> None:
    """Rewrite a checkpoint in the current format. Loads with the safe allowlist; only with
    ``trust=True`` (you made the file, you know where it has been) with ``weights_only=False``,
    which can run code held in the file."""
    path = Path(path)
    if trust:
        state = torch.load(path, map_location="cpu", weights_only=False)  # the caller vouches for the file
    else:
        state = load_checkpoint(path)
    if not isinstance(state, dict):
        raise MedplanError(f"{UNSAFE} (not a dict)", path)
    if "rng" in state:
        state["rng"] = [rng_state_as_data(s) for s in state["rng"]]
    save_checkpoint(path, state)


# ----------------------------------------------------------------------------- RNG state
def rng_state_as_data(state: dict[str, Any]) -> dict[str, Any]:
    """A :func:`capture_rng_state` dict (either format) as plain content."""
    out = dict(state)
    py = state.get("python")
    if isinstance(py, tuple):  # random.getstate(): (version, 625 ints, gauss_next)
        out["python"] = [int(py[0]), [int(x) for x in py[1]], py[2]]
    npst = state.get("numpy")
    if isinstance(npst, tuple):  # np.random.get_state(): ('MT19937', uint32 keys, pos, has_gauss, gauss)
        out["numpy"] = {"bit_generator": str(npst[0]),
                        "key": torch.from_numpy(np.asarray(npst[1], dtype=np.int64)),
                        "pos": int(npst[2]), "has_gauss": int(npst[3]), "gauss": float(npst[4])}
    return out


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as plain data (tensors, lists, numbers)."""
    state = rng_state_as_data({"python": random.getstate(), "numpy": np.random.get_state(legacy=True),
                               "torch": torch.get_rng_state()})
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _python_state(value: Any) -> tuple:
    if isinstance(value, tuple):  # medplan-checkpoint-1
        return value
    version, internal, gauss = value
    return int(version), tuple(int(x) for x in internal), gauss


def _numpy_state(value: Any) -> Any:
    if isinstance(value, tuple):  # medplan-checkpoint-1
        return value
    key = value["key"]
    key = key.cpu().numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
    return (value["bit_generator"], key.astype(np.uint32), int(value["pos"]), int(value["has_gauss"]),
            float(value["gauss"]))


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_python_state(state["python"]))
    np.random.set_state(_numpy_state(state["numpy"]))
    torch.set_rng_state(state["torch"].cpu() if hasattr(state["torch"], "cpu") else state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])
