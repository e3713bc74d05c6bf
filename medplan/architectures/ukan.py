"""U-KAN (Li et al., AAAI 2025): a U-Net whose deep stages are tokenized Kolmogorov-Arnold blocks.

Structure and parameter names follow the authors' ``Seg_UKAN/archs.py`` (CUHK-AIM-Group/U-KAN)
and the ``KANLinear`` of ``Seg_UKAN/kan.py`` (efficient-kan), so their checkpoints load:

- ``encoder1..3``: conv stages (two 3x3 conv-BN-ReLU, then 2x2 max-pooling and ReLU), widths
  C/8, C/4, C for ``embed_dims = (C, C', C'')``;
- two tokenized KAN stages: ``patch_embed3/4`` (3x3 stride-2 conv + LayerNorm) and one
  ``KANBlock`` each (``block1`` at C', ``block2`` at C'' in the bottleneck), then ``norm3/4``;
- the decoder mirrors it: ``decoder1..5`` (``D_ConvLayer``) with bilinear x2 upsampling and
  additive skips, KAN blocks ``dblock1/2`` (+ ``dnorm3/4``) at the two deepest levels, and a
  1x1 ``final`` conv.

A ``KANBlock`` is ``x + KANLayer(norm2(x))``; a ``KANLayer`` is three (``KANLinear`` ->
depth-wise 3x3 conv-BN-ReLU on the token grid) pairs. ``KANLinear(x) = W_b SiLU(x) +
sum_i (w_s * c)_i B_i(x)``: a SiLU base branch plus learnable cubic B-splines on 5 grid
intervals over [-1, 1] (``grid_size=5, spline_order=3``), parameters ``base_weight``,
``spline_weight``, ``spline_scaler`` and the buffer ``grid``.

U-KAN-L is ``embed_dims=(256, 320, 512)`` (the default of the authors' UKAN class; their
training script's default (128, 160, 256) is U-KAN): 25.4M parameters (Table 1: 25M). No
pretrained weights exist; the benchmark trains it from scratch (its only deviation).
Deviation from the official code: ``encoder1`` takes ``in_channels`` (the official one is
hard-wired to 3 input channels). Input sides that are not multiples of 32 are zero-padded
and the logits cropped back (the card's input contract, applied by ``build_model``).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from medplan.architectures._init import init_weights
from medplan.architectures.card import InputContract, ModelCard
from medplan.architectures.registry import register_model
from medplan.errors import MedplanError


# --------------------------------------------------------------------------- KAN layer
class KANLinear(nn.Module):
    """Kolmogorov-Arnold linear layer: SiLU base branch + B-spline branch per (output, input) pair."""

    def __init__(self, in_features: int, out_features: int, grid_size: int = 5, spline_order: int = 3,
                 scale_noise: float = 0.1, scale_base: float = 1.0, scale_spline: float = 1.0,
                 enable_standalone_scale_spline: bool = True, base_activation=nn.SiLU, grid_eps: float = 0.02,
                 grid_range: Sequence[float] = (-1.0, 1.0)):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.grid_size, self.spline_order = grid_size, spline_order
        step = (grid_range[1] - grid_range[0]) / grid_size
        # knots extended by spline_order on each side: (in_features, grid_size + 2 * spline_order + 1)
        grid = torch.arange(-spline_order, grid_size + spline_order + 1, dtype=torch.float32) * step + grid_range[0]
        self.register_buffer("grid", grid.expand(in_features, -1).contiguous())
        self.base_weight = nn.Parameter(torch.empty(out_features, in_features))
        self.spline_weight = nn.Parameter(torch.empty(out_features, in_features, grid_size + spline_order))
        self.enable_standalone_scale_spline = enable_standalone_scale_spline
        if enable_standalone_scale_spline:
            self.spline_scaler = nn.Parameter(torch.empty(out_features, in_features))
        self.scale_noise, self.scale_base, self.scale_spline = scale_noise, scale_base, scale_spline
        self.base_activation = base_activation()
        self.grid_eps = grid_eps
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.base_weight, a=math.sqrt(5) * self.scale_base)
        if self.base_weight.is_meta:  # parameter counting only: no values to fit
            return
        with torch.no_grad():
            # splines start as a least-squares fit of small noise at the interior knots
            noise = (torch.rand(self.grid_size + 1, self.in_features, self.out_features) - 0.5) \
                * self.scale_noise / self.grid_size
            coeff = self.curve2coeff(self.grid.T[self.spline_order:-self.spline_order], noise)
            scale = 1.0 if self.enable_standalone_scale_spline else self.scale_spline
            self.spline_weight.copy_(scale * coeff)
            if self.enable_standalone_scale_spline:
                nn.init.kaiming_uniform_(self.spline_scaler, a=math.sqrt(5) * self.scale_spline)

    def b_splines(self, x: torch.Tensor) -> torch.Tensor:
        """B-spline bases of every input: (N, in) -> (N, in, grid_size + spline_order), Cox-de Boor."""
        grid = self.grid  # fp32 knots; promotion keeps the bases in fp32 under autocast
        x = x.unsqueeze(-1)
        bases = ((x >= grid[:, :-1]) & (x < grid[:, 1:])).to(x.dtype)
        for k in range(1, self.spline_order + 1):
            left = (x - grid[:, :-(k + 1)]) / (grid[:, k:-1] - grid[:, :-(k + 1)])
            right = (grid[:, k + 1:] - x) / (grid[:, k + 1:] - grid[:, 1:-k])
            bases = left * bases[..., :-1] + right * bases[..., 1:]
        return bases

    def curve2coeff(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Spline coefficients (out, in, coeff) whose curves pass closest to ``y`` (N, in, out) at ``x`` (N, in)."""
        a = self.b_splines(x).transpose(0, 1)           # (in, N, coeff)
        b = y.transpose(0, 1)                            # (in, N, out)
        solution = torch.linalg.lstsq(a, b).solution     # (in, coeff, out)
        return solution.permute(2, 0, 1).contiguous()

    @property
    def scaled_spline_weight(self) -> torch.Tensor:
        if self.enable_standalone_scale_spline:
            return self.spline_weight * self.spline_scaler.unsqueeze(-1)
        return self.spline_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.in_features)
        base = F.linear(self.base_activation(x), self.base_weight)
        spline = F.linear(self.b_splines(x).flatten(1), self.scaled_spline_weight.flatten(1))
        return (base + spline).reshape(*shape[:-1], self.out_features)


def _init_token_module(m: nn.Module) -> None:
    """The authors' init for the tokenized stages (KANLinear keeps its own)."""
    init_weights(m, fan_out_convs=True)


class DW_bn_relu(nn.Module):
    """Depth-wise 3x3 conv + BN + ReLU applied to tokens (B, N, C) laid out on their (H, W) grid."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)
        self.bn = nn.BatchNorm2d(dim)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        x = x.transpose(1, 2).reshape(b, c, h, w)
        x = self.relu(self.bn(self.dwconv(x)))
        return x.flatten(2).transpose(1, 2)


class KANLayer(nn.Module):
    """Three (KANLinear -> depth-wise conv) pairs over the tokens."""

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 drop: float = 0.0, no_kan: bool = False, grid_size: int = 5, spline_order: int = 3):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.dim = in_features
        if no_kan:
            make = lambda i, o: nn.Linear(i, o)  # noqa: E731 — the authors' MLP ablation
        else:
            make = lambda i, o: KANLinear(i, o, grid_size=grid_size, spline_order=spline_order)  # noqa: E731
        self.fc1 = make(in_features, hidden_features)
        self.fc2 = make(hidden_features, out_features)
        self.fc3 = make(hidden_features, out_features)
        self.dwconv_1 = DW_bn_relu(hidden_features)
        self.dwconv_2 = DW_bn_relu(hidden_features)
        self.dwconv_3 = DW_bn_relu(hidden_features)
        self.drop = nn.Dropout(drop)
        self.apply(_init_token_module)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = self.dwconv_1(self.fc1(x), h, w)
        x = self.dwconv_2(self.fc2(x), h, w)
        return self.dwconv_3(self.fc3(x), h, w)


class KANBlock(nn.Module):
    """Pre-norm residual tokenized KAN block."""

    def __init__(self, dim: int, drop: float = 0.0, drop_path: float = 0.0, norm_layer=nn.LayerNorm,
                 no_kan: bool = False, grid_size: int = 5, spline_order: int = 3):
        super().__init__()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.layer = KANLayer(dim, dim, drop=drop, no_kan=no_kan, grid_size=grid_size, spline_order=spline_order)
        self.apply(_init_token_module)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return x + self.drop_path(self.layer(self.norm2(x), h, w))


class PatchEmbed(nn.Module):
    """Overlapping patch embedding: conv (kernel ``patch_size``, ``stride``) + LayerNorm -> tokens."""

    def __init__(self, patch_size: int = 3, stride: int = 2, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim)
        self.apply(_init_token_module)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


def _double_conv(in_ch: int, mid_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, mid_ch, 3, padding=1), nn.BatchNorm2d(mid_ch), nn.ReLU(inplace=True),
                         nn.Conv2d(mid_ch, out_ch, 3, padding=1), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


class ConvLayer(nn.Module):
    """The authors' ``ConvLayer``: two 3x3 conv-BN-ReLU at the output width (child ``conv``)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = _double_conv(in_ch, out_ch, out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class D_ConvLayer(nn.Module):
    """The authors' ``D_ConvLayer``: 3x3 conv-BN-ReLU at the input width, then one to the output width."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = _double_conv(in_ch, in_ch, out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _tokens_to_map(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return x.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()


def _up(x: torch.Tensor) -> torch.Tensor:
    return F.relu(F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False))


class UKAN(nn.Module):
    """U-KAN mapping (B, in_channels, H, W) to logits (B, num_classes, H, W)."""

    multiple = 32  # three max-poolings and two stride-2 patch embeddings

    def __init__(self, num_classes: int, input_channels: int = 3, embed_dims: Sequence[int] = (256, 320, 512),
                 no_kan: bool = False, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 norm_layer=nn.LayerNorm, depths: Sequence[int] = (1, 1, 1), grid_size: int = 5,
                 spline_order: int = 3):
        super().__init__()
        e = [int(v) for v in embed_dims]
        if len(e) != 3 or e[0] % 8:
            raise MedplanError(f"ukan: embed_dims must be 3 widths, the first divisible by 8, got {list(embed_dims)}")
        kan = dict(no_kan=no_kan, grid_size=grid_size, spline_order=spline_order, norm_layer=norm_layer, drop=drop_rate)
        self.encoder1 = ConvLayer(input_channels, e[0] // 8)
        self.encoder2 = ConvLayer(e[0] // 8, e[0] // 4)
        self.encoder3 = ConvLayer(e[0] // 4, e[0])
        self.norm3, self.norm4 = norm_layer(e[1]), norm_layer(e[2])
        self.dnorm3, self.dnorm4 = norm_layer(e[1]), norm_layer(e[0])
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.block1 = nn.ModuleList([KANBlock(e[1], drop_path=dpr[0], **kan)])
        self.block2 = nn.ModuleList([KANBlock(e[2], drop_path=dpr[1], **kan)])
        self.dblock1 = nn.ModuleList([KANBlock(e[1], drop_path=dpr[0], **kan)])
        self.dblock2 = nn.ModuleList([KANBlock(e[0], drop_path=dpr[1], **kan)])
        self.patch_embed3 = PatchEmbed(3, 2, e[0], e[1])
        self.patch_embed4 = PatchEmbed(3, 2, e[1], e[2])
        self.decoder1 = D_ConvLayer(e[2], e[1])
        self.decoder2 = D_ConvLayer(e[1], e[0])
        self.decoder3 = D_ConvLayer(e[0], e[0] // 4)
        self.decoder4 = D_ConvLayer(e[0] // 4, e[0] // 8)
        self.decoder5 = D_ConvLayer(e[0] // 8, e[0] // 8)
        self.final = nn.Conv2d(e[0] // 8, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for sides that are multiples of 32 (the input contract pads the others)."""
        # convolutional stages
        t1 = out = F.relu(F.max_pool2d(self.encoder1(x), 2, 2))
        t2 = out = F.relu(F.max_pool2d(self.encoder2(out), 2, 2))
        t3 = out = F.relu(F.max_pool2d(self.encoder3(out), 2, 2))
        # tokenized KAN stage, then the bottleneck
        out, h, w = self.patch_embed3(out)
        for blk in self.block1:
            out = blk(out, h, w)
        t4 = out = _tokens_to_map(self.norm3(out), h, w)
        out, h, w = self.patch_embed4(out)
        for blk in self.block2:
            out = blk(out, h, w)
        out = _tokens_to_map(self.norm4(out), h, w)
        # decoder: KAN blocks at the two deepest levels
        out = _up(self.decoder1(out)) + t4
        h, w = out.shape[-2:]
        out = out.flatten(2).transpose(1, 2)
        for blk in self.dblock1:
            out = blk(out, h, w)
        out = _tokens_to_map(self.dnorm3(out), h, w)
        out = _up(self.decoder2(out)) + t3
        h, w = out.shape[-2:]
        out = out.flatten(2).transpose(1, 2)
        for blk in self.dblock2:
            out = blk(out, h, w)
        out = _tokens_to_map(self.dnorm4(out), h, w)
        out = _up(self.decoder3(out)) + t2
        out = _up(self.decoder4(out)) + t1
        out = _up(self.decoder5(out))
        return self.final(out)


UKAN_L = ModelCard(paper_params_m=25.0, input=InputContract(pad_to_multiple=UKAN.multiple),
                   test_options={"embed_dims": (16, 24, 32)})


@register_model("ukan_l", card=UKAN_L, description="U-KAN-L (AAAI'25): conv stages + tokenized KAN blocks, trained "
                "from scratch", family="kan")
def ukan_l(in_channels: int, num_classes: int, *, embed_dims: Sequence[int] = (256, 320, 512),
           no_kan: bool = False, drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> nn.Module:
    return UKAN(num_classes, in_channels, embed_dims=embed_dims, no_kan=no_kan, drop_rate=drop_rate,
                drop_path_rate=drop_path_rate)
