"""Pretrained weights from local files only: find them, load them, say what loaded.

Where a builder's weights come from, in order:

1. ``pretrained=PATH`` (``--pretrained PATH``): that file;
2. ``pretrained=True`` (the default for models the paper ran ImageNet-pretrained): the
   documented file name in ``$MEDPLAN_WEIGHTS`` (default ``~/medplan_data/weights``);
3. for timm / Hugging Face models, a filled timm or Hugging Face cache (offline);
4. ``pretrained=False`` (``--no-pretrained``): random initialisation, recorded in config.json.

A missing file is an error that names the expected file, the folder searched and where the
weights are published — never a silent fall-back to random weights. Loading reports the keys
that matched, were missing and were unexpected; loading less than the whole target (the
encoder) is an error unless ``allow_partial=True`` (``--allow-partial``).
"""
from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from medplan.errors import MedplanError
from medplan.paths import DEFAULT_ROOT

WRAPPER_KEYS = ("state_dict", "model", "module", "model_state", "network_weights")
STRIP_PREFIXES = ("module.", "backbone.", "encoder.")


def weights_dir() -> Path:
    """``$MEDPLAN_WEIGHTS`` or ``~/medplan_data/weights``."""
    value = os.environ.get("MEDPLAN_WEIGHTS")
    return Path(value).expanduser() if value else DEFAULT_ROOT / "weights"


def resolve_weights(pretrained: bool | str | Path | None, filename: str, *, url: str, model: str) -> Path | None:
    """The weights file to load, or None for ``pretrained=False``; MedplanError if absent."""
    if pretrained is None or pretrained is False:
        return None
    if pretrained is True:
        path = weights_dir() / filename
        if not path.is_file():
            raise MedplanError(f"{model} needs ImageNet weights {filename!r} in {weights_dir()} "
                               f"(set MEDPLAN_WEIGHTS or pass --pretrained PATH; published at {url}); "
                               "or train from scratch with --no-pretrained", path)
        return path
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise MedplanError(f"pretrained weights for {model} not found (published at {url})", path)
    return path


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .pth/.pt/.bin/.safetensors checkpoint, unwrapped from common containers."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:  # data only: a pickle that names any callable is refused before it runs
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        from medplan.trainers.checkpoint import unsafe_reason

        raise MedplanError(f"not a weights file or not safe to load ({unsafe_reason(path, exc)}); "
                           "medplan runs no code from weights files", path) from None
    except Exception as exc:  # corrupt or foreign files raise many types
        raise MedplanError(f"cannot read weights ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})",
                           path) from None
    for _ in range(3):  # nested wrappers: {"model": {"state_dict": ...}}
        if isinstance(state, Mapping) and not any(isinstance(v, torch.Tensor) for v in state.values()):
            inner = next((state[k] for k in WRAPPER_KEYS if k in state and isinstance(state[k], Mapping)), None)
            if inner is None:
                break
            state = inner
    if not isinstance(state, Mapping):
        raise MedplanError("weights file holds no state dict", path)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


@dataclass
class LoadReport:
    """What a weights file gave a module."""

    path: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)      # in the module, not in the file
    unexpected: list[str] = field(default_factory=list)   # in the file, not used
    mismatched: list[str] = field(default_factory=list)   # same name, other shape

    def as_dict(self) -> dict:
        return {"path": self.path, "n_loaded": len(self.loaded), "missing": self.missing,
                "unexpected": self.unexpected[:50], "n_unexpected": len(self.unexpected),
                "mismatched": self.mismatched}

    def summary(self) -> str:
        return (f"{len(self.loaded)} tensors loaded from {self.path}; {len(self.missing)} missing, "
                f"{len(self.unexpected)} unused, {len(self.mismatched)} with another shape")


def load_weights(module: nn.Module, path: str | Path, *, key_map: Callable[[str], str | None] | None = None,
                 strip_prefixes: Iterable[str] = STRIP_PREFIXES, ignore_missing: Iterable[str] = (),
                 allow_partial: bool = False, adapt_in_channels: bool = True) -> LoadReport:
    """Load a checkpoint into ``module`` (usually the encoder) with a report.

    ``key_map`` renames checkpoint keys (return None to drop one); known wrapper prefixes are
    stripped. Missing keys matching a regex in ``ignore_missing`` (e.g. a classifier head
    the segmentation model does not have) are tolerated. A first convolution whose input
    channels differ (gray input, RGB weights) is adapted by summing over the RGB channels.
    """
    state = read_state_dict(path)
    target = module.state_dict()
    prefixes = tuple(strip_prefixes)
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for prefix in prefixes:
            if key.startswith(prefix) and key not in target:
                key = key[len(prefix):]
        if key_map is not None:
            key = key_map(key)
            if key is None:
                continue
        renamed[key] = value
    report = LoadReport(path=str(path))
    usable: dict[str, torch.Tensor] = {}
    for key, value in renamed.items():
        if key not in target:
            report.unexpected.append(key)
            continue
        want = target[key].shape
        if value.shape != want and adapt_in_channels and value.ndim == 4 and value.shape[1] == 3 \
                and want[1] in (1,) and value.shape[0] == want[0] and value.shape[2:] == want[2:]:
            value = value.sum(dim=1, keepdim=True)
        if value.shape != want:
            report.mismatched.append(f"{key}: file {tuple(value.shape)} vs model {tuple(want)}")
            continue
        usable[key] = value
    report.loaded = sorted(usable)
    patterns = [re.compile(p) for p in ignore_missing]
    report.missing = sorted(k for k in target if k not in usable and not k.endswith("num_batches_tracked")
                            and not any(p.search(k) for p in patterns))
    if (report.missing or report.mismatched) and not allow_partial:
        sample = ", ".join((report.mismatched + report.missing)[:3])
        raise MedplanError(f"weights cover only part of the model ({len(report.missing)} tensors missing, "
                           f"{len(report.mismatched)} with another shape, e.g. {sample}); "
                           "check the file or pass --allow-partial", path)
    module.load_state_dict(usable, strict=False)
    return report
