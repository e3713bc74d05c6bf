"""Model cards: the facts about an architecture that are not its layers (timm's ``pretrained_cfg``).

A :class:`ModelCard` is kept beside its builder and given to ``register_model``; it says

* **weights** (:class:`Weights`): the file(s) in ``$MEDPLAN_WEIGHTS``, where they are
  published, which submodule each loads into, its key map and what may be missing, whether a
  filled Hugging Face cache may stand in, how RGB weights meet a gray input;
* **input contract** (:class:`InputContract`): pad to a multiple of N (bottom/right, logits
  cropped back), or a fixed internal size such as 224x224 (bilinear there and back);
* **parameter groups** (:class:`ParamGroups`): no-weight-decay names, head LR factor,
  layer-wise LR decay, as the authors' optimizer configs;
* the **paper size** (Table 1, millions of parameters), the benchmark's **deviations** for
  the model (written to ``config.json``) and the **tiny test options** the contract tests
  build it with.

:func:`medplan.architectures.build_model` applies a card once for every model: it resolves
and loads the weights (:func:`medplan.architectures.pretrained.load_card_weights`), installs the
input contract (:func:`apply_input_contract`) and the trainer takes its optimizer groups from
:func:`parameter_groups`.

A builder's second argument is the number of **output channels** (the plan's
``num_outputs``: 1 for a BCE head, the number of classes for CE), historically named
``num_classes`` in the builders' signatures.
"""
from __future__ import annotations

import functools
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

KeyMap = Callable[[str], "str | None"]

#: wrapper prefixes stripped from checkpoint keys unless a file says otherwise
STRIP_PREFIXES = ("module.", "backbone.", "encoder.")
#: file names of a Hugging Face model repository, in the order they are looked for
HUB_FILES = ("model.safetensors", "pytorch_model.bin")


# ----------------------------------------------------------------------------- weights
@dataclass(frozen=True)
class WeightsFile:
    """One pretrained file: where it is, where it goes, how its keys are read."""

    filename: str                       # the name in $MEDPLAN_WEIGHTS (or in a folder given as pretrained=DIR)
    url: str                            # where it is published (shown when it is missing)
    target: str = ""                    # the submodule that receives the tensors ("" = the whole model)
    part: str = ""                      # its name in a multi-file pretrained_report ("swin", "resnet", ...)
    key_map: KeyMap | None = None       # checkpoint key -> module key (None drops the key)
    key_map_for: Callable[[list[str]], KeyMap] | None = None  # a key map chosen from the file's keys
    strip_prefixes: tuple[str, ...] = STRIP_PREFIXES
    ignore_missing: tuple[str, ...] = ()  # regexes of target keys the file may lack (new layers)
    adapt_in_channels: bool = True      # RGB first conv summed to one channel for a gray input
    hub_repo: str | None = None         # a filled Hugging Face cache of this repo stands in for the file
    hub_files: tuple[str, ...] = HUB_FILES


@dataclass(frozen=True)
class Weights:
    """An architecture's pretrained weights.

    ``files`` (or a function of the builder options returning them, e.g. the ResNet file of
    the chosen depth) are all loaded for ``pretrained=True`` (from ``$MEDPLAN_WEIGHTS``) and
    ``pretrained=DIR`` (from that folder). ``pretrained=FILE`` loads ``single_file`` when the
    card has one (a whole-model checkpoint), else that file as the first of ``files``; the
    other files then stay random, reported as ``unloaded_note``. ``by_builder``: the builder
    loads them itself (it takes ``pretrained``/``allow_partial``), e.g. one layer of a Hugging
    Face folder that also defines the architecture.
    """

    files: tuple[WeightsFile, ...] | Callable[[Mapping[str, Any]], tuple[WeightsFile, ...]] = ()
    single_file: WeightsFile | None = None
    unloaded_note: str = "random init"
    by_builder: bool = False
    folder: str = ""                    # by_builder: the folder name in $MEDPLAN_WEIGHTS (for listings)

    def files_for(self, options: Mapping[str, Any]) -> tuple[WeightsFile, ...]:
        return tuple(self.files(options) if callable(self.files) else self.files)

    def flat_report(self) -> bool:
        """One file and no alternative: ``pretrained_report`` is that file's report, not a dict of parts."""
        return not callable(self.files) and len(self.files) == 1 and self.single_file is None

    def filenames(self, options: Mapping[str, Any] | None = None) -> list[str]:
        """The documented file names (with the default options)."""
        if self.by_builder:
            return [self.folder] if self.folder else []
        try:
            return [f.filename for f in self.files_for(options or {})]
        except Exception:  # a card whose files depend on options it cannot default
            return []


# ----------------------------------------------------------------------------- input contract
@dataclass(frozen=True)
class InputContract:
    """What the network needs of its input size; :func:`apply_input_contract` makes any size work.

    ``pad_to_multiple``: an int, or a function of the built model giving an int or (H, W)
    multiples (e.g. ``2 ** depth``); inputs are zero-padded bottom/right and every output
    cropped back to its share of the input. ``internal_size``: an int, or a function of the
    builder options (e.g. ``img_size``); inputs are resized bilinearly to it and the logits
    back. ``label`` names the model in the internal-size deviation note.
    """

    pad_to_multiple: int | Callable[[nn.Module], int | Sequence[int]] | None = None
    internal_size: int | Callable[[Mapping[str, Any]], int] | None = None
    label: str = ""

    def internal_size_for(self, options: Mapping[str, Any]) -> tuple[int, int] | None:
        if self.internal_size is None:
            return None
        side = self.internal_size(options) if callable(self.internal_size) else self.internal_size
        return (int(side), int(side))

    def multiple_for(self, model: nn.Module) -> tuple[int, int] | None:
        if self.pad_to_multiple is None:
            return None
        m = self.pad_to_multiple(model) if callable(self.pad_to_multiple) else self.pad_to_multiple
        mh, mw = (m, m) if isinstance(m, int) else (int(m[0]), int(m[1]))
        return None if mh == mw == 1 else (int(mh), int(mw))

    def notes(self, options: Mapping[str, Any], planned_size: Sequence[int] | None) -> list[str]:
        """The deviation a fixed internal size is (written to config.json by the trainer)."""
        size = self.internal_size_for(options)
        if size is None:
            return []
        planned = "x".join(str(int(s)) for s in (planned_size or ()))
        return [f"network runs at {size[0]}x{size[1]} internally: batches at the planned input size ({planned}) are "
                f"resized bilinearly to {size[0]}x{size[1]} and the logits resized back before the loss, in "
                f"validation and in prediction (the benchmark paper's deviation for {self.label})"]


@dataclass(frozen=True)
class AppliedContract:
    """An input contract resolved for one built model (what its ``forward`` wrapper does)."""

    multiple: tuple[int, int] | None = None
    internal_size: tuple[int, int] | None = None

    def __call__(self, forward: Callable[..., Any], x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        h, w = x.shape[-2:]
        if self.internal_size is not None:
            ih, iw = self.internal_size
            if (h, w) == (ih, iw):
                return forward(x, *args, **kwargs)
            out = forward(F.interpolate(x, size=(ih, iw), mode="bilinear", align_corners=False), *args, **kwargs)
            return _each(out, lambda o: F.interpolate(o, size=(round(h * o.shape[-2] / ih), round(w * o.shape[-1] / iw)),
                                                      mode="bilinear", align_corners=False))
        if self.multiple is not None:
            ph, pw = (-h) % self.multiple[0], (-w) % self.multiple[1]
            if ph or pw:
                hp, wp = h + ph, w + pw
                out = forward(F.pad(x, (0, pw, 0, ph)), *args, **kwargs)
                # each output (deep supervision: also the coarser ones) keeps its share of the input
                return _each(out, lambda o: o[..., :-(-h * o.shape[-2] // hp), :-(-w * o.shape[-1] // wp)])
        return forward(x, *args, **kwargs)


def _each(out: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, (list, tuple)):
        return type(out)(_each(o, fn) for o in out)
    return out


def _contract_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    # a partial, not ``type(self).forward.__get__(self)``: torch.compile resuming after a graph
    # break inside the class's forward rebuilt that bound method as this one (endless recursion)
    return self.input_contract(functools.partial(type(self).forward, self), x, *args, **kwargs)


def apply_input_contract(model: nn.Module, contract: InputContract, options: Mapping[str, Any]) -> nn.Module:
    """Make ``model`` map (B, C, H, W) to (B, K, H, W) at any size, as ``contract`` says.

    The module is not wrapped (its state-dict keys, attributes and type stay); its ``forward``
    is bound to one that pads/resizes around the class's own, and ``model.input_contract``
    records what it does. Inputs that already fit pass through untouched."""
    applied = AppliedContract(contract.multiple_for(model), contract.internal_size_for(options))
    if applied.multiple is None and applied.internal_size is None:
        return model
    model.input_contract = applied
    model.forward = types.MethodType(_contract_forward, model)
    return model


# ----------------------------------------------------------------------------- parameter groups
@dataclass(frozen=True)
class LayerDecay:
    """Layer-wise LR decay (mmseg's LearningRateDecayOptimizerConstructor): a parameter of layer
    ``i`` gets ``rate ** (num_layers + 1 - i)`` of the LR; ``layer_id(name, num_layers + 2)`` says its layer."""

    rate: float
    num_layers: int
    layer_id: Callable[[str, int], int]


@dataclass(frozen=True)
class ParamGroups:
    """AdamW parameter groups as the authors' configs build them (mmcv ``paramwise_cfg``).

    ``no_weight_decay(name, param)``: parameters without weight decay (they keep the base LR,
    as mmcv applies the first matching custom key); ``head_lr_factor``: LR factor of every
    parameter whose name does not start with one of ``backbone`` (the decode head);
    ``layer_decay``: layer-wise LR decay instead of a head factor.
    """

    no_weight_decay: Callable[[str, torch.Tensor], bool] | None = None
    head_lr_factor: float = 1.0
    backbone: tuple[str, ...] = ()
    layer_decay: LayerDecay | None = None


def parameter_groups(model: nn.Module, lr: float, spec: ParamGroups | None) -> list[dict]:
    """Optimizer groups of ``model`` for base LR ``lr``; one group of everything without a spec.

    Frozen parameters stay in the groups, so unfreezing them later needs no new optimizer.
    Empty groups are dropped; those at the base LR come first (the epoch log shows group 0's LR)."""
    if spec is None:
        return [{"params": list(model.parameters())}]
    groups: dict[tuple[float, str], dict] = {}
    for name, param in model.named_parameters():
        no_decay = spec.no_weight_decay is not None and bool(spec.no_weight_decay(name, param))
        if spec.layer_decay is not None:
            ld = spec.layer_decay
            layer = ld.layer_id(name, ld.num_layers + 2)
            key = (ld.rate ** (ld.num_layers + 1 - layer), f"layer_{layer}_{'no_decay' if no_decay else 'decay'}")
        elif no_decay:
            key = (1.0, "no_decay")
        elif spec.head_lr_factor != 1.0 and not name.startswith(spec.backbone):
            key = (float(spec.head_lr_factor), "head")
        else:
            key = (1.0, "decay")
        group = groups.setdefault(key, {"params": [], "lr": lr * key[0], "lr_scale": key[0], "name": key[1]})
        if no_decay:
            group["weight_decay"] = 0.0
        group["params"].append(param)
    ordered = sorted(groups.items(), key=lambda kv: (kv[0][0] != 1.0, -kv[0][0], kv[0][1]))
    return [g for _, g in ordered if g["params"]]


# ----------------------------------------------------------------------------- the card
@dataclass(frozen=True)
class ModelCard:
    """Everything medplan knows about an architecture besides its layers (see the module docstring).

    ``paper_params_m``: Table 1's size in millions (``paper_params_tolerance``: the relative
    difference the contract test accepts for the full-size model, built on the meta device
    unless ``count_on_meta`` is False). ``test_options``: builder options of a tiny model for
    the contract tests (``test_sizes``: the even and odd input sizes they run). ``deviations``:
    what the benchmark changes for this model against the shared protocol (config.json).
    ``find_unused_parameters``: the forward skips parameters (DDP must not wait for them).
    ``after_weights(model)``: runs after the weights step (e.g. a reference re-initialisation).
    """

    paper_params_m: float | None = None
    paper_params_tolerance: float = 0.05
    weights: Weights | None = None
    input: InputContract = InputContract()
    param_groups: ParamGroups | None = None
    deviations: tuple[str, ...] = ()
    find_unused_parameters: bool = False
    after_weights: Callable[[nn.Module], None] | None = None
    test_options: Mapping[str, Any] = field(default_factory=dict)
    test_sizes: tuple[tuple[int, int], ...] = ((64, 64), (45, 67))
    count_on_meta: bool = True
    #: who trains and runs the architecture when medplan does not (``"nnU-Net v2"``): medplan
    #: builds no network for it (no builder call, no size, no contract tests); its trainer runs it
    external: str = ""

    @property
    def pretrained(self) -> bool:
        return self.weights is not None

    def deviation_notes(self, options: Mapping[str, Any], planned_size: Sequence[int] | None) -> list[str]:
        """This model's deviations from the shared protocol, as config.json lists them."""
        return [*self.input.notes(options, planned_size), *self.deviations]


__all__ = ["AppliedContract", "HUB_FILES", "InputContract", "LayerDecay", "ModelCard", "ParamGroups", "STRIP_PREFIXES",
           "Weights", "WeightsFile", "apply_input_contract", "parameter_groups"]
