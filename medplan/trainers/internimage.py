"""InternImage-T trainer: the shared protocol with the authors' weight-decay exemptions.

The authors' segmentation config (``upernet_internimage_t_512_160k_ade20k.py``) builds the
AdamW groups with ``CustomLayerDecayOptimizerConstructor`` and ``layer_decay_rate=1.0``: no
layer-wise learning-rate decay (every group keeps the base LR), but no weight decay for
one-dimensional tensors, biases and normalisation parameters (LayerNorm/BatchNorm weights,
layer-scale ``gamma``). That exemption is the only optimizer difference kept here; the LR,
its schedule, the weight decay of the other tensors and everything else follow the plan.
Drop path 0.2, also from that config, is the model's default (``medplan.architectures.internimage``).
"""
from __future__ import annotations

from torch import nn

from medplan.trainers.base import Trainer
from medplan.trainers.registry import register_trainer

WEIGHT_DECAY_DEVIATION = ("no weight decay on biases, normalisation and layer-scale parameters (1-D tensors), as "
                          "the authors' CustomLayerDecayOptimizerConstructor (layer_decay_rate=1.0: no layer-wise "
                          "LR decay); other tensors use the plan's weight decay")


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """The reference constructor's rule: 1-D tensors, biases and anything named ``norm``."""
    return param.ndim <= 1 or name.endswith(".bias") or "norm" in name


@register_trainer("internimage_t")
class InternImageTrainer(Trainer):
    """Shared protocol; AdamW groups without weight decay for norms, biases and layer scales."""

    deviations = [WEIGHT_DECAY_DEVIATION]

    def parameter_groups(self, model: nn.Module) -> list[dict]:
        decay, no_decay = [], []
        for name, param in model.named_parameters():  # frozen ones too (see the base hook)
            (no_decay if no_weight_decay(name, param) else decay).append(param)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
