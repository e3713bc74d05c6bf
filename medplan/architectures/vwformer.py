"""VWFormer (Yan et al., ICLR 2024, "Multi-scale representations by varying window attention").

The decode head is written after the official implementation (yan-hao-tian/VWFormer,
``mmsegmentation-custom/mmseg/models/decode_heads/vw_head.py``, class ``VWHead``) with its
module structure and parameter names, so an mmseg checkpoint's ``decode_head.*`` keys match:

* ``linear_c4/c3/c2`` - per-stage linear embeddings (``MLP.proj``) to ``channels``, resized to
  stride 8 and fused by ``linear_fuse`` (1x1 ConvModule);
* ``attn.{0,1,2}`` - varying-window attention (``VWA``, mmcv's NonLocal2d in embedded-Gaussian
  mode with ``g``/``theta``/``phi``/``conv_out``) for window scales 2, 4, 8: the map is cut into
  8 x 8 query windows; each attends to a context window ``r`` times larger around it, whose
  cost is kept at the query's by ``ds.{j}`` (an r x r ConvModule to channels/r^2, "pre-scaling")
  and folding each r x r neighbourhood into channels; the context borders are "copy-shift
  padded" (filled with copies of nearby content instead of zeros);
* ``short_path`` (1x1), ``image_pool`` (global pooling + 1x1) and the three attention outputs
  (each plus its input: ``short_cut``) are concatenated and fused by ``cat``;
* ``linear_c1`` (to 48 channels) and ``low_level_fuse`` add stride-4 detail; ``conv_seg`` after
  ``Dropout2d(0.1)`` gives logits at 1/4, resized bilinearly to the input.

A ConvModule is conv (no bias) + BatchNorm (``bn``; SyncBN in the reference) + ReLU (``activate``).

Configuration: ``channels=512``, ``dropout_ratio=0.1``, ``nheads=1`` and ``short_cut=True``, the
values of the reference's ``configs/_base_/models/vw_convnext.py`` / ``vw_swin.py`` and what the
benchmark paper chose ("we solved incomplete configuration details by setting nheads=1 and
enabling shortcuts"). The query grid is fixed at 8 x 8 windows on the stride-8 map, so the input
is zero-padded (bottom/right) to a multiple of 64 and the logits cropped back (the card's input
contract, applied by ``build_model``; mmseg's ``size_divisor``); at the paper's 512 x 512 nothing
is padded.

Backbones:

* ``vwformer_mit_b3``: MiT-B3 from segmentation_models_pytorch (see :mod:`.segformer`), drop path
  0.1, ImageNet weights ``mit_b3.pth`` (NVIDIA's key names, loaded into ``model.backbone``);
* ``vwformer_convnext_s``: ConvNeXt-S from timm (stem and stages of ``timm.models.convnext.ConvNeXt``,
  depths 3/3/27/3, dims 96/192/384/768) plus a LayerNorm on each output (``norm0``..``norm3``, as
  mmcls' ConvNeXt with ``out_indices=[0, 1, 2, 3]`` in the reference config); drop path 0.4 and
  layer-scale init 1.0 from the reference's ConvNeXt-S config. ImageNet-1k weights load from
  timm's layout (``convnext_small.fb_in1k``: ``stem.0``, ``stages.1.blocks.0.conv_dw``, ...), the
  FB layout (``convnext_small_1k_224_ema.pth``: ``downsample_layers.0.0``, ``stages.1.0.dwconv``,
  ``pwconv1``) and mmcls' (``convnext-small_3rdparty_32xb128-noema_in1k``: ``depthwise_conv``,
  ``pointwise_conv1``, ``norm3``); the classifier's final LayerNorm initialises ``norm3`` as in
  the reference (mmcls names it ``norm3``), ``norm0``..``norm2`` start fresh.
  timm's ``features_only`` wrapper is not used: it renames the modules (``stem_0``) and has no
  per-output norms.

Optimizer groups (the model cards): ``vwformer_mit_b3`` - the VWFormer repository has no MiT
config; VWFormer replaces SegFormer's decoder and is trained as SegFormer, so SegFormer's groups
apply (an assumption, recorded). ``vwformer_convnext_s`` - the reference config
(``vw_convnext_small_*``) builds AdamW with mmseg's ``LearningRateDecayOptimizerConstructor``
(``decay_type='stage_wise'``, ``decay_rate=0.9``, ``num_layers=12``): stem and downsampling
layers get 0.9^13 of the LR, stage ``i`` 0.9^(12 - i), everything else (output norms, head) the
full LR; 1-D tensors and biases get no weight decay. The LR itself, its schedule, the weight
decay value and everything else follow the plan (the reference configs' LR 6e-5/1e-4, poly
schedule with warm-up and weight decay 0.05 for ConvNeXt are replaced by the paper's unified
protocol). Drop-path rates are the models' defaults (MiT 0.1, ConvNeXt-S 0.4, from the same configs).
"""
from __future__ import annotations

import re
from dataclasses import replace
from typing import Sequence

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from timm.models.convnext import ConvNeXt
from torch import nn

from medplan.architectures.card import InputContract, LayerDecay, ModelCard, ParamGroups, Weights, WeightsFile
from medplan.architectures.registry import register_model
from medplan.architectures.segformer import (
    MIT_B3_WEIGHTS, SEGFORMER_DEVIATION, int_list, build_mit, check_drop_path, segformer_param_groups,
)
from medplan.errors import MedplanError

CONVNEXT_S_FILENAME = "convnext_small_1k_224_ema.pth"
CONVNEXT_S_URL = ("https://dl.fbaipublicfiles.com/convnext/convnext_small_1k_224_ema.pth (ConvNeXt README, "
                  "ImageNet-1K 224); also accepted: timm's https://huggingface.co/timm/convnext_small.fb_in1k "
                  "(model.safetensors) or the mmcls file of the VWFormer config, https://download.openmmlab.com/"
                  "mmclassification/v0/convnext/downstream/convnext-small_3rdparty_32xb128-noema_in1k_20220301-"
                  "303e75e3.pth (save either as convnext_small_1k_224_ema.pth)")
CONVNEXT_S_HUB = "timm/convnext_small.fb_in1k"
CONVNEXT_S = {"depths": (3, 3, 27, 3), "dims": (96, 192, 384, 768)}
# new modules of the segmentation backbone (no ImageNet counterpart) and the classifier's keys
CONVNEXT_IGNORE_MISSING = (r"^norm[012]\.",)
WINDOW_SCALES = ((2, 2), (4, 4), (8, 8))
NUM_WINDOWS = 8  # query windows per side on the stride-8 map
SIZE_DIVISOR = 8 * NUM_WINDOWS


# ---------------------------------------------------------------------------- head parts
class ConvModule(nn.Module):
    """mmcv's ConvModule: ``conv`` (bias only without a norm), optional BatchNorm ``bn``, optional ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int] = 1, *,
                 norm: bool = True, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, bias=not norm)
        self.bn = nn.BatchNorm2d(out_channels) if norm else None
        self.activate = nn.ReLU(inplace=True) if act else None
        # mmcv's init: Kaiming normal (fan_out, relu), zero bias; BN weight 1, bias 0
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return x if self.activate is None else self.activate(x)


class MLP(nn.Module):
    """Linear embedding of a feature map (SegFormer's ``MLP.proj``)."""

    def __init__(self, input_dim: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Linear(input_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        return self.proj(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, -1, h, w)


class VWA(nn.Module):
    """Varying-window attention: mmcv's NonLocal2d (embedded Gaussian, scaled, ``reduction=1``)
    with separate query and context inputs and ``head`` heads; no residual inside."""

    def __init__(self, in_channels: int, head: int = 1):
        super().__init__()
        if in_channels % head:
            raise MedplanError(f"VWFormer: channels {in_channels} must be a multiple of nheads {head}")
        self.in_channels = self.inter_channels = in_channels
        self.head = head
        self.g = ConvModule(in_channels, in_channels, 1, norm=False, act=False)
        self.conv_out = ConvModule(in_channels, in_channels, 1, act=False)
        self.theta = ConvModule(in_channels, in_channels, 1, norm=False, act=False)
        self.phi = ConvModule(in_channels, in_channels, 1, norm=False, act=False)
        # NonLocal2d.init_weights(std=0.01, zeros_init=True): theta ~ N(0, 0.01), conv_out's norm zeroed
        # (the reference rebuilds g and phi afterwards, so they keep ConvModule's initialisation)
        nn.init.normal_(self.theta.conv.weight, std=0.01)
        nn.init.zeros_(self.conv_out.bn.weight)

    def forward(self, query: torch.Tensor, context_k: torch.Tensor, context_v: torch.Tensor) -> torch.Tensor:
        n, _, h, w = query.shape
        heads, dim = self.head, self.inter_channels // self.head

        def split(t: torch.Tensor) -> torch.Tensor:  # (n, heads*dim, ...) -> (n, heads, tokens, dim)
            return t.reshape(n, heads, dim, -1).transpose(2, 3)

        q = split(self.theta(query))
        k = split(self.phi(context_k))
        v = split(self.g(context_v))
        y = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(dim)) v
        y = y.transpose(2, 3).reshape(n, self.inter_channels, h, w)
        return self.conv_out(y)


def _slice(x: torch.Tensor, dim: int, start: int, stop: int) -> torch.Tensor:
    index = [slice(None)] * x.ndim
    index[dim] = slice(start, stop)
    return x[tuple(index)]


def copy_shift_pad(x: torch.Tensor, dim: int, r: int, p: int) -> torch.Tensor:
    """Pad ``dim`` by about (r - 1) * p / 2 on each side with copies of the map's own content
    (the reference's ``copy_shift_padding``), so that every one of the windows of size p, strided
    by p, gets a context window of size r * p centred on it."""
    size = x.shape[dim]
    if r * p > size:
        raise MedplanError(f"VWFormer: context window {r} x {p} exceeds the feature map ({size})")
    lo, hi = (r + 1) * p // 2, r * p
    return torch.cat([_slice(x, dim, lo, hi), x, _slice(x, dim, size - hi, size - lo)], dim=dim)


def varying_context_windows(context: torch.Tensor, rh: int, rw: int, nh: int, nw: int) -> torch.Tensor:
    """(B, C, H, W) -> (B * nh * nw, C, rh * ph, rw * pw): the context window of each query window."""
    b, c, h, w = context.shape
    ph, pw = h // nh, w // nw
    context = copy_shift_pad(copy_shift_pad(context, 3, rw, pw), 2, rh, ph)
    windows = context.unfold(2, rh * ph, ph).unfold(3, rw * pw, pw)  # (B, C, nh', nw', rh*ph, rw*pw)
    if windows.shape[2:4] != (nh, nw):  # p == 1 gives one window too many (the reference fails there)
        windows = windows[:, :, :nh, :nw]
    return windows.permute(0, 2, 3, 1, 4, 5).reshape(b * nh * nw, c, rh * ph, rw * pw)


def fold_neighbourhoods(x: torch.Tensor, rh: int, rw: int) -> torch.Tensor:
    """'b c (ph rh) (pw rw) -> b (rh rw c) ph pw': each rh x rw neighbourhood becomes channels."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // rh, rh, w // rw, rw).permute(0, 3, 5, 1, 2, 4)
    return x.reshape(b, rh * rw * c, h // rh, w // rw)


def to_windows(x: torch.Tensor, nh: int, nw: int) -> torch.Tensor:
    """'b c (nh ph) (nw pw) -> (b nh nw) c ph pw'."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, nh, h // nh, nw, w // nw).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b * nh * nw, c, h // nh, w // nw)


def from_windows(x: torch.Tensor, b: int, nh: int, nw: int) -> torch.Tensor:
    """'(b nh nw) c ph pw -> b c (nh ph) (nw pw)'."""
    _, c, ph, pw = x.shape
    return x.reshape(b, nh, nw, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(b, c, nh * ph, nw * pw)


class VWHead(nn.Module):
    """The VWFormer decode head (the reference's ``VWHead``) on four feature maps (strides 4-32)."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, *, channels: int = 512, nheads: int = 1,
                 short_cut: bool = True, dropout_ratio: float = 0.1,
                 kernel: Sequence[tuple[int, int]] = WINDOW_SCALES):
        super().__init__()
        if len(in_channels) != 4:
            raise MedplanError(f"VWFormer: the head needs four feature maps, got channels {list(in_channels)}")
        embed_dim = self.channels = channels
        self.kernel = [tuple(k) for k in kernel]
        self.short_cut = bool(short_cut)
        if any(channels % (k1 * k2) for k1, k2 in self.kernel):
            raise MedplanError(f"VWFormer: channels {channels} must be a multiple of 64 (window scales up to 8)")
        self.linear_c4 = MLP(in_channels[3], embed_dim)
        self.linear_c3 = MLP(in_channels[2], embed_dim)
        self.linear_c2 = MLP(in_channels[1], embed_dim)
        self.linear_fuse = ConvModule(embed_dim * 3, embed_dim, 1)
        self.attn = nn.Sequential(*[VWA(embed_dim, head=nheads) for _ in self.kernel])
        self.ds = nn.ModuleList([ConvModule(embed_dim, embed_dim // (k1 * k2), (k1, k2)) for k1, k2 in self.kernel])
        self.short_path = ConvModule(embed_dim, embed_dim, 1)
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvModule(embed_dim, embed_dim, 1))
        self.cat = ConvModule(embed_dim * (2 + len(self.kernel)), embed_dim, 1)
        self.linear_c1 = MLP(in_channels[0], 48)
        self.low_level_fuse = ConvModule(embed_dim + 48, embed_dim, 1)
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(embed_dim, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)  # mmseg's BaseDecodeHead.init_weights
        nn.init.zeros_(self.conv_seg.bias)

    def mlp_decoder(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        c1, c2, c3, c4 = inputs
        size = c2.shape[2:]
        _c4 = F.interpolate(self.linear_c4(c4), size=size, mode="bilinear", align_corners=False)
        _c3 = F.interpolate(self.linear_c3(c3), size=size, mode="bilinear", align_corners=False)
        _c2 = self.linear_c2(c2)
        return self.linear_fuse(torch.cat([_c4, _c3, _c2], dim=1)), c1

    def dope_scaling(self, x: torch.Tensor, rh: int, rw: int, j: int) -> torch.Tensor:
        """Pre-scaling: an rh x rw convolution (same size, 'same' padding) to channels / (rh * rw)."""
        pad_w = [rw // 2 - 1, rw // 2] if rw % 2 == 0 else [rw // 2] * 2
        pad_h = [rh // 2 - 1, rh // 2] if rh % 2 == 0 else [rh // 2] * 2
        return self.ds[j](F.pad(x, pad_w + pad_h))

    def vwformer(self, _c: torch.Tensor) -> torch.Tensor:
        b, _, h, w = _c.shape
        nh = nw = NUM_WINDOWS
        if h % nh or w % nw:
            raise MedplanError(f"VWFormer: the stride-8 map ({h} x {w}) must divide into {nh} x {nw} windows; "
                               f"the input size must be a multiple of {SIZE_DIVISOR}")
        pooled = self.image_pool(_c)
        output = [self.short_path(_c), pooled.expand(-1, -1, h, w)]  # bilinear resize of a 1 x 1 map
        query = to_windows(_c, nh, nw)
        for j, (rh, rw) in enumerate(self.kernel):
            context = self.dope_scaling(_c, rh, rw, j)
            context = fold_neighbourhoods(varying_context_windows(context, rh, rw, nh, nw), rh, rw)
            out = from_windows(self.attn[j](query, context, context), b, nh, nw)
            output.append(out + _c if self.short_cut else out)
        return self.cat(torch.cat(output, dim=1))

    def low_level(self, _c: torch.Tensor, c1: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(_c, size=c1.shape[2:], mode="bilinear", align_corners=False)
        return self.low_level_fuse(torch.cat([up, self.linear_c1(c1)], dim=1))

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        _c, c1 = self.mlp_decoder(inputs)
        _c = self.low_level(self.vwformer(_c), c1)
        return self.conv_seg(self.dropout(_c))


# ---------------------------------------------------------------------------- backbones
class ConvNeXtBackbone(nn.Module):
    """timm's ConvNeXt stem and stages with a LayerNorm on each of the four outputs (mmcls' ``norm{i}``)."""

    def __init__(self, in_channels: int = 3, *, depths: Sequence[int] = CONVNEXT_S["depths"],
                 dims: Sequence[int] = CONVNEXT_S["dims"], drop_path_rate: float = 0.4, ls_init_value: float = 1.0):
        super().__init__()
        net = ConvNeXt(in_chans=in_channels, num_classes=0, depths=tuple(depths), dims=tuple(dims),
                       drop_path_rate=drop_path_rate, ls_init_value=ls_init_value)
        self.stem, self.stages = net.stem, net.stages
        self.embed_dims = list(dims)
        for i, dim in enumerate(dims):
            self.add_module(f"norm{i}", LayerNorm2d(dim, eps=1e-6))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            outs.append(getattr(self, f"norm{i}")(x))
        return outs


_BLOCK_RENAMES = (("depthwise_conv.", "conv_dw."), ("dwconv.", "conv_dw."), ("pointwise_conv1.", "mlp.fc1."),
                  ("pointwise_conv2.", "mlp.fc2."), ("pwconv1.", "mlp.fc1."), ("pwconv2.", "mlp.fc2."))


def convnext_key_map(key: str) -> str:
    """FB / mmcls ConvNeXt checkpoint names -> :class:`ConvNeXtBackbone` (timm) names; timm's pass through."""
    if m := re.fullmatch(r"downsample_layers\.0\.(\d+)\.(.+)", key):
        return f"stem.{m[1]}.{m[2]}"
    if m := re.fullmatch(r"downsample_layers\.(\d+)\.(\d+)\.(.+)", key):
        return f"stages.{m[1]}.downsample.{m[2]}.{m[3]}"
    if m := re.fullmatch(r"stages\.(\d+)\.(\d+)\.(.+)", key):
        rest = m[3]
        for old, new in _BLOCK_RENAMES:
            if rest.startswith(old):
                rest = new + rest[len(old):]
        return f"stages.{m[1]}.blocks.{m[2]}.{rest}"
    if m := re.fullmatch(r"(?:head\.)?norm\.(weight|bias)", key):  # the classifier's final norm (FB, timm)
        return f"norm3.{m[1]}"
    return key


# ---------------------------------------------------------------------------- model
class VWFormer(nn.Module):
    """``backbone`` (four feature maps) + :class:`VWHead` (``decode_head``); logits at the input size."""

    def __init__(self, backbone: nn.Module, num_classes: int, *, channels: int = 512, nheads: int = 1,
                 short_cut: bool = True, dropout_ratio: float = 0.1):
        super().__init__()
        self.backbone = backbone
        self.decode_head = VWHead(backbone.embed_dims, num_classes, channels=channels, nheads=nheads,
                                  short_cut=short_cut, dropout_ratio=dropout_ratio)
        self.pretrained_report: dict | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for sides that are multiples of 64 (the 8 x 8 query windows; the input contract pads)."""
        logits = self.decode_head(self.backbone(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _head_options(name: str, channels: int, nheads: int, short_cut: bool) -> dict:
    channels = int_list([channels], "channels", name)[0]
    nheads = int_list([nheads], "nheads", name)[0]
    if not isinstance(short_cut, bool):
        raise MedplanError(f"{name}: short_cut must be true or false, got {short_cut!r}")
    return {"channels": channels, "nheads": nheads, "short_cut": short_cut}


# ---------------------------------------------------------------------------- cards
VW_MIT_DEVIATION = (SEGFORMER_DEVIATION + "; assumed for VWFormer on MiT-B3, whose configuration the VWFormer "
                    "repository does not include")
CONVNEXT_DECAY_RATE = 0.9
CONVNEXT_NUM_LAYERS = 12
CONVNEXT_DEVIATION = ("AdamW parameter groups of the VWFormer ConvNeXt config (mmseg "
                      "LearningRateDecayOptimizerConstructor, stage_wise, decay_rate 0.9, num_layers 12): stem and "
                      "downsampling x0.9^13, stage i x0.9^(12-i), head and output norms x1; no weight decay for "
                      "biases and 1-D tensors")
#: the 8 x 8 query windows on the stride-8 map
VWFORMER_INPUT = InputContract(pad_to_multiple=SIZE_DIVISOR)
VW_TEST_HEAD = {"channels": 64}


def convnext_stage_id(name: str, max_stage_id: int) -> int:
    """mmseg's ``get_stage_id_for_convnext`` on timm's names (``stem`` / ``stages.i.downsample`` are
    mmcls' ``downsample_layers``)."""
    if name.startswith("backbone.stem.") or re.match(r"backbone\.stages\.\d+\.downsample\.", name):
        return 0
    if m := re.match(r"backbone\.stages\.(\d+)\.", name):
        return int(m[1]) + 1
    return max_stage_id - 1


def bias_or_1d(name: str, param: torch.Tensor) -> bool:
    """mmseg's no-decay rule of the LearningRateDecayOptimizerConstructor: 1-D tensors and biases."""
    return param.ndim == 1 or name.endswith(".bias")


VWFORMER_MIT_B3 = ModelCard(
    paper_params_m=51.0,
    weights=Weights((replace(MIT_B3_WEIGHTS, target="backbone"),)),
    input=VWFORMER_INPUT,
    param_groups=segformer_param_groups("backbone"),
    deviations=(VW_MIT_DEVIATION,),
    test_options={"embed_dims": [8, 16, 32, 32], "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], **VW_TEST_HEAD},
)
VWFORMER_CONVNEXT_S = ModelCard(
    paper_params_m=57.0,
    weights=Weights((WeightsFile(CONVNEXT_S_FILENAME, CONVNEXT_S_URL, target="backbone", key_map=convnext_key_map,
                                 ignore_missing=CONVNEXT_IGNORE_MISSING, hub_repo=CONVNEXT_S_HUB),)),
    input=VWFORMER_INPUT, param_groups=ParamGroups(no_weight_decay=bias_or_1d,
                             layer_decay=LayerDecay(CONVNEXT_DECAY_RATE, CONVNEXT_NUM_LAYERS, convnext_stage_id)),
    deviations=(CONVNEXT_DEVIATION,), test_options={"dims": [8, 16, 32, 64], "depths": [1, 1, 1, 1], **VW_TEST_HEAD},
)


@register_model("vwformer_mit_b3", card=VWFORMER_MIT_B3, family="transformer",
                description="VWFormer (ICLR'24): varying-window attention head on MiT-B3")
def vwformer_mit_b3(in_channels: int, num_classes: int, *, drop_path_rate: float = 0.1, channels: int = 512,
                    nheads: int = 1, short_cut: bool = True, embed_dims: Sequence[int] | None = None,
                    depths: Sequence[int] | None = None, num_heads: Sequence[int] | None = None) -> VWFormer:
    """VW-MiT: MiT-B3 (SegFormer's encoder, drop path 0.1) + VWHead (512 channels, 1 head, shortcuts);
    ``embed_dims``/``depths``/``num_heads`` exist for tiny test models."""
    name = "vwformer_mit_b3"
    head = _head_options(name, channels, nheads, short_cut)
    backbone = build_mit(in_channels, embed_dims=embed_dims, depths=depths, num_heads=num_heads,
                         drop_path_rate=check_drop_path(drop_path_rate, name), name=name)
    return VWFormer(backbone, num_classes, **head)


@register_model("vwformer_convnext_s", card=VWFORMER_CONVNEXT_S, family="cnn",
                description="VWFormer (ICLR'24): varying-window attention head on ConvNeXt-S")
def vwformer_convnext_s(in_channels: int, num_classes: int, *, drop_path_rate: float = 0.4, channels: int = 512,
                        nheads: int = 1, short_cut: bool = True, dims: Sequence[int] | None = None,
                        depths: Sequence[int] | None = None) -> VWFormer:
    """VW-ConvNeXt: ConvNeXt-S (timm; drop path 0.4, layer scale 1.0 as the reference config) + VWHead
    (512 channels, 1 head, shortcuts); ``dims``/``depths`` exist for tiny test models."""
    name = "vwformer_convnext_s"
    head = _head_options(name, channels, nheads, short_cut)
    backbone = ConvNeXtBackbone(
        in_channels, depths=CONVNEXT_S["depths"] if depths is None else int_list(depths, "depths", name, 4),
        dims=CONVNEXT_S["dims"] if dims is None else int_list(dims, "dims", name, 4),
        drop_path_rate=check_drop_path(drop_path_rate, name))
    return VWFormer(backbone, num_classes, **head)
