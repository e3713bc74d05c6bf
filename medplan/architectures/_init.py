"""Weight initialisation shared by the transformer-style reference implementations.

Most reference codes (SegFormer/MiT lineage, VMamba, InternImage, TransNeXt, SegNeXt, U-KAN)
initialise the same way: truncated-normal (std 0.02) linear layers with zero bias, unit/zero
norms and, in some, He fan-out convolutions. One function keeps those choices in one place.
"""
from __future__ import annotations

import math

from torch import nn


def init_weights(m: nn.Module, *, fan_out_convs: bool = False,
                 norm_types: tuple[type[nn.Module], ...] = (nn.LayerNorm,)) -> None:
    """Use as ``model.apply(partial(init_weights, ...))``."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, norm_types):
        if getattr(m, "weight", None) is not None:
            nn.init.ones_(m.weight)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)
    elif fan_out_convs and isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)
