"""InternImage-T (Wang et al., CVPR 2023) with a UPerHead: ``internimage_t``.

Written after the official implementation (OpenGVLab/InternImage,
``classification/models/intern_image.py``, ``segmentation/mmseg_custom/models/backbones/
intern_image.py`` and ``ops_dcnv3``). Module structure and parameter names follow it, so the
ImageNet checkpoint ``internimage_t_1k_224.pth`` loads into ``model.backbone`` without
renaming (``patch_embed.conv1.weight``, ``levels.0.blocks.0.dcn.offset.weight``,
``levels.0.downsample.conv.weight``, ``levels.3.norm.0.weight``, ...); its classifier
(``conv_head.*``, ``head.*``) is reported as unused.

Configuration of ``segmentation/configs/ade20k/upernet_internimage_t_512_160k_ade20k.py``:
channels 64, depths 4/4/18/4, groups 4/8/16/32, MLP ratio 4, drop path 0.2 (linear over the
blocks), LayerNorm, offset scale 1, pre-norm (``post_norm=False``) and **layer scale 1.0**
(``gamma1``/``gamma2``, initialised to 1; the ImageNet model has none, so these are the only
backbone tensors the checkpoint does not fill, exactly as when mmseg loads it). The backbone
returns the four stage outputs (after each stage's LayerNorm, before downsampling) to mmseg's
UPerHead (:mod:`medplan.architectures.uperhead`, 512 channels); the head predicts at 1/4 and
the logits are resized bilinearly to the input. The auxiliary FCN head of the training config
is not built (see the uperhead module). Total: 58.37M parameters with a 2-class head
(backbone 28.77M, head 29.60M; Table 1 of the benchmark paper: 58M).

Optimizer groups (the model card): the authors' segmentation config builds the AdamW groups
with ``CustomLayerDecayOptimizerConstructor`` and ``layer_decay_rate=1.0``: no layer-wise
learning-rate decay (every group keeps the base LR), but no weight decay for one-dimensional
tensors, biases and normalisation parameters (LayerNorm/BatchNorm weights, layer-scale
``gamma``). That exemption is the only optimizer difference kept; the LR, its schedule, the
weight decay of the other tensors and everything else follow the plan. Drop path 0.2, also from
that config, is the builder's default.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.utils.checkpoint as cp
from timm.layers import DropPath
from torch import nn

from medplan.architectures.dcnv3 import DCNv3, build_norm_layer
from medplan.architectures._init import init_weights
from medplan.architectures.card import ModelCard, ParamGroups, Weights, WeightsFile
from medplan.architectures.registry import register_model
from medplan.architectures.uperhead import BackboneUPerNet

INTERNIMAGE_T_FILENAME = "internimage_t_1k_224.pth"
INTERNIMAGE_T_URL = "https://huggingface.co/OpenGVLab/InternImage/resolve/main/internimage_t_1k_224.pth"
# tensors of the segmentation backbone that the ImageNet checkpoint does not have (layer scale)
LAYER_SCALE_KEYS = (r"\.gamma[12]$",)


class StemLayer(nn.Module):
    """Two stride-2 3x3 convolutions (C/2, then C channels), each normalised (LayerNorm, the
    configs' ``norm_layer``), GELU between; NCHW in, channels-last out."""

    def __init__(self, in_chans: int = 3, out_chans: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, out_chans // 2, 3, stride=2, padding=1)
        self.norm1 = build_norm_layer(out_chans // 2, "LN", "channels_first", "channels_first")
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(out_chans // 2, out_chans, 3, stride=2, padding=1)
        self.norm2 = build_norm_layer(out_chans, "LN", "channels_first", "channels_last")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))


class DownsampleLayer(nn.Module):
    """Stride-2 3x3 convolution doubling the channels, then LayerNorm (channels-last in and out)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1, bias=False)
        self.norm = build_norm_layer(2 * channels, "LN", "channels_first", "channels_last")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x.permute(0, 3, 1, 2)))


class MLPLayer(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class InternImageLayer(nn.Module):
    """Pre-norm residual block: x + DCNv3(LN(x)), then x + MLP(LN(x)), optional layer scale."""

    def __init__(self, channels: int, groups: int, mlp_ratio: float = 4.0, drop: float = 0.0,
                 drop_path: float = 0.0, post_norm: bool = False, layer_scale: float | None = None,
                 offset_scale: float = 1.0, with_cp: bool = False, core: str = "auto"):
        super().__init__()
        self.channels = channels
        self.with_cp = with_cp
        self.post_norm = post_norm
        self.norm1 = build_norm_layer(channels, "LN")
        self.dcn = DCNv3(channels, kernel_size=3, stride=1, pad=1, dilation=1, group=groups,
                         offset_scale=offset_scale, core=core)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = build_norm_layer(channels, "LN")
        self.mlp = MLPLayer(channels, int(channels * mlp_ratio), drop=drop)
        self.layer_scale = layer_scale is not None
        if self.layer_scale:
            self.gamma1 = nn.Parameter(torch.full((channels,), float(layer_scale)))
            self.gamma2 = nn.Parameter(torch.full((channels,), float(layer_scale)))

    def _scale(self, x: torch.Tensor, which: int) -> torch.Tensor:
        return x * (self.gamma1 if which == 1 else self.gamma2) if self.layer_scale else x

    def _inner_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.post_norm:
            x = x + self.drop_path(self._scale(self.norm1(self.dcn(x)), 1))
            return x + self.drop_path(self._scale(self.norm2(self.mlp(x)), 2))
        x = x + self.drop_path(self._scale(self.dcn(self.norm1(x)), 1))
        return x + self.drop_path(self._scale(self.mlp(self.norm2(x)), 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_cp and x.requires_grad:
            return cp.checkpoint(self._inner_forward, x, use_reentrant=False)
        return self._inner_forward(x)


class InternImageBlock(nn.Module):
    """One stage: ``depth`` layers, a LayerNorm (pre-norm models), then the optional downsampling."""

    def __init__(self, channels: int, depth: int, groups: int, downsample: bool = True, mlp_ratio: float = 4.0,
                 drop: float = 0.0, drop_path: Sequence[float] | float = 0.0, post_norm: bool = False,
                 layer_scale: float | None = None, offset_scale: float = 1.0, with_cp: bool = False,
                 core: str = "auto"):
        super().__init__()
        rates = list(drop_path) if isinstance(drop_path, (list, tuple)) else [float(drop_path)] * depth
        self.post_norm = post_norm
        self.blocks = nn.ModuleList(
            InternImageLayer(channels, groups, mlp_ratio, drop, rates[i], post_norm, layer_scale, offset_scale,
                             with_cp, core)
            for i in range(depth)
        )
        if not post_norm:
            self.norm = build_norm_layer(channels, "LN")
        self.downsample = DownsampleLayer(channels) if downsample else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(input of the next stage, this stage's output before downsampling), channels-last."""
        for blk in self.blocks:
            x = blk(x)
        if not self.post_norm:
            x = self.norm(x)
        return (self.downsample(x) if self.downsample is not None else x), x


class InternImage(nn.Module):
    """InternImage backbone: (B, C, H, W) -> four NCHW feature maps at strides 4, 8, 16, 32."""

    def __init__(self, in_chans: int = 3, channels: int = 64, depths: Sequence[int] = (4, 4, 18, 4),
                 groups: Sequence[int] = (4, 8, 16, 32), mlp_ratio: float = 4.0, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.2, post_norm: bool = False, layer_scale: float | None = 1.0,
                 offset_scale: float = 1.0, with_cp: bool = False, core: str = "auto"):
        super().__init__()
        if len(depths) != len(groups):
            raise ValueError(f"depths {list(depths)} and groups {list(groups)} differ in length")
        self.depths = list(depths)
        self.num_levels = len(depths)
        self.channels = channels
        self.out_channels = [int(channels * 2 ** i) for i in range(self.num_levels)]
        self.patch_embed = StemLayer(in_chans, channels)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.levels = nn.ModuleList()
        for i, (depth, group) in enumerate(zip(depths, groups)):
            start = sum(depths[:i])
            self.levels.append(InternImageBlock(
                self.out_channels[i], depth, group, downsample=i < self.num_levels - 1, mlp_ratio=mlp_ratio,
                drop=drop_rate, drop_path=dpr[start:start + depth], post_norm=post_norm, layer_scale=layer_scale,
                offset_scale=offset_scale, with_cp=with_cp, core=core))
        self.apply(self._init_weights)
        for m in self.modules():
            if isinstance(m, DCNv3):
                m.reset_parameters()

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        init_weights(m)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.pos_drop(self.patch_embed(x))
        outs = []
        for level in self.levels:
            x, stage = level(x)
            outs.append(stage.permute(0, 3, 1, 2).contiguous())
        return outs


class InternImageUPerNet(BackboneUPerNet):
    """InternImage backbone + UPerHead; logits at the input resolution."""


WEIGHT_DECAY_DEVIATION = ("no weight decay on biases, normalisation and layer-scale parameters (1-D tensors), as "
                          "the authors' CustomLayerDecayOptimizerConstructor (layer_decay_rate=1.0: no layer-wise "
                          "LR decay); other tensors use the plan's weight decay")


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """The reference constructor's rule: 1-D tensors, biases and anything named ``norm``."""
    return param.ndim <= 1 or name.endswith(".bias") or "norm" in name


INTERNIMAGE_T = ModelCard(
    paper_params_m=58.0,
    weights=Weights((WeightsFile(INTERNIMAGE_T_FILENAME, INTERNIMAGE_T_URL, target="backbone",
                                 ignore_missing=LAYER_SCALE_KEYS),)),
    param_groups=ParamGroups(no_weight_decay=no_weight_decay), deviations=(WEIGHT_DECAY_DEVIATION,),
    test_options={"channels": 8, "depths": [1, 1, 1, 1], "groups": [1, 2, 4, 8], "decoder_channels": 16},
)


@register_model("internimage_t", card=INTERNIMAGE_T, family="cnn",
                description="InternImage-T (DCNv3) + UPerHead (Wang et al., CVPR 2023)")
def internimage_t(in_channels: int, num_classes: int, *, channels: int = 64, depths: Sequence[int] = (4, 4, 18, 4),
                  groups: Sequence[int] = (4, 8, 16, 32), mlp_ratio: float = 4.0, drop_path_rate: float = 0.2,
                  layer_scale: float | None = 1.0,
                  offset_scale: float = 1.0, decoder_channels: int = 512, with_cp: bool = False,
                  core: str = "auto") -> nn.Module:
    """InternImage-T + UPerHead as in the authors' ADE20K config; ImageNet-1k weights ``internimage_t_1k_224.pth``.

    ``channels``/``depths``/``groups``/``decoder_channels`` shrink the model (tests); ``with_cp``
    trades compute for memory (gradient checkpointing per layer); ``core`` picks the DCNv3
    implementation (``auto``: the compiled kernel on CUDA when installed, else PyTorch).
    """
    backbone = InternImage(in_channels, channels, depths, groups, mlp_ratio=mlp_ratio, drop_path_rate=drop_path_rate,
                           layer_scale=layer_scale, offset_scale=offset_scale, with_cp=with_cp, core=core)
    return InternImageUPerNet(backbone, num_classes, decoder_channels)
