"""Architectures found by name, in the manner of timm's model registry.

A builder is a function ``builder(in_channels, num_outputs, **options) -> nn.Module`` whose
module maps ``(B, in_channels, H, W)`` to logits ``(B, num_outputs, H, W)``. ``num_outputs``
is the number of output channels (the plan's ``num_outputs``: 1 for a BCE head, the number of
classes for CE); the built-in builders still name that parameter ``num_classes``. Builders
register with a decorator, their facts in a model card (:mod:`medplan.architectures.card`)::

    UNET = ModelCard(paper_params_m=31.0, input=InputContract(pad_to_multiple=lambda m: 2 ** m.depth),
                     test_options={"base_channels": 8, "depth": 3})

    @register_model("unet", card=UNET, description="U-Net (Ronneberger 2015)")
    def unet(in_channels: int, num_classes: int, *, base_channels: int = 64, depth: int = 4): ...

:func:`build_model` applies the card once for every model: ``pretrained``/``allow_partial``
(for a card with weights) resolve, load and report the weights; the input contract makes any
input size work; the trainer takes the card's parameter groups and deviations.

Built-in builders live in the modules of ``medplan.architectures``; they are imported on the
first lookup, so a new model family is one new file. Third-party packages register through the
entry-point group ``medplan.architectures``::

    [project.entry-points."medplan.architectures"]
    my_net = "my_package.models:build_my_net"     # a builder, registered as "my_net"
    my_zoo = "my_package.zoo"                      # a module that calls register_model on import

The registry is a :class:`medplan.registry.Registry`: plug-ins are loaded lazily, once; one that
fails to load gives a warning naming it; a name registered twice is an error (a plug-in can
never replace a built-in); an unknown name suggests close ones.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable

import torch
from torch import nn

from medplan.architectures.card import ModelCard, Weights, apply_input_contract, parameter_groups
from medplan.architectures.pretrained import load_card_weights, resolve_card_weights
from medplan.errors import MedplanError
from medplan.catalog import ARCHITECTURE_PLUGINS
from medplan.registry import BUILTIN, Registry

ENTRY_POINT_GROUP = ARCHITECTURE_PLUGINS
BUILTIN_SOURCE = BUILTIN
_PACKAGE = "medplan.architectures"
_NOT_MODEL_MODULES = {"registry", "card", "pretrained", "measure"}
#: options build_model handles for a card with weights (the builder never sees them)
WEIGHT_OPTIONS = ("pretrained", "allow_partial")

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelEntry:
    """What the registry knows about one architecture: its builder and its card."""

    name: str
    builder: Builder
    description: str = ""
    card: ModelCard = field(default_factory=ModelCard)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def module(self) -> str:
        return getattr(self.builder, "__module__", "") or ""

    @property
    def paper_params_m(self) -> float | None:
        return self.card.paper_params_m

    @property
    def pretrained(self) -> bool:
        """Whether the model can load pretrained weights (``pretrained=`` option)."""
        return self.card.weights is not None

    @property
    def external(self) -> str:
        """Who trains and runs the architecture when medplan does not (``""``: medplan builds it)."""
        return self.card.external

    @property
    def source(self) -> str:
        return MODELS.entry(self.name).source if self.name in MODELS else BUILTIN

    def _weights_by_card(self) -> bool:
        return self.card.weights is not None and not self.card.weights.by_builder

    def options(self) -> dict[str, Any]:
        """Keyword options and their defaults (``"**"`` if the builder takes any), the card's
        ``pretrained``/``allow_partial`` included."""
        out: dict[str, Any] = {}
        for i, p in enumerate(_signature(self.builder).parameters.values()):
            if i < 2 and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                continue  # in_channels, num_outputs
            if p.kind is p.VAR_KEYWORD:
                out["**"] = p.name
            elif p.kind is not p.VAR_POSITIONAL:
                out[p.name] = None if p.default is p.empty else p.default
        if self._weights_by_card():
            out = {**dict.fromkeys(WEIGHT_OPTIONS, False), **out}
        elif self.pretrained:
            out.setdefault("pretrained", False)
        return out

    def resolved_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """The builder's defaults updated with ``options`` (what the card's functions see)."""
        return {**{k: v for k, v in self.options().items() if k != "**"}, **options}


def _from_plugin(name: str, obj: Any) -> ModelEntry:
    if not callable(obj):
        raise TypeError(f"{obj!r} is neither a builder function nor a module")
    return ModelEntry(name=name, builder=obj, description=_first_doc_line(obj))


def _builtin_modules() -> list[str]:
    """Every module of medplan.architectures (so that its builders register)."""
    package = importlib.import_module(_PACKAGE)  # initialised by the time of the first lookup
    return [f"{_PACKAGE}.{info.name}" for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name)
            if not info.name.startswith("_") and info.name not in _NOT_MODEL_MODULES]


#: the architectures: name -> :class:`ModelEntry`
MODELS: Registry[ModelEntry] = Registry("architecture", group=ENTRY_POINT_GROUP, builtins=_builtin_modules,
                                        identity=lambda entry: entry.builder, from_plugin=_from_plugin)


def _signature(fn: Callable[..., Any]) -> inspect.Signature:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: accept anything
        return inspect.Signature([inspect.Parameter("options", inspect.Parameter.VAR_KEYWORD)])


def _first_doc_line(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def register_model(
    name: str | None = None,
    *,
    card: ModelCard | None = None,
    description: str | None = None,
    paper_params_m: float | None = None,
    pretrained: bool = False,
    **extra: Any,
) -> Callable[[Builder], Builder]:
    """Decorator registering a builder under ``name`` (default: the function's name) with its card.

    ``paper_params_m`` and ``pretrained`` are shortcuts for a card without one (a plug-in's
    builder that takes ``pretrained=`` and loads its own weights). ``extra`` keeps any other
    facts (e.g. ``family="cnn"``) for :func:`model_info`.
    """
    if callable(name) and not isinstance(name, str):  # bare @register_model
        return register_model()(name)
    card = card or ModelCard()
    if paper_params_m is not None:
        card = replace(card, paper_params_m=paper_params_m)
    if pretrained and card.weights is None:
        card = replace(card, weights=Weights(by_builder=True))

    def wrap(fn: Builder) -> Builder:
        key = name or fn.__name__
        text = _first_doc_line(fn) if description is None else description
        MODELS.add(key, ModelEntry(name=key, builder=fn, description=text, card=card, extra=dict(extra)))
        return fn

    return wrap


def load_plugins(reload: bool = False) -> list[str]:
    """Load the ``medplan.architectures`` entry points (once); returns the names they added."""
    return MODELS.load_plugins(reload)


def list_models(pattern: str | None = None, *, external: bool = True) -> list[str]:
    """Sorted names of the registered architectures, optionally filtered by a glob pattern;
    ``external=False`` leaves out those medplan builds no network for (``nnunetv2``)."""
    names = MODELS.names(pattern)
    return names if external else [n for n in names if not MODELS[n].external]


def is_model(name: str) -> bool:
    return name in MODELS


def get_entry(name: str) -> ModelEntry:
    """The registry entry for ``name``; an unknown name is a MedplanError suggesting close ones."""
    return MODELS[name]


def model_card(name: str) -> ModelCard:
    """The card of architecture ``name``."""
    return get_entry(name).card


def model_info(name: str) -> dict[str, Any]:
    """Description, paper size, builder module, options, weights and source of one architecture."""
    entry = get_entry(name)
    card = entry.card
    return {
        "name": entry.name,
        "description": entry.description,
        "paper_params_m": entry.paper_params_m,
        "pretrained": entry.pretrained,
        "module": entry.module,
        "builder": getattr(entry.builder, "__qualname__", repr(entry.builder)),
        "source": entry.source,
        "options": {k: v for k, v in entry.options().items() if k != "**"},
        "weights": [] if card.weights is None else card.weights.filenames(entry.resolved_options({})),
        "internal_size": card.input.internal_size_for(entry.resolved_options({})),
        "external": card.external or None,
        **entry.extra,
    }


def model_internal_size(name: str, options: dict[str, Any] | None = None) -> tuple[int, int] | None:
    """The fixed (H, W) the card runs ``name`` at for these builder options (HiFormer: ``img_size``), or None."""
    entry = get_entry(name)
    return entry.card.input.internal_size_for(entry.resolved_options(dict(options or {})))


def model_deviations(name: str, options: dict[str, Any] | None = None,
                     planned_size: Iterable[int] | None = None) -> list[str]:
    """What the benchmark changes for ``name`` against the shared protocol (config.json's ``deviations``)."""
    entry = get_entry(name)
    return entry.card.deviation_notes(entry.resolved_options(dict(options or {})),
                                      None if planned_size is None else list(planned_size))


def model_parameter_groups(name: str, model: nn.Module, lr: float) -> list[dict]:
    """Optimizer parameter groups of a built ``name`` model, as its card declares them."""
    return parameter_groups(model, lr, model_card(name).param_groups)


def _positive_int(value: Any, what: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MedplanError(f"{where}: {what} must be a positive integer, got {value!r}")
    return value


def build_model(name: str, in_channels: int, num_outputs: int | None = None, **options: Any) -> nn.Module:
    """Build architecture ``name`` for ``in_channels`` inputs and ``num_outputs`` output channels.

    The card is applied once: for a card with weights, ``pretrained`` (False, True: the
    documented files in ``$MEDPLAN_WEIGHTS``, or a file/folder path) and ``allow_partial``
    are resolved before the build and loaded after it, the report kept as
    ``model.pretrained_report``; the input contract is installed, so the model maps any
    (B, C, H, W) to (B, num_outputs, H, W). Options the builder does not take are a
    MedplanError naming the model and the option. ``pretrained=False`` is accepted by every
    model, so callers can pass the run's choice uniformly; ``pretrained=True`` for a model
    without weights is an error, never a silent fall-back. (``num_classes=`` is accepted as
    the old name of ``num_outputs``.)
    """
    if num_outputs is None and "num_classes" in options:
        num_outputs = options.pop("num_classes")
    entry = get_entry(name)
    card = entry.card
    if card.external:
        raise MedplanError(f"architecture {name!r} is trained and run by {card.external}, outside medplan; "
                           "medplan builds no network for it")
    _positive_int(in_channels, "in_channels", f"architecture {name!r}")
    _positive_int(num_outputs, "num_outputs (num_classes)", f"architecture {name!r}")
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
    by_card = entry._weights_by_card()
    pretrained = options.pop("pretrained", False) if by_card else False
    allow_partial = bool(options.pop("allow_partial", False)) if by_card else False
    resolved = entry.resolved_options(options)
    weights = resolve_card_weights(card.weights, pretrained, resolved, model=name) if by_card else None
    model = entry.builder(in_channels, num_outputs, **options)
    if not isinstance(model, nn.Module):
        raise MedplanError(f"builder of architecture {name!r} returned {type(model).__name__}, not an nn.Module")
    if by_card:
        model.pretrained_report = None if weights is None else load_card_weights(
            model, weights, card.weights, name=name, allow_partial=allow_partial)
    if card.after_weights is not None:
        card.after_weights(model)
    return apply_input_contract(model, card.input, resolved)


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
        if entry.external:  # nothing to build: its own code plans its network per dataset
            row["description"] += f" [external: {entry.external}; no size before it is planned]"
            out.append(row)
            continue
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


# ----------------------------------------------------------------------------- external architectures
def _nnunetv2(in_channels: int, num_classes: int, *, trainer: str = "nnUNetTrainer", planner: str = "ExperimentPlanner",
              plans: str = "nnUNetPlans", configuration: str = "2d", dataset_id: int | None = None) -> nn.Module:
    """nnU-Net v2 itself (Isensee 2021), trained by its own code on medplan's folds (pip install medplan[nnunet])."""
    raise MedplanError("nnunetv2 is trained and run by nnU-Net v2; medplan builds no network for it")


#: the options are what its trainer (medplan.trainers.nnunetv2) passes to nnU-Net's commands
MODELS.add("nnunetv2", ModelEntry(name="nnunetv2", builder=_nnunetv2, description=_first_doc_line(_nnunetv2),
                                  card=ModelCard(external="nnU-Net v2"), extra={"family": "external"}))
