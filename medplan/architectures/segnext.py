"""SegNeXt-L (Guo et al., NeurIPS 2022): MSCAN-L encoder + LightHamHead (NMF "Hamburger").

Written after the official implementation (Visual-Attention-Network/SegNeXt, on mmseg 0.24:
``mmseg/models/backbones/mscan.py`` and ``decode_heads/ham_head.py``). Module structure and
parameter names follow it, so the official ImageNet checkpoint ``mscan_l.pth`` loads into
``model.backbone`` without renaming (``patch_embed1.proj.0.weight``,
``block1.0.attn.spatial_gating_unit.conv0.weight``, ``norm1.weight``, ...), and the head's
names are those of mmseg's ``decode_head`` (ConvModule ``conv``/``gn``, ``conv_seg``).

Configuration of ``segnext.large.512x512.ade.160k.py``: embed dims 64/128/320/512, depths
3/5/27/3, MLP ratios 8/8/4/4, drop path 0.3, BatchNorm in the encoder (SyncBN there);
head on stages 2-4 (strides 8/16/32) with 1024 channels, GroupNorm(32), dropout 0.1, NMF
with R=64, 6 steps in training / 7 in evaluation, inverse temperature 1, random bases drawn
anew at every forward (as the reference does, also in evaluation, so seed for
reproducibility). The head predicts at 1/8 and the logits are resized bilinearly to the input.

Two implementation choices that do not change the fp32 model: the blocks work on
(B, C, H, W) maps instead of token sequences (same arithmetic), and the NMF always runs in
float32, even inside an autocast region (its multiplicative updates divide by small numbers;
the benchmark paper trained SegNeXt without mixed precision for instability, see
``medplan.trainers.segnext``).
"""
from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from medplan.architectures.card import ModelCard, Weights, WeightsFile
from medplan.architectures.registry import register_model
from medplan.errors import MedplanError

MSCAN_L_FILENAME = "mscan_l.pth"
MSCAN_L_URL = ("https://cloud.tsinghua.edu.cn/d/c15b25a6745946618462/ (SegNeXt README, 'ImageNet pre-trained "
               "models'); mirror: https://download.openmmlab.com/mmsegmentation/v0.5/pretrain/segnext/"
               "mscan_l_20230227-cef260d4.pth (save it as mscan_l.pth)")
# keys of the ImageNet checkpoint that the segmentation model does not use (classifier head)
CLASSIFIER_KEYS = (r"^head\.",)


# ---------------------------------------------------------------------------------- encoder
class DWConv(nn.Module):
    """3x3 depth-wise convolution inside the MLP (a nested ``dwconv.dwconv`` as in the reference)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dwconv(x)


class Mlp(nn.Module):
    """1x1 conv -> 3x3 depth-wise conv -> GELU -> 1x1 conv."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.dwconv(self.fc1(x))))
        return self.drop(self.fc2(x))


class StemConv(nn.Module):
    """Stage-1 embedding: two stride-2 3x3 convolutions (C/2 then C channels) with BN, GELU between."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_channels, out_channels // 2, 3, stride=2, padding=1),
            nn.BatchNorm2d(out_channels // 2), nn.GELU(),
            nn.Conv2d(out_channels // 2, out_channels, 3, stride=2, padding=1), nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class OverlapPatchEmbed(nn.Module):
    """Stages 2-4 embedding: a stride-2 3x3 convolution and BN."""

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int = 3, stride: int = 2):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.BatchNorm2d(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class AttentionModule(nn.Module):
    """Multi-scale convolutional attention (MSCA): a 5x5 depth-wise conv, three strip-conv
    branches (1x7/7x1, 1x11/11x1, 1x21/21x1), their sum mixed by a 1x1 conv, used as weights
    multiplying the input."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv0 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv0_1 = nn.Conv2d(dim, dim, (1, 7), padding=(0, 3), groups=dim)
        self.conv0_2 = nn.Conv2d(dim, dim, (7, 1), padding=(3, 0), groups=dim)
        self.conv1_1 = nn.Conv2d(dim, dim, (1, 11), padding=(0, 5), groups=dim)
        self.conv1_2 = nn.Conv2d(dim, dim, (11, 1), padding=(5, 0), groups=dim)
        self.conv2_1 = nn.Conv2d(dim, dim, (1, 21), padding=(0, 10), groups=dim)
        self.conv2_2 = nn.Conv2d(dim, dim, (21, 1), padding=(10, 0), groups=dim)
        self.conv3 = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.conv0(x)
        branches = (self.conv0_2(self.conv0_1(attn)) + self.conv1_2(self.conv1_1(attn))
                    + self.conv2_2(self.conv2_1(attn)))
        return self.conv3(attn + branches) * x


class SpatialAttention(nn.Module):
    """1x1 conv -> GELU -> MSCA -> 1x1 conv, with a residual connection."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj_1 = nn.Conv2d(dim, dim, 1)
        self.activation = nn.GELU()
        self.spatial_gating_unit = AttentionModule(dim)
        self.proj_2 = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_2(self.spatial_gating_unit(self.activation(self.proj_1(x)))) + x


class Block(nn.Module):
    """MSCAN block: BN -> attention and BN -> MLP, each scaled per channel (layer scale 1e-2)
    and added through stochastic depth."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(dim)
        self.attn = SpatialAttention(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.layer_scale_1 = nn.Parameter(1e-2 * torch.ones(dim))
        self.layer_scale_2 = nn.Parameter(1e-2 * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.layer_scale_1[:, None, None] * self.attn(self.norm1(x)))
        return x + self.drop_path(self.layer_scale_2[:, None, None] * self.mlp(self.norm2(x)))


class MSCAN(nn.Module):
    """Multi-scale convolutional attention network: four stages at strides 4, 8, 16, 32.

    Attributes ``patch_embed{i}``, ``block{i}``, ``norm{i}`` (a LayerNorm over channels) for
    i = 1..4, as in the reference, so its checkpoints load by name.
    """

    def __init__(self, in_channels: int = 3, embed_dims: Sequence[int] = (64, 128, 320, 512),
                 mlp_ratios: Sequence[float] = (8, 8, 4, 4), depths: Sequence[int] = (3, 5, 27, 3),
                 drop_rate: float = 0.0, drop_path_rate: float = 0.3):
        super().__init__()
        if not (len(embed_dims) == len(mlp_ratios) == len(depths)):
            raise MedplanError(f"MSCAN: embed_dims, mlp_ratios and depths need one value per stage, got "
                               f"{list(embed_dims)}, {list(mlp_ratios)}, {list(depths)}")
        self.embed_dims = [int(d) for d in embed_dims]
        self.depths = [int(d) for d in depths]
        self.num_stages = len(self.depths)
        rates = torch.linspace(0, drop_path_rate, sum(self.depths), device="cpu").tolist()
        cur = 0
        for i in range(self.num_stages):
            if i == 0:
                embed: nn.Module = StemConv(in_channels, self.embed_dims[0])
            else:
                embed = OverlapPatchEmbed(self.embed_dims[i - 1], self.embed_dims[i])
            blocks = nn.ModuleList(Block(self.embed_dims[i], mlp_ratios[i], drop=drop_rate, drop_path=rates[cur + j])
                                   for j in range(self.depths[i]))
            cur += self.depths[i]
            setattr(self, f"patch_embed{i + 1}", embed)
            setattr(self, f"block{i + 1}", blocks)
            setattr(self, f"norm{i + 1}", nn.LayerNorm(self.embed_dims[i]))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The reference's initialisation from scratch (conv: normal with std sqrt(2 / fan_out))."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"patch_embed{i}")(x)
            for block in getattr(self, f"block{i}"):
                x = block(x)
            x = getattr(self, f"norm{i}")(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()
            outs.append(x)
        return outs


# ---------------------------------------------------------------------------------- NMF
def nmf_init_coef(x: torch.Tensor, bases: torch.Tensor, inv_t: float = 1.0) -> torch.Tensor:
    """Initial coefficients: softmax over the R bases of ``inv_t * x^T bases``; (B, N, R)."""
    return F.softmax(inv_t * torch.bmm(x.transpose(1, 2), bases), dim=-1)


def nmf_update_coef(x: torch.Tensor, bases: torch.Tensor, coef: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Multiplicative update of C in x ~ bases @ C^T: C * (x^T B) / (C B^T B + eps)."""
    return coef * torch.bmm(x.transpose(1, 2), bases) / (coef.bmm(bases.transpose(1, 2).bmm(bases)) + eps)


def nmf_update_bases(x: torch.Tensor, bases: torch.Tensor, coef: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Multiplicative update of B in x ~ B @ coef^T: B * (x C) / (B C^T C + eps)."""
    return bases * torch.bmm(x, coef) / (bases.bmm(coef.transpose(1, 2).bmm(coef)) + eps)


def nmf_factorize(x: torch.Tensor, bases: torch.Tensor, steps: int, inv_t: float = 1.0,
                  eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative factorisation x (B, D, N) ~ bases (B, D, R) @ coef (B, N, R)^T.

    Softmax initialisation of the coefficients, ``steps`` rounds of (coef, bases) updates and
    a last coefficient update, as the reference's ``local_inference`` + ``compute_coef``.
    Gradients flow through every step (the reference does not cut them).
    """
    coef = nmf_init_coef(x, bases, inv_t)
    for _ in range(steps):
        coef = nmf_update_coef(x, bases, coef, eps)
        bases = nmf_update_bases(x, bases, coef, eps)
    return bases, nmf_update_coef(x, bases, coef, eps)


class NMF2D(nn.Module):
    """Matrix decomposition of a feature map by NMF: (B, C, H, W) -> its rank-R reconstruction.

    The map is viewed as S matrices of D = C/S channels by N = H*W positions; bases are drawn
    uniformly at random and L2-normalised over D at every forward (``rand_init=True``), or
    drawn once and kept as a buffer.
    """

    def __init__(self, MD_S: int = 1, MD_R: int = 64, train_steps: int = 6, eval_steps: int = 7,
                 inv_t: float = 1.0, rand_init: bool = True, eps: float = 1e-6):
        super().__init__()
        self.S, self.R = int(MD_S), int(MD_R)
        self.train_steps, self.eval_steps = int(train_steps), int(eval_steps)
        self.inv_t, self.rand_init, self.eps = float(inv_t), bool(rand_init), float(eps)

    def build_bases(self, batch: int, dim: int, device: torch.device) -> torch.Tensor:
        return F.normalize(torch.rand(batch * self.S, dim, self.R, device=device), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        if C % self.S:
            raise MedplanError(f"NMF2D: {C} channels are not divisible into MD_S={self.S} groups")
        D = C // self.S
        dtype = x.dtype
        no_autocast = (torch.autocast(device_type=x.device.type, enabled=False)
                       if x.device.type in ("cuda", "cpu", "mps", "xpu") else contextlib.nullcontext())
        with no_autocast:
            mat = x.float().reshape(B * self.S, D, H * W)
            if self.rand_init:
                bases = self.build_bases(B, D, x.device)
            else:
                if not hasattr(self, "bases"):
                    self.register_buffer("bases", self.build_bases(1, D, x.device))
                bases = self.bases.repeat(B, 1, 1)
            steps = self.train_steps if self.training else self.eval_steps
            bases, coef = nmf_factorize(mat, bases, steps, self.inv_t, self.eps)
            out = torch.bmm(bases, coef.transpose(1, 2))
        return out.reshape(B, C, H, W).to(dtype)

    def extra_repr(self) -> str:
        return f"S={self.S}, R={self.R}, steps={self.train_steps}/{self.eval_steps}, inv_t={self.inv_t}"


# ---------------------------------------------------------------------------------- head
class ConvModule(nn.Sequential):
    """1x1 conv (+ GroupNorm) (+ ReLU) with mmcv ConvModule's child names ``conv``, ``gn``, ``activate``;
    the convolution has a bias only without a norm (mmcv's ``bias='auto'``)."""

    def __init__(self, in_channels: int, out_channels: int, *, norm_groups: int | None, act: bool):
        super().__init__()
        self.add_module("conv", nn.Conv2d(in_channels, out_channels, 1, bias=norm_groups is None))
        if norm_groups is not None:
            if out_channels % norm_groups:
                raise MedplanError(f"LightHamHead: {out_channels} channels are not divisible into "
                                   f"{norm_groups} GroupNorm groups")
            self.add_module("gn", nn.GroupNorm(norm_groups, out_channels))
        if act:
            self.add_module("activate", nn.ReLU(inplace=True))


class Hamburger(nn.Module):
    """1x1 conv -> ReLU -> NMF -> 1x1 conv + GN, added to the input, ReLU."""

    def __init__(self, ham_channels: int, ham_kwargs: dict | None = None, norm_groups: int = 32):
        super().__init__()
        self.ham_in = ConvModule(ham_channels, ham_channels, norm_groups=None, act=False)
        self.ham = NMF2D(**(ham_kwargs or {}))
        self.ham_out = ConvModule(ham_channels, ham_channels, norm_groups=norm_groups, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        enjoy = F.relu(self.ham_in(x))
        enjoy = self.ham_out(self.ham(enjoy))
        return F.relu(x + enjoy)


class LightHamHead(nn.Module):
    """Stages 2-4 resized to stride 8 and concatenated, squeezed by 1x1 conv + GN + ReLU, a
    Hamburger, aligned by 1x1 conv + GN + ReLU, then dropout and a 1x1 classifier."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, in_index: Sequence[int] = (1, 2, 3),
                 channels: int = 1024, ham_channels: int = 1024, ham_kwargs: dict | None = None,
                 norm_groups: int = 32, dropout_ratio: float = 0.1):
        super().__init__()
        if len(in_channels) != len(in_index):
            raise MedplanError(f"LightHamHead: in_channels {list(in_channels)} and in_index {list(in_index)} "
                               "differ in length")
        self.in_index = [int(i) for i in in_index]
        self.squeeze = ConvModule(sum(in_channels), ham_channels, norm_groups=norm_groups, act=True)
        self.hamburger = Hamburger(ham_channels, ham_kwargs, norm_groups=norm_groups)
        self.align = ConvModule(ham_channels, channels, norm_groups=norm_groups, act=True)
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """mmcv's defaults: ConvModule convs Kaiming-normal (fan_out), norms 1/0, classifier N(0, 0.01)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.conv_seg.weight, 0.0, 0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        inputs = [features[i] for i in self.in_index]
        size = inputs[0].shape[-2:]
        inputs = [inputs[0]] + [F.interpolate(t, size=size, mode="bilinear", align_corners=False) for t in inputs[1:]]
        x = self.squeeze(torch.cat(inputs, dim=1))
        x = self.align(self.hamburger(x))
        return self.conv_seg(self.dropout(x))


class SegNeXt(nn.Module):
    """MSCAN encoder (``backbone``) + LightHamHead (``decode_head``), logits at the input size."""

    def __init__(self, in_channels: int, num_classes: int, *, embed_dims: Sequence[int] = (64, 128, 320, 512),
                 depths: Sequence[int] = (3, 5, 27, 3), mlp_ratios: Sequence[float] = (8, 8, 4, 4),
                 drop_path_rate: float = 0.3, in_index: Sequence[int] = (1, 2, 3), channels: int = 1024,
                 ham_channels: int = 1024, ham_kwargs: dict | None = None, dropout_ratio: float = 0.1):
        super().__init__()
        self.backbone = MSCAN(in_channels, embed_dims, mlp_ratios, depths, drop_path_rate=drop_path_rate)
        self.decode_head = LightHamHead([self.backbone.embed_dims[i] for i in in_index], num_classes, in_index,
                                        channels=channels, ham_channels=ham_channels, ham_kwargs=ham_kwargs,
                                        dropout_ratio=dropout_ratio)
        self.pretrained_report: dict | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.decode_head(self.backbone(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _int_list(value: Sequence[int], what: str) -> list[int]:
    try:
        out = [int(v) for v in value]
    except (TypeError, ValueError):
        raise MedplanError(f"segnext_l: {what} must be a list of positive integers, got {value!r}") from None
    if not out or any(v < 1 for v in out):
        raise MedplanError(f"segnext_l: {what} must be a list of positive integers, got {value!r}")
    return out


SEGNEXT_L = ModelCard(
    paper_params_m=49.0,
    weights=Weights((WeightsFile(MSCAN_L_FILENAME, MSCAN_L_URL, target="backbone", ignore_missing=CLASSIFIER_KEYS),)),
    test_options={"embed_dims": [8, 16, 32, 32], "depths": [1, 1, 1, 1], "channels": 32},
)


@register_model("segnext_l", card=SEGNEXT_L, family="cnn",
                description="SegNeXt-L (NeurIPS'22): MSCAN-L encoder + LightHamHead (NMF)")
def segnext_l(in_channels: int, num_classes: int, *, drop_path_rate: float = 0.3,
              embed_dims: Sequence[int] = (64, 128, 320, 512), depths: Sequence[int] = (3, 5, 27, 3),
              channels: int = 1024) -> SegNeXt:
    """SegNeXt-L as configured for ADE20K; ``embed_dims``/``depths``/``channels`` exist for tiny test models
    (the ImageNet weights ``mscan_l.pth`` fit only the defaults)."""
    if not 0.0 <= float(drop_path_rate) < 1.0:
        raise MedplanError(f"segnext_l: drop_path_rate must be in [0, 1), got {drop_path_rate!r}")
    dims = _int_list(embed_dims, "embed_dims")
    deps = _int_list(depths, "depths")
    if len(dims) != 4 or len(deps) != 4:
        raise MedplanError(f"segnext_l: embed_dims and depths need 4 values (one per stage), got {dims}, {deps}")
    channels = _int_list([channels], "channels")[0]
    return SegNeXt(in_channels, num_classes, embed_dims=dims, depths=deps, drop_path_rate=float(drop_path_rate),
                   channels=channels, ham_channels=channels)
