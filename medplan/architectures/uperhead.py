"""UPerHead (Xiao et al., ECCV 2018, "UPerNet") as mmsegmentation builds it, without mmcv.

Shared by the backbones the paper paired with UPerNet (InternImage-T, TransNeXt-Tiny).
Structure and parameter names follow mmseg's ``decode_heads/uper_head.py`` so that a
segmentation checkpoint's ``decode_head.*`` keys would load unchanged:

* ``psp_modules.{i}.1`` - pyramid pooling on the last stage (scales 1, 2, 3, 6), each a
  1x1 ConvModule to ``channels``; ``bottleneck`` - 3x3 ConvModule on [last stage, pooled];
* ``lateral_convs.{i}`` - 1x1 ConvModules on every other stage, summed top-down;
* ``fpn_convs.{i}`` - 3x3 ConvModules on those sums; ``fpn_bottleneck`` - 3x3 ConvModule on
  all levels resized to the finest one and concatenated;
* ``conv_seg`` - 1x1 classifier after ``Dropout2d(0.1)``.

A ConvModule is conv (no bias) + BatchNorm (``bn``; SyncBN in the reference configs) + ReLU.
segmentation_models_pytorch's ``UPerNetDecoder`` was not used: it adds a LayerNorm on each
input feature, which mmseg's head does not have, and its parameter names differ.

The auxiliary FCN head of the reference training configs (loss weight 0.4 on stage 3) is
not built: it is dropped at inference and the paper's sizes count without it.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvModule", "PPM", "UPerHead"]


class ConvModule(nn.Module):
    """conv -> BatchNorm -> ReLU, named ``conv``/``bn`` like mmcv's ConvModule."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class PPM(nn.ModuleList):
    """Pyramid pooling: average-pool to each scale, 1x1 ConvModule, resize back."""

    def __init__(self, pool_scales: Sequence[int], in_channels: int, channels: int, align_corners: bool = False):
        super().__init__(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(in_channels, channels, 1)) for s in pool_scales
        )
        self.align_corners = align_corners

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        size = x.shape[2:]
        return [F.interpolate(m(x), size=size, mode="bilinear", align_corners=self.align_corners) for m in self]


class UPerHead(nn.Module):
    """mmseg's UPerHead: maps a list of stage features (finest first) to logits at the finest stride."""

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int = 512,
        num_classes: int | None = None,
        *,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        align_corners: bool = False,
    ):
        super().__init__()
        if num_classes is None:
            raise TypeError("UPerHead needs num_classes")
        in_channels = [int(c) for c in in_channels]
        if len(in_channels) < 2:
            raise ValueError(f"UPerHead needs at least 2 input stages, got {in_channels}")
        self.in_channels = in_channels
        self.channels = channels
        self.align_corners = align_corners
        self.psp_modules = PPM(pool_scales, in_channels[-1], channels, align_corners)
        self.bottleneck = ConvModule(in_channels[-1] + len(pool_scales) * channels, channels, 3, padding=1)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3, padding=1) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3, padding=1)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def _resize(self, x: torch.Tensor, size: torch.Size) -> torch.Tensor:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=self.align_corners)

    def psp_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(torch.cat([x, *self.psp_modules(x)], dim=1))

    def features(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The fused ``channels``-wide map before the classifier."""
        if len(inputs) != len(self.in_channels):
            raise ValueError(f"UPerHead built for {len(self.in_channels)} stages got {len(inputs)}")
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        laterals.append(self.psp_forward(inputs[-1]))
        for i in range(len(laterals) - 1, 0, -1):  # top-down path
            laterals[i - 1] = laterals[i - 1] + self._resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])]
        outs.append(laterals[-1])
        size = outs[0].shape[2:]
        outs = [outs[0]] + [self._resize(o, size) for o in outs[1:]]
        return self.fpn_bottleneck(torch.cat(outs, dim=1))

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.conv_seg(self.dropout(self.features(inputs)))


class BackboneUPerNet(nn.Module):
    """A backbone (``out_channels``; forward -> NCHW maps, finest first) + UPerHead, as the
    UPerNet configs of InternImage and TransNeXt; logits at the input resolution."""

    def __init__(self, backbone: nn.Module, num_classes: int, decoder_channels: int = 512):
        super().__init__()
        self.backbone = backbone
        self.decode_head = UPerHead(backbone.out_channels, decoder_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.decode_head(self.backbone(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
