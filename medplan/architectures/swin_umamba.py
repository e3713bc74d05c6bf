"""Swin-UMamba (Liu et al., MICCAI 2024): an ImageNet-pretrained VMamba-T encoder in a UNETR-style U-Net.

Module structure and parameter names follow the authors' ``nnunetv2/nets/SwinUMamba.py``
(JiarunLiu/Swin-UMamba), so that the VMamba-T ImageNet checkpoint loads the way their
``load_pretrained_ckpt`` loads it:

- ``stem``: 7x7 stride-2 conv (in_channels -> 48) + InstanceNorm (affine);
- ``vssm_encoder`` (``VSSMEncoder``): ``patch_embed`` (2x2 patches, 48 -> 96, LayerNorm), four
  ``layers`` of ``VSSBlock`` (depths 2, 2, 9, 2; widths 96, 192, 384, 768) with
  ``downsamples`` (``PatchMerging2D``) between them. A block is ``x + DropPath(SS2D(ln_1(x)))``;
  ``SS2D`` projects (``in_proj``), runs a depth-wise 3x3 conv (``conv2d``) + SiLU, scans the
  feature map in four directions (row-major, column-major and both reversed) with the selective
  scan (``x_proj_weight``, ``dt_projs_weight/bias``, ``A_logs``, ``Ds``: four sets each), sums
  the four results, normalises (``out_norm``), gates with SiLU of the second half of
  ``in_proj`` and projects back (``out_proj``);
- ``encoder1..5``: residual conv blocks (MONAI ``UnetrBasicBlock``: conv-IN-LReLU-conv-IN +
  1x1 shortcut) on the input and on the four encoder outputs before the bottleneck;
- ``decoder6..2`` (MONAI ``UnetrUpBlock``: 2x2 transposed conv, concatenation with the skip,
  residual block), ``decoder1`` and ``out_layers`` (1x1 conv; four heads with deep supervision).

The MONAI blocks are re-written here (same names: ``layer.conv1.conv.weight``, ...), so
MONAI is not needed. The 60M parameters of Table 1 are the whole network (VMamba-T encoder
~22M, residual decoder ~37M).

Pretrained weights: VMamba-T ImageNet-1k ``vssmtiny_dp01_ckpt_epoch_292.pth`` (VMamba v0
release, 91.6 MB; the file Swin-UMamba's README tells to download). As in the authors'
``load_pretrained_ckpt``: keys ``layers.i.downsample.*`` become ``downsamples.i.*``; the
classifier (``norm.*``, ``head.*``), the 4x4 RGB patch embedding (``patch_embed.proj.*``,
which does not fit the 2x2, 48-channel one) and ``patch_embed.norm.weight`` are skipped
(their skip list names ``patch_embed.norm.weight`` twice, so ``patch_embed.norm.bias`` does
load — kept as they do it). The stem and decoder start from random weights.

Input sides that are not multiples of 32 are zero-padded and the logits cropped back (the
card's input contract, applied by ``build_model``). The selective scan is
:mod:`medplan.architectures.selective_scan` (mamba-ssm's CUDA kernel when installed, else an exact
chunked PyTorch scan).
"""
from __future__ import annotations

import math
import re
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import DropPath
from torch import nn

from medplan.architectures._init import init_weights
from medplan.architectures.card import InputContract, ModelCard, Weights, WeightsFile
from medplan.architectures.registry import register_model
from medplan.architectures.selective_scan import selective_scan_fn
from medplan.errors import MedplanError

WEIGHTS_FILE = "vssmtiny_dp01_ckpt_epoch_292.pth"
WEIGHTS_URL = "https://github.com/MzeroMiko/VMamba/releases/download/%2320240218/vssmtiny_dp01_ckpt_epoch_292.pth"
#: checkpoint keys the authors' load_pretrained_ckpt skips (classifier, RGB 4x4 patch embedding)
SKIPPED_KEYS = ("norm.weight", "norm.bias", "head.weight", "head.bias",
                "patch_embed.proj.weight", "patch_embed.proj.bias", "patch_embed.norm.weight")


# --------------------------------------------------------------------------- VMamba encoder
class PatchEmbed2D(nn.Module):
    """Non-overlapping patches -> channels-last tokens (B, H/p, W/p, C)."""

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96, norm_layer=nn.LayerNorm):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).permute(0, 2, 3, 1)
        return self.norm(x) if self.norm is not None else x


class PatchMerging2D(nn.Module):
    """2x2 neighbours concatenated (4C), LayerNorm, linear to 2C: halves the resolution."""

    def __init__(self, dim: int, norm_layer=nn.LayerNorm):
        super().__init__()
        self.dim = dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2  # an odd side drops its last row/column
        x = x[:, :h, :w]
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class SS2D(nn.Module):
    """2D selective scan: the feature map read in four directions by one Mamba SSM each."""

    K = 4  # scan directions

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 3, expand: float = 2, dt_rank="auto",
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_scale: float = 1.0, dt_init_floor: float = 1e-4,
                 dropout: float = 0.0, conv_bias: bool = True, bias: bool = False):
        super().__init__()
        self.d_model, self.d_state = d_model, d_state
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        k, d_inner = self.K, self.d_inner
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=bias)
        self.conv2d = nn.Conv2d(d_inner, d_inner, kernel_size=d_conv, padding=(d_conv - 1) // 2, groups=d_inner,
                                bias=conv_bias)
        self.act = nn.SiLU()
        # four stacked projections (as the official checkpoint stores them), nn.Linear's default init
        bound = 1.0 / math.sqrt(d_inner)
        self.x_proj_weight = nn.Parameter(torch.empty(k, self.dt_rank + 2 * d_state, d_inner).uniform_(-bound, bound))
        dt_std = self.dt_rank ** -0.5 * dt_scale
        self.dt_projs_weight = nn.Parameter(torch.empty(k, d_inner, self.dt_rank).uniform_(-dt_std, dt_std))
        # dt bias: softplus(bias) log-uniform in [dt_min, dt_max]
        dt = torch.exp(torch.rand(k, d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_projs_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        # S4D-real A = -(1..N) per channel, kept as log; D = 1 (skip)
        a = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(k * d_inner, 1)
        self.A_logs = nn.Parameter(torch.log(a))
        self.Ds = nn.Parameter(torch.ones(k * d_inner))
        self.A_logs._no_weight_decay = True  # type: ignore[attr-defined]
        self.Ds._no_weight_decay = True  # type: ignore[attr-defined]
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def forward_core(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) -> sum of the four directional scans, (B, H*W, D) in row-major order."""
        b, d, h, w = x.shape
        length, k = h * w, self.K
        rows = x.flatten(2)                                   # row-major
        cols = x.transpose(2, 3).flatten(2)                   # column-major
        xs = torch.stack([rows, cols], dim=1)
        xs = torch.cat([xs, xs.flip(-1)], dim=1)              # (b, 4, d, l)
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)
        dts, Bs, Cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)
        f = torch.promote_types(xs.dtype, torch.float32)  # the scan runs in fp32 (fp64 in tests)
        y = selective_scan_fn(
            xs.to(f).reshape(b, k * d, length), dts.to(f).reshape(b, k * d, length),
            -torch.exp(self.A_logs.to(f)), Bs.to(f).contiguous(), Cs.to(f).contiguous(), self.Ds.to(f),
            z=None, delta_bias=self.dt_projs_bias.to(f).view(-1), delta_softplus=True,
        ).view(b, k, d, length)
        y_rows = y[:, 0] + y[:, 2].flip(-1)
        y_cols = y[:, 1] + y[:, 3].flip(-1)
        y_cols = y_cols.view(b, d, w, h).transpose(2, 3).reshape(b, d, length)
        return (y_rows + y_cols).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        x, z = self.in_proj(x).chunk(2, dim=-1)
        x = self.act(self.conv2d(x.permute(0, 3, 1, 2).contiguous()))
        y = self.forward_core(x).reshape(b, h, w, -1)
        y = self.out_norm(y) * F.silu(z)
        out = self.out_proj(y)
        return self.dropout(out) if self.dropout is not None else out


class VSSBlock(nn.Module):
    """Pre-norm residual SS2D block on channels-last tokens."""

    def __init__(self, hidden_dim: int, drop_path: float = 0.0, norm_layer=nn.LayerNorm, attn_drop_rate: float = 0.0,
                 d_state: int = 16):
        super().__init__()
        self.ln_1 = norm_layer(hidden_dim)
        self.self_attention = SS2D(d_model=hidden_dim, dropout=attn_drop_rate, d_state=d_state)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.self_attention(self.ln_1(x)))


class VSSLayer(nn.Module):
    """One encoder stage: ``depth`` VSSBlocks (downsampling lives in VSSMEncoder.downsamples)."""

    def __init__(self, dim: int, depth: int, attn_drop: float = 0.0, drop_path: Sequence[float] | float = 0.0,
                 norm_layer=nn.LayerNorm, use_checkpoint: bool = False, d_state: int = 16):
        super().__init__()
        self.dim, self.use_checkpoint = dim, use_checkpoint
        rates = list(drop_path) if isinstance(drop_path, (list, tuple)) else [drop_path] * depth
        self.blocks = nn.ModuleList(VSSBlock(dim, rates[i], norm_layer, attn_drop, d_state) for i in range(depth))
        self.downsample = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            if self.use_checkpoint and x.requires_grad:
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x


class VSSMEncoder(nn.Module):
    """VMamba-T feature extractor: returns [input, stage1, ..., stage4] as (B, C, H, W)."""

    def __init__(self, patch_size: int = 4, in_chans: int = 3, depths: Sequence[int] = (2, 2, 9, 2),
                 dims: Sequence[int] = (96, 192, 384, 768), d_state: int = 16, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.2, norm_layer=nn.LayerNorm,
                 patch_norm: bool = True, use_checkpoint: bool = False):
        super().__init__()
        dims = list(dims)
        self.num_layers = len(depths)
        self.dims, self.embed_dim, self.num_features = dims, dims[0], dims[-1]
        self.patch_embed = PatchEmbed2D(patch_size, in_chans, dims[0], norm_layer if patch_norm else None)
        self.pos_drop = nn.Dropout(p=drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # stochastic depth decay
        self.layers = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        for i, depth in enumerate(depths):
            self.layers.append(VSSLayer(dims[i], depth, attn_drop_rate, dpr[sum(depths[:i]):sum(depths[:i + 1])],
                                        norm_layer, use_checkpoint, d_state))
            if i < self.num_layers - 1:
                self.downsamples.append(PatchMerging2D(dims[i], norm_layer))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        init_weights(m)  # as VMamba: convs keep torch's init

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = [x]
        x = self.pos_drop(self.patch_embed(x))
        for s, layer in enumerate(self.layers):
            x = layer(x)
            outs.append(x.permute(0, 3, 1, 2))
            if s < len(self.downsamples):
                x = self.downsamples[s](x)
        return outs


# --------------------------------------------------------------------------- MONAI-style decoder blocks
def _conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1, *, bias: bool = False,
          transposed: bool = False) -> nn.Sequential:
    """A convolution wrapped as MONAI's ``Convolution`` (one child named ``conv``)."""
    if transposed:
        layer = nn.ConvTranspose2d(in_ch, out_ch, kernel, stride=stride, bias=bias)
    else:
        layer = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=(kernel - stride + 1) // 2, bias=bias)
    return nn.Sequential(OrderedDict(conv=layer))


class UnetResBlock(nn.Module):
    """conv-IN-LeakyReLU-conv-IN plus a (1x1 conv + IN) shortcut when the width changes, then LeakyReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        self.conv1 = _conv(in_channels, out_channels, kernel_size, stride)
        self.conv2 = _conv(out_channels, out_channels, kernel_size, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.01, inplace=True)
        self.norm1 = nn.InstanceNorm2d(out_channels)
        self.norm2 = nn.InstanceNorm2d(out_channels)
        if in_channels != out_channels or stride != 1:
            self.conv3 = _conv(in_channels, out_channels, 1, stride)
            self.norm3 = nn.InstanceNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lrelu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        residual = self.norm3(self.conv3(x)) if hasattr(self, "conv3") else x
        return self.lrelu(out + residual)


class UnetrBasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        self.layer = UnetResBlock(in_channels, out_channels, kernel_size, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class UnetrUpBlock(nn.Module):
    """2x2 transposed conv, concatenation with the skip, residual block."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, upsample_kernel_size: int = 2):
        super().__init__()
        self.transp_conv = _conv(in_channels, out_channels, upsample_kernel_size, upsample_kernel_size,
                                 transposed=True)
        self.conv_block = UnetResBlock(2 * out_channels, out_channels, kernel_size, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv_block(torch.cat([self.transp_conv(x), skip], dim=1))


class UnetOutBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = _conv(in_channels, out_channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


# --------------------------------------------------------------------------- the network
class SwinUMamba(nn.Module):
    """Swin-UMamba mapping (B, in_chans, H, W) to logits (B, out_chans, H, W)."""

    multiple = 32  # total downsampling: stem 2 x patch 2 x three merges

    def __init__(self, in_chans: int = 1, out_chans: int = 13, dims: Sequence[int] = (96, 192, 384, 768),
                 depths: Sequence[int] = (2, 2, 9, 2), stem_channels: int = 48, d_state: int = 16,
                 drop_path_rate: float = 0.2, deep_supervision: bool = False, use_checkpoint: bool = False):
        super().__init__()
        dims = [int(d) for d in dims]
        if len(dims) != 4 or len(depths) != 4:
            raise MedplanError(f"swin_umamba: dims and depths need 4 entries, got {list(dims)} and {list(depths)}")
        feat = [int(stem_channels)] + dims
        self.in_chans, self.out_chans, self.feat_size, self.hidden_size = in_chans, out_chans, feat, dims[-1]
        self.stem = nn.Sequential(nn.Conv2d(in_chans, feat[0], kernel_size=7, stride=2, padding=3),
                                  nn.InstanceNorm2d(feat[0], eps=1e-5, affine=True))
        self.vssm_encoder = VSSMEncoder(patch_size=2, in_chans=feat[0], depths=depths, dims=dims, d_state=d_state,
                                        drop_path_rate=drop_path_rate, use_checkpoint=use_checkpoint)
        self.encoder1 = UnetrBasicBlock(in_chans, feat[0])
        self.encoder2 = UnetrBasicBlock(feat[0], feat[1])
        self.encoder3 = UnetrBasicBlock(feat[1], feat[2])
        self.encoder4 = UnetrBasicBlock(feat[2], feat[3])
        self.encoder5 = UnetrBasicBlock(feat[3], feat[4])
        self.decoder6 = UnetrUpBlock(self.hidden_size, feat[4])
        self.decoder5 = UnetrUpBlock(self.hidden_size, feat[3])
        self.decoder4 = UnetrUpBlock(feat[3], feat[2])
        self.decoder3 = UnetrUpBlock(feat[2], feat[1])
        self.decoder2 = UnetrUpBlock(feat[1], feat[0])
        self.decoder1 = UnetrBasicBlock(feat[0], feat[0])
        self.deep_supervision = deep_supervision
        # one head without deep supervision (the official model always builds four; the unused
        # three would be parameters DDP never sees a gradient for)
        self.out_layers = nn.ModuleList(UnetOutBlock(feat[i], out_chans) for i in range(4 if deep_supervision else 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Logits for sides that are multiples of 32 (the input contract pads the others)."""
        vss = self.vssm_encoder(self.stem(x))
        enc1 = self.encoder1(x)
        enc2 = self.encoder2(vss[0])
        enc3 = self.encoder3(vss[1])
        enc4 = self.encoder4(vss[2])
        enc5 = self.encoder5(vss[3])
        dec4 = self.decoder6(vss[4], enc5)
        dec3 = self.decoder5(dec4, enc4)
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        dec_out = self.decoder1(self.decoder2(dec1, enc1))
        if self.deep_supervision:  # full resolution first, as nnU-Net expects
            return [head(f) for head, f in zip(self.out_layers, (dec_out, dec1, dec2, dec3))]
        return self.out_layers[0](dec_out)

    @torch.no_grad()
    def freeze_encoder(self) -> None:
        """The authors' warm-up: freeze the VMamba encoder except its (new) patch embedding."""
        for name, param in self.vssm_encoder.named_parameters():
            if "patch_embed" not in name:
                param.requires_grad = False

    @torch.no_grad()
    def unfreeze_encoder(self) -> None:
        for param in self.vssm_encoder.parameters():
            param.requires_grad = True


def vmamba_key_map(key: str) -> str | None:
    """Official VMamba-T key -> VSSMEncoder key, as the authors' load_pretrained_ckpt does."""
    if key in SKIPPED_KEYS:
        return None
    return re.sub(r"^layers\.(\d+)\.downsample\.", r"downsamples.\1.", key)


#: VMamba-T ImageNet weights into the encoder, as the authors' load_pretrained_ckpt
VMAMBA_T_WEIGHTS = WeightsFile(WEIGHTS_FILE, WEIGHTS_URL, target="vssm_encoder", key_map=vmamba_key_map,
                               ignore_missing=(r"^patch_embed\.proj\.", r"^patch_embed\.norm\.weight$"),
                               adapt_in_channels=False)
SWIN_UMAMBA = ModelCard(
    paper_params_m=60.0,
    weights=Weights((VMAMBA_T_WEIGHTS,)),
    input=InputContract(pad_to_multiple=SwinUMamba.multiple),
    test_options={"dims": (8, 16, 32, 64), "depths": (1, 1, 1, 1), "d_state": 4, "stem_channels": 8},
)


@register_model("swin_umamba", card=SWIN_UMAMBA, family="mamba",
                description="Swin-UMamba (MICCAI'24): VMamba-T (SS2D) encoder, UNETR-style decoder")
def swin_umamba(in_channels: int, num_classes: int, *, dims: Sequence[int] = (96, 192, 384, 768),
                depths: Sequence[int] = (2, 2, 9, 2),
                stem_channels: int = 48, d_state: int = 16, drop_path_rate: float = 0.2,
                deep_supervision: bool = False, use_checkpoint: bool = False) -> nn.Module:
    return SwinUMamba(in_channels, num_classes, dims=dims, depths=depths, stem_channels=stem_channels,
                      d_state=d_state, drop_path_rate=drop_path_rate, deep_supervision=deep_supervision,
                      use_checkpoint=use_checkpoint)
