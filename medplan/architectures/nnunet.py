"""nnU-Net's planned 2D U-Net (``PlainConvUNet``), the self-configuring reference the benchmark leaves out.

Structure and parameter names follow nnU-Net v2's ``dynamic_network_architectures`` so that the
state-dict keys match an nnU-Net checkpoint of the same topology (``encoder.stages.0.0.convs.0.conv.weight``,
``decoder.transpconvs.0.weight``, ``decoder.seg_layers.0.weight``; like the reference, ``ConvDropoutNormReLU``
also lists its layers in ``all_modules`` and the decoder holds the encoder, so those keys appear too).

The topology comes from the planned input size as nnU-Net's 2D planner derives it for images
with unit spacing: stride-2 convolutions downsample an axis while its feature map is at least
``2 * MIN_FEATURE_MAP`` (so the bottleneck is >= 4 px), 32 features doubling per stage capped
at 512, two 3x3 conv-InstanceNorm-LeakyReLU per stage, transposed-conv upsampling, and a 1x1
segmentation layer per decoder stage. With ``deep_supervision=True`` a module in training mode
returns one logit map per decoder stage, full resolution first (nnU-Net's order); in eval mode it
always returns the full-resolution logits only, so validation and prediction see plain logits.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from medplan.architectures.card import InputContract, ModelCard
from medplan.architectures.registry import register_model
from medplan.errors import MedplanError

MIN_FEATURE_MAP = 4  # nnU-Net's minimum edge length of the bottleneck feature map


def plan_2d_topology(input_size: Sequence[int], *, features_base: int = 32, max_features: int = 512,
                     min_feature_map: int = MIN_FEATURE_MAP) -> dict:
    """Stages, features and per-axis strides for a 2D input, as nnU-Net's planner picks them.

    An axis is downsampled by 2 in the next stage while its (ceil-divided) size is at least
    ``2 * min_feature_map``; planning stops when no axis can be downsampled any more.
    """
    size = [int(s) for s in input_size]
    strides: list[tuple[int, int]] = [(1, 1)]
    while True:
        step = tuple(2 if s >= 2 * min_feature_map else 1 for s in size)
        if step == (1, 1):
            break
        strides.append(step)  # type: ignore[arg-type]
        size = [math.ceil(s / k) for s, k in zip(size, step)]
    n_stages = len(strides)
    features = [min(features_base * 2 ** i, max_features) for i in range(n_stages)]
    return {"n_stages": n_stages, "features_per_stage": features, "strides": strides,
            "kernel_sizes": [(3, 3)] * n_stages, "bottleneck_size": size}


class ConvDropoutNormReLU(nn.Module):
    """conv -> (dropout) -> InstanceNorm(affine, eps 1e-5) -> LeakyReLU(0.01), reference names."""

    def __init__(self, input_channels: int, output_channels: int, kernel_size: Sequence[int],
                 stride: Sequence[int], conv_bias: bool = True, dropout_p: float = 0.0):
        super().__init__()
        self.input_channels, self.output_channels = input_channels, output_channels
        self.stride = tuple(stride)
        self.conv = nn.Conv2d(input_channels, output_channels, tuple(kernel_size), tuple(stride),
                              padding=[(k - 1) // 2 for k in kernel_size], bias=conv_bias)
        ops: list[nn.Module] = [self.conv]
        if dropout_p > 0:
            self.dropout = nn.Dropout2d(dropout_p)
            ops.append(self.dropout)
        self.norm = nn.InstanceNorm2d(output_channels, eps=1e-5, affine=True)
        self.nonlin = nn.LeakyReLU(0.01, inplace=True)
        ops += [self.norm, self.nonlin]
        self.all_modules = nn.Sequential(*ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.all_modules(x)


class StackedConvBlocks(nn.Module):
    """``num_convs`` ConvDropoutNormReLU; the first one carries the stage's stride."""

    def __init__(self, num_convs: int, input_channels: int, output_channels: int,
                 kernel_size: Sequence[int], initial_stride: Sequence[int], conv_bias: bool = True):
        super().__init__()
        self.output_channels = output_channels
        self.convs = nn.Sequential(
            ConvDropoutNormReLU(input_channels, output_channels, kernel_size, initial_stride, conv_bias),
            *[ConvDropoutNormReLU(output_channels, output_channels, kernel_size, (1, 1), conv_bias)
              for _ in range(num_convs - 1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


class PlainConvEncoder(nn.Module):
    """Stages of stacked convs, downsampling by strided convolution (nnU-Net's ``pool='conv'``)."""

    def __init__(self, input_channels: int, features_per_stage: Sequence[int], kernel_sizes: Sequence[Sequence[int]],
                 strides: Sequence[Sequence[int]], n_conv_per_stage: Sequence[int], conv_bias: bool = True):
        super().__init__()
        stages = []
        channels = input_channels
        for s, feats in enumerate(features_per_stage):
            # one-element Sequential, as the reference wraps each stage (keys ``stages.S.0.convs...``)
            stages.append(nn.Sequential(StackedConvBlocks(n_conv_per_stage[s], channels, feats, kernel_sizes[s],
                                                          strides[s], conv_bias)))
            channels = feats
        self.stages = nn.Sequential(*stages)
        self.output_channels = list(features_per_stage)
        self.strides = [tuple(s) for s in strides]
        self.kernel_sizes = [tuple(k) for k in kernel_sizes]
        self.conv_bias = conv_bias
        self.return_skips = True

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class UNetDecoder(nn.Module):
    """Transposed conv up, concatenate the skip, stacked convs; a 1x1 seg layer per stage."""

    def __init__(self, encoder: PlainConvEncoder, num_classes: int, n_conv_per_stage: Sequence[int],
                 deep_supervision: bool = False):
        super().__init__()
        self.deep_supervision = deep_supervision
        self.encoder = encoder  # kept as in the reference (its keys appear under decoder.encoder too)
        self.num_classes = num_classes
        n_enc = len(encoder.output_channels)
        transpconvs, stages, seg_layers = [], [], []
        for s in range(1, n_enc):
            below = encoder.output_channels[-s]
            skip = encoder.output_channels[-(s + 1)]
            stride = encoder.strides[-s]
            transpconvs.append(nn.ConvTranspose2d(below, skip, stride, stride, bias=encoder.conv_bias))
            stages.append(StackedConvBlocks(n_conv_per_stage[s - 1], 2 * skip, skip, encoder.kernel_sizes[-(s + 1)],
                                            (1, 1), encoder.conv_bias))
            seg_layers.append(nn.Conv2d(skip, num_classes, 1, 1, 0, bias=True))
        self.transpconvs = nn.ModuleList(transpconvs)
        self.stages = nn.ModuleList(stages)
        self.seg_layers = nn.ModuleList(seg_layers)

    def forward(self, skips: list[torch.Tensor], deep_supervision: bool | None = None) -> list[torch.Tensor]:
        """Segmentation outputs, full resolution first (one, unless deep supervision)."""
        ds = self.deep_supervision if deep_supervision is None else deep_supervision
        x = skips[-1]
        outputs = []
        for s, (up, stage) in enumerate(zip(self.transpconvs, self.stages)):
            x = stage(torch.cat((up(x), skips[-(s + 2)]), 1))
            if ds:
                outputs.append(self.seg_layers[s](x))
            elif s == len(self.stages) - 1:
                outputs.append(self.seg_layers[-1](x))
        return outputs[::-1]


class PlainConvUNet(nn.Module):
    """nnU-Net's plain-conv U-Net, for sides that are multiples of the total stride (the card's
    input contract zero-pads other sizes and crops every output back; nnU-Net instead plans a
    divisible patch size)."""

    def __init__(self, input_channels: int, num_classes: int, features_per_stage: Sequence[int],
                 kernel_sizes: Sequence[Sequence[int]], strides: Sequence[Sequence[int]],
                 n_conv_per_stage: Sequence[int], n_conv_per_stage_decoder: Sequence[int],
                 deep_supervision: bool = False, conv_bias: bool = True):
        super().__init__()
        self.encoder = PlainConvEncoder(input_channels, features_per_stage, kernel_sizes, strides, n_conv_per_stage,
                                        conv_bias)
        self.decoder = UNetDecoder(self.encoder, num_classes, n_conv_per_stage_decoder, deep_supervision)
        self.total_stride = tuple(math.prod(s[a] for s in strides) for a in range(2))
        self.deep_supervision = deep_supervision
        self.apply(init_weights_he)

    def output_scales(self) -> list[tuple[int, int]]:
        """Downsampling factor of each deep-supervision output (full resolution first)."""
        scales, acc = [], (1, 1)
        for s in self.encoder.strides[:-1]:
            acc = (acc[0] * s[0], acc[1] * s[1])
            scales.append(acc)
        return scales

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        ds = self.deep_supervision and self.training
        outputs = self.decoder(self.encoder(x), deep_supervision=ds)
        return outputs if ds else outputs[0]


def init_weights_he(module: nn.Module, neg_slope: float = 1e-2) -> None:
    """nnU-Net's ``InitWeights_He``: Kaiming-normal convolutions for LeakyReLU(0.01), zero biases."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.kaiming_normal_(module.weight, a=neg_slope)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _input_size(value: object) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)):
        raise MedplanError(f"nnunet_2d: input_size must be two positive integers (H, W), got {value!r}")
    return int(value[0]), int(value[1])


NNUNET_2D = ModelCard(input=InputContract(pad_to_multiple=lambda model: model.total_stride),
                      test_options={"features_base": 4, "max_features": 16, "input_size": (64, 64)})


@register_model("nnunet_2d", card=NNUNET_2D, family="cnn",
                description="nnU-Net's planned 2D PlainConvUNet (topology from the plan's input size)")
def nnunet_2d(in_channels: int, num_classes: int, *, input_size: Sequence[int] | int = (512, 512),
              deep_supervision: bool = False, features_base: int = 32, max_features: int = 512,
              n_conv: int = 2) -> PlainConvUNet:
    """nnU-Net's 2D U-Net planned for ``input_size``; deep supervision outputs in training mode only."""
    size = _input_size(input_size)
    for name, v in (("features_base", features_base), ("max_features", max_features), ("n_conv", n_conv)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise MedplanError(f"nnunet_2d: {name} must be a positive integer, got {v!r}")
    topo = plan_2d_topology(size, features_base=features_base, max_features=max_features)
    if topo["n_stages"] < 2:
        raise MedplanError(f"nnunet_2d: input_size {list(size)} is too small to downsample even once "
                           f"(needs a side of at least {2 * MIN_FEATURE_MAP})")
    n = topo["n_stages"]
    model = PlainConvUNet(in_channels, num_classes, topo["features_per_stage"], topo["kernel_sizes"], topo["strides"],
                          [n_conv] * n, [n_conv] * (n - 1), deep_supervision=bool(deep_supervision))
    model.topology = topo
    return model
