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

Every architecture declares its files in its model card (:class:`medplan.architectures.card.Weights`);
:func:`resolve_card_weights` and :func:`load_card_weights` are the one resolve -> load -> report
path that ``build_model`` runs for all of them.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from medplan.architectures.card import HUB_FILES, STRIP_PREFIXES, Weights, WeightsFile
from medplan.errors import MedplanError
from medplan.paths import DEFAULT_ROOT
from medplan.safeload import unsafe_reason

log = logging.getLogger(__name__)

WRAPPER_KEYS = ("state_dict", "model", "module", "model_state", "network_weights")


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


# ----------------------------------------------------------------------------- model cards
def hub_cache_file(repo_id: str, filenames: Iterable[str] = HUB_FILES) -> Path | None:
    """A file of ``repo_id`` already in the local Hugging Face cache (never downloads): the ``main``
    snapshot, else any snapshot (smp downloads a pinned revision, which leaves no ``main`` ref)."""
    try:
        from huggingface_hub import constants, try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with timm
        return None
    cache_dir = Path(os.environ.get("HF_HUB_CACHE") or (
        Path(os.environ["HF_HOME"]) / "hub" if os.environ.get("HF_HOME") else constants.HF_HUB_CACHE))
    filenames = list(filenames)
    for name in filenames:
        found = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    snapshots = cache_dir / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    for name in filenames:
        found = sorted((p for p in snapshots.glob(f"*/{name}") if p.is_file()), key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1]
    return None


def resolve_file(spec: WeightsFile, pretrained: bool | str | Path, *, model: str) -> Path:
    """One card file: ``$MEDPLAN_WEIGHTS/FILENAME`` (or a filled Hugging Face cache) for
    ``pretrained=True``, else the given path; MedplanError naming the file if absent."""
    try:
        found = resolve_weights(pretrained, spec.filename, url=spec.url, model=model)
    except MedplanError as exc:
        if pretrained is not True or spec.hub_repo is None:
            raise
        found = hub_cache_file(spec.hub_repo, spec.hub_files)
        if found is not None:
            return found
        message = str(exc)[len(exc.path) + 2:] if exc.path else str(exc)
        raise MedplanError(f"{message}; not in the Hugging Face cache ({spec.hub_repo}) either", exc.path) from None
    assert found is not None
    return found


@dataclass
class ResolvedWeights:
    """The files a run will load (checked before the model is built) and those left random."""

    loads: list[tuple[WeightsFile, Path]]
    unloaded: list[WeightsFile] = field(default_factory=list)
    flat: bool = True  # pretrained_report is the one file's report, not a dict of parts


def resolve_card_weights(weights: Weights, pretrained: bool | str | Path | None, options: Mapping[str, Any], *,
                         model: str) -> ResolvedWeights | None:
    """What ``pretrained`` means for a card: None/False nothing; True every file from
    ``$MEDPLAN_WEIGHTS``; a folder every file from it; a file the card's whole-model checkpoint,
    else the first file (the others stay random)."""
    if pretrained is None or pretrained is False:
        return None
    flat = weights.flat_report()
    if pretrained is True:
        return ResolvedWeights([(f, resolve_file(f, True, model=model)) for f in weights.files_for(options)], flat=flat)
    path = Path(pretrained).expanduser()
    if path.is_dir():
        files = weights.files_for(options)
        return ResolvedWeights([(f, resolve_file(f, path / f.filename, model=model)) for f in files], flat=flat)
    if not path.is_file() and not flat:
        names = " and ".join(f.filename for f in weights.files_for(options))
        whole = "a whole-model checkpoint file" if weights.single_file is not None else "a file for the first"
        raise MedplanError(f"pretrained weights for {model} not found: give a folder holding {names}, or {whole}",
                           path)
    if weights.single_file is not None:
        return ResolvedWeights([(weights.single_file, resolve_file(weights.single_file, path, model=model))],
                               flat=False)
    first, *rest = weights.files_for(options)
    return ResolvedWeights([(first, resolve_file(first, path, model=model))], unloaded=rest, flat=flat)


def load_card_weights(model: nn.Module, resolved: ResolvedWeights, weights: Weights, *, name: str,
                      allow_partial: bool = False) -> dict:
    """Load every resolved file into its target submodule; the report kept as ``pretrained_report``."""
    parts: dict[str, Any] = {}
    for spec, path in resolved.loads:
        key_map = spec.key_map_for(list(read_state_dict(path))) if spec.key_map_for is not None else spec.key_map
        report = load_weights(model.get_submodule(spec.target), path, key_map=key_map,
                              strip_prefixes=spec.strip_prefixes, ignore_missing=spec.ignore_missing,
                              allow_partial=allow_partial, adapt_in_channels=spec.adapt_in_channels)
        log.info("%s%s: %s", name, f" {spec.part}" if spec.part else "", report.summary())
        parts[spec.part] = report.as_dict()
    for spec in resolved.unloaded:
        parts[spec.part] = weights.unloaded_note
    return next(iter(parts.values())) if resolved.flat else parts
