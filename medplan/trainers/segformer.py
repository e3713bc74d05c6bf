"""Trainers of the SegFormer family: the authors' parameter groups inside the shared protocol.

* ``segformer_b3`` - the official config (NVlabs ``segformer.b3.512x512.ade.160k.py``) builds
  AdamW with ``paramwise_cfg=dict(custom_keys={'pos_block': dict(decay_mult=0.), 'norm':
  dict(decay_mult=0.), 'head': dict(lr_mult=10.)})``: parameters whose name holds ``norm`` get no
  weight decay, the decode head learns 10x faster. mmcv applies the first matching key (longest
  first, ties in the given order), so a head parameter named ``norm`` would keep the base LR.
* ``vwformer_mit_b3`` - the VWFormer repository has no MiT config; VWFormer replaces SegFormer's
  decoder and is trained as SegFormer, so the same groups apply (an assumption, recorded).
* ``vwformer_convnext_s`` - the reference config (``vw_convnext_small_*``) builds AdamW with
  mmseg's ``LearningRateDecayOptimizerConstructor`` (``decay_type='stage_wise'``,
  ``decay_rate=0.9``, ``num_layers=12``): stem and downsampling layers get 0.9^13 of the LR,
  stage ``i`` 0.9^(12 - i), everything else (output norms, head) the full LR; 1-D tensors and
  biases get no weight decay.

The LR itself, its schedule, the weight decay value and everything else follow the plan
(the reference configs' LR 6e-5/1e-4, poly schedule with warm-up and weight decay 0.05 for
ConvNeXt are replaced by the paper's unified protocol). Drop-path rates are the models'
defaults (MiT 0.1, ConvNeXt-S 0.4, from the same configs).
"""
from __future__ import annotations

import re

from torch import nn

from medplan.trainers.base import Trainer
from medplan.trainers.registry import register_trainer

HEAD_LR_MULT = 10.0
SEGFORMER_DEVIATION = ("AdamW parameter groups of the official SegFormer config: decode head LR x10 "
                       "(head lr_mult=10), no weight decay for parameters named 'norm' (decay_mult=0)")
VW_MIT_DEVIATION = (SEGFORMER_DEVIATION + "; assumed for VWFormer on MiT-B3, whose configuration the VWFormer "
                    "repository does not include")
CONVNEXT_DECAY_RATE = 0.9
CONVNEXT_NUM_LAYERS = 12
CONVNEXT_DEVIATION = ("AdamW parameter groups of the VWFormer ConvNeXt config (mmseg "
                      "LearningRateDecayOptimizerConstructor, stage_wise, decay_rate 0.9, num_layers 12): stem and "
                      "downsampling x0.9^13, stage i x0.9^(12-i), head and output norms x1; no weight decay for "
                      "biases and 1-D tensors")


def _merge(groups: dict[tuple, dict]) -> list[dict]:
    """Non-empty groups, those at the base LR first (the epoch log shows group 0's LR), then by scale."""
    ordered = sorted(groups.items(), key=lambda kv: (kv[0][0] != 1.0, -kv[0][0], kv[0][1]))
    return [g for _, g in ordered if g["params"]]


def custom_keys_groups(model: nn.Module, lr: float, *, backbone_prefixes: tuple[str, ...],
                       head_lr_mult: float = HEAD_LR_MULT) -> list[dict]:
    """mmcv's custom keys ``{'pos_block': decay 0, 'norm': decay 0, 'head': lr x10}`` on our names:
    every parameter outside the backbone is "head" (mmseg's ``decode_head``)."""
    groups: dict[tuple, dict] = {}
    for name, param in model.named_parameters():  # frozen ones too (see the base hook)
        if "pos_block" in name or "norm" in name:
            key = (1.0, "no_decay")
        elif not name.startswith(backbone_prefixes):
            key = (head_lr_mult, "head")
        else:
            key = (1.0, "decay")
        group = groups.setdefault(key, {"params": [], "lr": lr * key[0], "lr_scale": key[0], "name": key[1]})
        if key[1] == "no_decay":
            group["weight_decay"] = 0.0
        group["params"].append(param)
    return _merge(groups)


def convnext_stage_id(name: str, max_stage_id: int) -> int:
    """mmseg's ``get_stage_id_for_convnext`` on timm's names (``stem`` / ``stages.i.downsample`` are
    mmcls' ``downsample_layers``)."""
    if name.startswith("backbone.stem.") or re.match(r"backbone\.stages\.\d+\.downsample\.", name):
        return 0
    if m := re.match(r"backbone\.stages\.(\d+)\.", name):
        return int(m[1]) + 1
    return max_stage_id - 1


def stage_wise_groups(model: nn.Module, lr: float, *, decay_rate: float = CONVNEXT_DECAY_RATE,
                      num_layers: int = CONVNEXT_NUM_LAYERS) -> list[dict]:
    """mmseg's LearningRateDecayOptimizerConstructor, ``decay_type='stage_wise'``."""
    num_layers += 2
    groups: dict[tuple, dict] = {}
    for name, param in model.named_parameters():
        no_decay = param.ndim == 1 or name.endswith(".bias")
        layer_id = convnext_stage_id(name, num_layers)
        scale = decay_rate ** (num_layers - layer_id - 1)
        key = (scale, f"layer_{layer_id}_{'no_decay' if no_decay else 'decay'}")
        group = groups.setdefault(key, {"params": [], "lr": lr * scale, "lr_scale": scale, "name": key[1]})
        if no_decay:
            group["weight_decay"] = 0.0
        group["params"].append(param)
    return _merge(groups)


@register_trainer("segformer_b3")
class SegFormerTrainer(Trainer):
    """Shared protocol; head LR x10 and no weight decay on norms (the official SegFormer config)."""

    deviations = [SEGFORMER_DEVIATION]
    backbone_prefixes: tuple[str, ...] = ("encoder.",)

    def parameter_groups(self, model: nn.Module) -> list[dict]:
        return custom_keys_groups(model, self.lr, backbone_prefixes=self.backbone_prefixes)


@register_trainer("vwformer_mit_b3")
class VWFormerMiTTrainer(SegFormerTrainer):
    """VWFormer on MiT-B3: SegFormer's groups (backbone = ``backbone.``)."""

    deviations = [VW_MIT_DEVIATION]
    backbone_prefixes = ("backbone.",)


@register_trainer("vwformer_convnext_s")
class VWFormerConvNeXtTrainer(Trainer):
    """VWFormer on ConvNeXt-S: stage-wise LR decay 0.9 and no weight decay on biases and 1-D tensors."""

    deviations = [CONVNEXT_DEVIATION]

    def parameter_groups(self, model: nn.Module) -> list[dict]:
        return stage_wise_groups(model, self.lr)
