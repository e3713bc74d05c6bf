"""TransNeXt-Tiny trainer: the shared protocol with the authors' weight-decay exemptions.

The authors' segmentation config (``upernet_transnext_tiny_512x512_160k_ade20k_ss.py``) trains
with AdamW and ``paramwise_cfg.custom_keys`` giving ``decay_mult=0`` to every parameter whose
name contains ``query_embedding``, ``relative_pos_bias_local``, ``cpb``, ``temperature`` or
``norm`` (mmcv matches the keys as substrings of the full parameter name; biases and the
UPerHead's BatchNorm, named ``bn``, keep their weight decay). That exemption is the only
optimizer difference kept here; the LR, its schedule, the weight decay of the other tensors
and everything else follow the plan. Drop path 0.4, also from that config, is the model's
default (``medplan.architectures.transnext``).
"""
from __future__ import annotations

from torch import nn

from medplan.trainers.base import Trainer
from medplan.trainers.registry import register_trainer

NO_DECAY_KEYS = ("query_embedding", "relative_pos_bias_local", "cpb", "temperature", "norm")
WEIGHT_DECAY_DEVIATION = ("no weight decay on parameters named query_embedding, relative_pos_bias_local, cpb*, "
                          "temperature or *norm* (the authors' paramwise_cfg custom_keys, decay_mult=0); other "
                          "tensors use the plan's weight decay")


def no_weight_decay(name: str) -> bool:
    """The reference config's rule: any of :data:`NO_DECAY_KEYS` occurs in the parameter name."""
    return any(key in name for key in NO_DECAY_KEYS)


@register_trainer("transnext_t")
class TransNeXtTrainer(Trainer):
    """Shared protocol; AdamW groups without weight decay for the authors' custom keys."""

    deviations = [WEIGHT_DECAY_DEVIATION]

    def parameter_groups(self, model: nn.Module) -> list[dict]:
        decay, no_decay = [], []
        for name, param in model.named_parameters():  # frozen ones too (see the base hook)
            (no_decay if no_weight_decay(name) else decay).append(param)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
