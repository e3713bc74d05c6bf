"""Architectures found by name, in the manner of timm's model registry.

A builder is a function ``builder(in_channels, num_classes, **options) -> nn.Module`` whose
module maps ``(B, in_channels, H, W)`` to logits ``(B, num_classes, H, W)`` at the input
resolution (``num_classes`` is the number of output channels: 1 for a BCE head). Builders
register with a decorator::

    @register_model("unet", description="U-Net (Ronneberger 2015)", paper_params_m=31.0)
    def unet(in_channels: int, num_classes: int, *, base_channels: int = 64, depth: int = 4): ...

Built-in builders live in the modules of ``medplan.architectures``; they are imported on the
first lookup, so a new model family is one new file. Third-party packages register through the
entry-point group ``medplan.architectures``::

    [project.entry-points."medplan.architectures"]
    my_net = "my_package.models:build_my_net"     # a builder, registered as "my_net"
    my_zoo = "my_package.zoo"                      # a module that calls register_model on import

Plug-ins are loaded lazily, once; a plug-in that fails to load gives a warning naming it and
the rest of the registry keeps working. A plug-in cannot replace a built-in name.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import pkgutil
import types
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from medplan.errors import MedplanError

ENTRY_POINT_GROUP = "medplan.architectures"
BUILTIN_SOURCE = "medplan"
_PACKAGE = "medplan.architectures"
_NOT_MODEL_MODULES = {"registry"}

Builder = Callable[..., nn.Module]


@dataclass
class ModelEntry:
    """What the registry knows about one architecture."""

    name: str
    builder: Builder
    description: str = ""
    paper_params_m: float | None = None
    pretrained: bool = False  # whether the builder can load pretrained weights (``pretrained=`` option)
    source: str = BUILTIN_SOURCE
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def module(self) -> str:
        return getattr(self.builder, "__module__", "") or ""

    def options(self) -> dict[str, Any]:
        """Keyword options of the builder and their defaults (``"**"`` if it takes any)."""
        out: dict[str, Any] = {}
        for i, p in enumerate(_signature(self.builder).parameters.values()):
            if i < 2 and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                continue  # in_channels, num_classes
            if p.kind is p.VAR_KEYWORD:
                out["**"] = p.name
            elif p.kind is not p.VAR_POSITIONAL:
                out[p.name] = None if p.default is p.empty else p.default
        if self.pretrained:
            out.setdefault("pretrained", False)
        return out


_ENTRIES: dict[str, ModelEntry] = {}
_builtins_imported = False
_plugins_loaded = False
_builtin_failures: dict[str, str] = {}  # module -> reason it failed to import
_loading_source: str | None = None  # set while a plug-in is being imported


def _signature(fn: Callable[..., Any]) -> inspect.Signature:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: accept anything
        return inspect.Signature([inspect.Parameter("options", inspect.Parameter.VAR_KEYWORD)])


def _first_doc_line(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _add_entry(entry: ModelEntry) -> bool:
    """Insert an entry; plug-ins never replace a built-in. Returns whether it was added."""
    old = _ENTRIES.get(entry.name)
    if old is not None and old.builder is not entry.builder:
        if entry.source != BUILTIN_SOURCE and old.source == BUILTIN_SOURCE:
            warnings.warn(
                f"architecture plug-in from {entry.source!r} tries to register {entry.name!r}, "
                f"which is a built-in medplan model; the plug-in's version is ignored",
                RuntimeWarning,
                stacklevel=3,
            )
            return False
        warnings.warn(
            f"architecture {entry.name!r} registered again by {entry.module or entry.source}; "
            f"replacing the one from {old.module or old.source}",
            RuntimeWarning,
            stacklevel=3,
        )
    _ENTRIES[entry.name] = entry
    return True


def register_model(
    name: str | None = None,
    *,
    description: str | None = None,
    paper_params_m: float | None = None,
    pretrained: bool = False,
    **extra: Any,
) -> Callable[[Builder], Builder]:
    """Decorator registering a builder under ``name`` (default: the function's name).

    ``paper_params_m`` is the size reported by the model's paper (millions of parameters),
    shown beside the measured count; ``pretrained`` says the builder accepts
    ``pretrained=True`` (loading weights from local files). ``extra`` keeps any other facts
    (e.g. ``family="cnn"``) for :func:`model_info`.
    """
    if callable(name) and not isinstance(name, str):  # bare @register_model
        return register_model()(name)

    def wrap(fn: Builder) -> Builder:
        entry = ModelEntry(
            name=name or fn.__name__,
            builder=fn,
            description=_first_doc_line(fn) if description is None else description,
            paper_params_m=paper_params_m,
            pretrained=pretrained,
            source=_loading_source or BUILTIN_SOURCE,
            extra=dict(extra),
        )
        _add_entry(entry)
        return fn

    return wrap


def _import_builtins() -> None:
    """Import every module of medplan.architectures so that its builders register."""
    global _builtins_imported
    if _builtins_imported:
        return
    _builtins_imported = True
    package = importlib.import_module(_PACKAGE)
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name in _NOT_MODEL_MODULES:
            continue
        module = f"{_PACKAGE}.{info.name}"
        try:
            importlib.import_module(module)
        except Exception as exc:  # an optional dependency missing must not hide the other models
            _builtin_failures[module] = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"architecture module {module} failed to import: {exc}", RuntimeWarning, stacklevel=2)


def _entry_points() -> Sequence[importlib.metadata.EntryPoint]:
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def _load_one_plugin(ep: importlib.metadata.EntryPoint) -> list[str]:
    global _loading_source
    dist = getattr(ep, "dist", None)
    source = dist.name if dist is not None and getattr(dist, "name", None) else f"entry point {ep.name}"
    before = {n: e.builder for n, e in _ENTRIES.items()}
    _loading_source = source
    try:
        obj = ep.load()
        if isinstance(obj, types.ModuleType):
            pass  # registered itself on import
        elif callable(obj):
            already = [n for n, e in _ENTRIES.items() if e.builder is obj]
            if not already:
                _add_entry(ModelEntry(name=ep.name, builder=obj, description=_first_doc_line(obj), source=source))
        else:
            raise TypeError(f"{ep.value} is neither a builder function nor a module")
    finally:
        _loading_source = None
    return [n for n, e in _ENTRIES.items() if before.get(n) is not e.builder]


def load_plugins(reload: bool = False) -> list[str]:
    """Load the ``medplan.architectures`` entry points (once); returns the names they added."""
    global _plugins_loaded
    _import_builtins()
    if _plugins_loaded and not reload:
        return []
    _plugins_loaded = True
    added: list[str] = []
    try:
        eps = _entry_points()
    except Exception as exc:  # a broken environment must not break the built-ins
        warnings.warn(f"cannot list {ENTRY_POINT_GROUP} entry points: {exc}", RuntimeWarning, stacklevel=2)
        return added
    for ep in eps:
        try:
            added += _load_one_plugin(ep)
        except Exception as exc:
            warnings.warn(
                f"architecture plug-in {ep.name!r} ({ep.value}) failed to load and is skipped: "
                f"{type(exc).__name__}: {exc}",
                RuntimeWarning,
                stacklevel=2,
            )
    return added


def _ensure_loaded() -> None:
    _import_builtins()
    if not _plugins_loaded:
        load_plugins()


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted names of the registered architectures, optionally filtered by a glob pattern."""
    import fnmatch

    _ensure_loaded()
    names = sorted(_ENTRIES)
    return [n for n in names if fnmatch.fnmatchcase(n, pattern)] if pattern else names


def is_model(name: str) -> bool:
    _ensure_loaded()
    return name in _ENTRIES


def get_entry(name: str) -> ModelEntry:
    """The registry entry for ``name``; an unknown name is a MedplanError listing the known ones."""
    _ensure_loaded()
    try:
        return _ENTRIES[name]
    except KeyError:
        pass
    import difflib

    known = sorted(_ENTRIES)
    close = difflib.get_close_matches(str(name), known, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    failed = (
        "; modules that failed to import: " + ", ".join(f"{m} ({r})" for m, r in sorted(_builtin_failures.items()))
        if _builtin_failures
        else ""
    )
    raise MedplanError(f"unknown architecture {name!r}{hint}; known: {', '.join(known)}{failed}")


def model_info(name: str) -> dict[str, Any]:
    """Description, paper size, builder module, options and source of one architecture."""
    entry = get_entry(name)
    return {
        "name": entry.name,
        "description": entry.description,
        "paper_params_m": entry.paper_params_m,
        "pretrained": entry.pretrained,
        "module": entry.module,
        "builder": getattr(entry.builder, "__qualname__", repr(entry.builder)),
        "source": entry.source,
        "options": {k: v for k, v in entry.options().items() if k != "**"},
        **entry.extra,
    }


def _positive_int(value: Any, what: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MedplanError(f"{where}: {what} must be a positive integer, got {value!r}")
    return value


def build_model(name: str, in_channels: int, num_classes: int, **options: Any) -> nn.Module:
    """Build architecture ``name`` for ``in_channels`` inputs and ``num_classes`` output channels.

    Options the builder does not take are a MedplanError naming the model and the option.
    ``pretrained=False`` is accepted by every model (a no-op for those without weights), so
    callers can pass the run's choice uniformly; ``pretrained=True`` for a model without
    pretrained weights is an error, never a silent fall-back.
    """
    entry = get_entry(name)
    _positive_int(in_channels, "in_channels", f"architecture {name!r}")
    _positive_int(num_classes, "num_classes", f"architecture {name!r}")
    options = dict(options)
    if not entry.pretrained and "pretrained" in options:
        if options.pop("pretrained"):
            raise MedplanError(f"architecture {name!r} has no pretrained weights; use pretrained=False (--no-pretrained)")
    accepted = entry.options()
    if "**" not in accepted:
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            valid = ", ".join(k for k in accepted) or "none"
            raise MedplanError(
                f"architecture {name!r} has no option {', '.join(map(repr, unknown))} (its options: {valid})"
            )
    model = entry.builder(in_channels, num_classes, **options)
    if not isinstance(model, nn.Module):
        raise MedplanError(f"builder of architecture {name!r} returned {type(model).__name__}, not an nn.Module")
    return model


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total, trainable and frozen parameter counts (shared parameters counted once)."""
    total = trainable = 0
    for p in model.parameters():
        n = p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return {"total": total, "trainable": trainable, "frozen": total - trainable}


def count_flops(model: nn.Module, in_channels: int, size: tuple[int, int], device: str | torch.device = "meta") -> int:
    """FLOPs of one forward pass at batch 1 (FlopCounterMode counts a multiply-add as 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    x = torch.zeros(1, in_channels, int(size[0]), int(size[1]), device=device)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def _build_for_description(name: str, entry: ModelEntry, in_channels: int, num_classes: int, device: str) -> nn.Module:
    options = {"pretrained": False} if entry.pretrained else {}
    if device == "meta":
        with torch.device("meta"):
            return build_model(name, in_channels, num_classes, **options)
    return build_model(name, in_channels, num_classes, **options)


def describe_models(
    names: Iterable[str] | None = None,
    *,
    size: tuple[int, int] = (512, 512),
    in_channels: int = 3,
    num_classes: int = 2,
    flops: bool = False,
) -> list[dict[str, Any]]:
    """One dict per architecture: registry facts, measured parameter counts and, on request, GMACs.

    Models are built on the ``meta`` device (no memory, no weights loaded) and fall back to
    the CPU when a builder or forward does not support it. A model that fails to build gets an
    ``error`` entry instead of stopping the listing.
    """
    _ensure_loaded()
    _positive_int(in_channels, "in_channels", "cannot describe models")
    _positive_int(num_classes, "num_classes", "cannot describe models")
    if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size):
        raise MedplanError(f"size must be two positive integers (H, W), got {tuple(size)!r}")
    selected = list_models() if names is None else list(names)
    for n in selected:
        get_entry(n)  # unknown names fail up front
    out: list[dict[str, Any]] = []
    for name in selected:
        entry = get_entry(name)
        info = model_info(name)
        row: dict[str, Any] = {
            "name": name,
            "description": info["description"],
            "source": info["source"],
            "module": info["module"],
            "pretrained": info["pretrained"],
            "paper_params_m": info["paper_params_m"],
            "in_channels": in_channels,
            "num_classes": num_classes,
            "params_total": None,
            "params_trainable": None,
            "params_m": None,
            "gmacs": None,
            "flops_size": list(size) if flops else None,
            "error": None,
        }
        model = None
        device = "meta"
        for device in ("meta", "cpu"):
            try:
                model = _build_for_description(name, entry, in_channels, num_classes, device)
                break
            except Exception as exc:  # reported in the row, not raised: one bad model must not hide the rest
                row["error"] = f"build failed: {type(exc).__name__}: {exc}"
        if model is None:
            out.append(row)
            continue
        row["error"] = None
        counts = count_parameters(model)
        row.update(params_total=counts["total"], params_trainable=counts["trainable"], params_m=round(counts["total"] / 1e6, 2))
        if flops:
            try:
                try:
                    n_flops = count_flops(model, in_channels, size, device)
                except Exception:
                    if device != "meta":
                        raise
                    model = _build_for_description(name, entry, in_channels, num_classes, "cpu")
                    n_flops = count_flops(model, in_channels, size, "cpu")
                row["gmacs"] = round(n_flops / 2 / 1e9, 2)
            except Exception as exc:
                row["error"] = f"FLOP count failed: {type(exc).__name__}: {exc}"
        out.append(row)
    return out
