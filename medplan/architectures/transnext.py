"""TransNeXt-Tiny (Shi, CVPR 2024) with a UPerHead: ``transnext_t``.

Written after the official implementation (DaiShiResearch/TransNeXt,
``classification/transnext_native.py`` and ``segmentation/upernet/transnext_{native,cuda}.py``).
Module structure and parameter names follow it, so the ImageNet checkpoint
``transnext_tiny_224_1k.pth`` loads into ``model.backbone`` without renaming
(``patch_embed1.proj.weight``, ``block1.0.attn.query_embedding``,
``block1.0.attn.relative_pos_bias_local``, ``block3.14.mlp.dwconv.dwconv.weight``,
``block4.1.attn.qkv.weight``, ``norm4.weight``, ...); its classifier (``head.*``) is reported
as unused.

Pieces: ``OverlapPatchEmbed`` (7x7/4 stem, then 3x3/2), ``Block`` = pre-norm residual
``AggregatedAttention`` (stages 1-3) or ``Attention`` (stage 4, ``sr_ratio`` 1) and
``ConvolutionalGLU`` (``fc1`` -> depth-wise 3x3 ``dwconv`` gate -> ``fc2``). Aggregated
attention has every query attend, through one softmax, to its 3x3 neighbourhood (zero-padded
sliding window, out-of-image taps masked) and to a pooled map (``sr`` 1x1 conv, GELU,
adaptive average pooling by ``sr_ratio``, ``norm``); queries and keys are L2-normalised,
scaled by ``softplus(temperature)`` and by the log of the number of keys each query sees
(``seq_length_scale``), with the learnable ``query_embedding``; the local branch has a
static bias ``relative_pos_bias_local`` and a query-dependent one (``learnable_tokens``,
``learnable_bias``); the pooled branch a continuous position bias from an MLP
(``cpb_fc1``/``cpb_fc2``) on log-spaced relative coordinates.

Input size. The relative coordinate tables depend on the feature size. They are computed for
the actual feature size of each input (and cached per size and device), as the reference's
``is_extrapolation=True`` mode does; the coordinates are normalised by the ImageNet
pre-training size (``pretrain_size`` 224), as in the reference. The authors' UPerNet config
(``upernet_transnext_tiny_512x512_160k_ade20k_ss.py``: ``img_size=512``,
``is_extrapolation=False``) builds the tables for 512x512 and interpolates the bias
bilinearly for other sizes; at the training size the interpolation is the identity, so for
a plan's fixed patch size the two agree exactly.

Local attention (:mod:`medplan.architectures.aggregated_attention`): a pure-PyTorch
implementation (:func:`local_qk_rpb`, :func:`local_av`, shifted views of a zero-padded map, no
9x unfold copy) runs anywhere; when the authors' compiled ``swattention`` extension is
importable and the tensors are on CUDA, it is used instead (``local_attention="auto"``), in
float32 as the PyTorch path computes.

Configuration of the segmentation backbone ``transnext_tiny``: embed dims 72/144/288/576,
heads 3/6/12/24, MLP ratios 8/8/4/4, depths 2/2/15/2, pooling ratios 8/4/2/1, window 3,
qkv bias, LayerNorm eps 1e-6 in the blocks, **drop path 0.4** (the seg backbone's setting;
the ImageNet training used 0.3). The four stage outputs (after each stage's norm) go to
mmseg's UPerHead (:mod:`medplan.architectures.uperhead`, 512 channels); logits at 1/4 are
resized bilinearly to the input. The auxiliary FCN head is not built. Total 57.74M
parameters with a 2-class head (backbone 27.68M, i.e. the paper's 28.2M less the 0.58M
ImageNet classifier; head 30.06M). Table 1 of the benchmark paper: 58M; TransNeXt's UPerNet
table: 59M (150 ADE20K classes, auxiliary FCN head included).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from timm.layers import DropPath
from torch import nn

from medplan.architectures._init import init_weights
from medplan.architectures.aggregated_attention import (  # noqa: F401 - the ops are imported from here too
    LOCAL_ATTENTION_CORES, local_av, local_padding_mask, local_qk_rpb, pooled_size, relative_position_cpb,
    swattention_available,
)
from medplan.architectures.card import ModelCard, ParamGroups, Weights, WeightsFile
from medplan.architectures.registry import register_model
from medplan.architectures.uperhead import BackboneUPerNet
from medplan.errors import MedplanError

TRANSNEXT_T_FILENAME = "transnext_tiny_224_1k.pth"
TRANSNEXT_T_URL = "https://huggingface.co/DaiShiResearch/transnext-tiny-224-1k/resolve/main/transnext_tiny_224_1k.pth"
GEOMETRY_CACHE_SIZE = 32  # (stage, size, device) entries of position tables kept


# ------------------------------------------------------------------ modules (reference names)
class DWConv(nn.Module):
    def __init__(self, dim: int = 768):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=3, stride=1, padding=1, bias=True, groups=dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        b, n, c = x.shape
        x = self.dwconv(x.transpose(1, 2).reshape(b, c, height, width))
        return x.flatten(2).transpose(1, 2)


class ConvolutionalGLU(nn.Module):
    """GELU(dwconv(x1)) * x2 with [x1, x2] = fc1(x); hidden width 2/3 of ``hidden_features``."""

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 drop: float = 0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden = int(2 * (hidden_features or in_features) / 3)
        self.fc1 = nn.Linear(in_features, hidden * 2)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        x, v = self.fc1(x).chunk(2, dim=-1)
        x = self.drop(self.act(self.dwconv(x, height, width)) * v)
        return self.drop(self.fc2(x))


def _temperature(num_heads: int) -> nn.Parameter:
    # softplus(temperature) starts at 1 / 0.24
    return nn.Parameter(torch.log((torch.ones(num_heads, 1, 1) / 0.24).exp() - 1))


class AggregatedAttention(nn.Module):
    """Pixel-focused attention: 3x3 sliding window + pooled keys under one softmax."""

    def __init__(self, dim: int, num_heads: int = 8, window_size: int = 3, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, sr_ratio: int = 1, core: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if window_size % 2 != 1:
            raise ValueError(f"window size must be odd, got {window_size}")
        if core not in LOCAL_ATTENTION_CORES:
            raise ValueError(f"local attention core must be one of {LOCAL_ATTENTION_CORES}, got {core!r}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.sr_ratio = sr_ratio
        self.window_size = window_size
        self.local_len = window_size ** 2
        self.core = core

        self.temperature = _temperature(num_heads)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.query_embedding = nn.Parameter(nn.init.trunc_normal_(torch.empty(num_heads, 1, self.head_dim), std=0.02))
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        # pooled features
        self.sr = nn.Conv2d(dim, dim, kernel_size=1, stride=1, padding=0)
        self.norm = nn.LayerNorm(dim)
        self.act = nn.GELU()
        # MLP generating the continuous relative position bias of the pooled keys
        self.cpb_fc1 = nn.Linear(2, 512, bias=True)
        self.cpb_act = nn.ReLU(inplace=True)
        self.cpb_fc2 = nn.Linear(512, num_heads, bias=True)
        # static and query-dependent biases of the local window
        self.relative_pos_bias_local = nn.Parameter(
            nn.init.trunc_normal_(torch.empty(num_heads, self.local_len), std=0.0004))
        self.learnable_tokens = nn.Parameter(
            nn.init.trunc_normal_(torch.empty(num_heads, self.head_dim, self.local_len), std=0.02))
        self.learnable_bias = nn.Parameter(torch.zeros(num_heads, 1, self.local_len))

    def forward(self, x: torch.Tensor, height: int, width: int, relative_pos_index: torch.Tensor,
                relative_coords_table: torch.Tensor, seq_length_scale: torch.Tensor,
                padding_mask: torch.Tensor | None) -> torch.Tensor:
        b, n, c = x.shape
        heads, hd = self.num_heads, self.head_dim
        pool_h, pool_w = pooled_size(height, width, self.sr_ratio)
        pool_len = pool_h * pool_w

        q_norm = F.normalize(self.q(x).reshape(b, n, heads, hd).permute(0, 2, 1, 3), dim=-1)
        q_scaled = (q_norm + self.query_embedding) * F.softplus(self.temperature) * seq_length_scale

        k_local, v_local = self.kv(x).reshape(b, n, 2 * heads, hd).permute(0, 2, 1, 3).chunk(2, dim=1)
        attn_local = local_qk_rpb(q_scaled, F.normalize(k_local, dim=-1), self.relative_pos_bias_local,
                                  height, width, self.window_size, padding_mask, self.core)

        x_ = x.permute(0, 2, 1).reshape(b, c, height, width)
        x_ = F.adaptive_avg_pool2d(self.act(self.sr(x_)), (pool_h, pool_w)).reshape(b, c, pool_len).permute(0, 2, 1)
        x_ = self.norm(x_)
        k_pool, v_pool = self.kv(x_).reshape(b, pool_len, 2 * heads, hd).permute(0, 2, 1, 3).chunk(2, dim=1)

        pool_bias = self.cpb_fc2(self.cpb_act(self.cpb_fc1(relative_coords_table))).transpose(0, 1)
        pool_bias = pool_bias[:, relative_pos_index.view(-1)].view(-1, n, pool_len)
        attn_pool = q_scaled @ F.normalize(k_pool, dim=-1).transpose(-2, -1) + pool_bias

        attn = self.attn_drop(torch.cat([attn_local, attn_pool], dim=-1).softmax(dim=-1))
        attn_local, attn_pool = torch.split(attn, [self.local_len, pool_len], dim=-1)
        attn_local = (q_norm @ self.learnable_tokens) + self.learnable_bias + attn_local
        x_local = local_av(attn_local, v_local, height, width, self.window_size, self.core)
        x = (x_local + attn_pool @ v_pool).transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x))


class Attention(nn.Module):
    """Full attention of the last stage, with the same cosine scaling and position-bias MLP."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.temperature = _temperature(num_heads)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.query_embedding = nn.Parameter(nn.init.trunc_normal_(torch.empty(num_heads, 1, self.head_dim), std=0.02))
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.cpb_fc1 = nn.Linear(2, 512, bias=True)
        self.cpb_act = nn.ReLU(inplace=True)
        self.cpb_fc2 = nn.Linear(512, num_heads, bias=True)

    def forward(self, x: torch.Tensor, height: int, width: int, relative_pos_index: torch.Tensor,
                relative_coords_table: torch.Tensor, seq_length_scale: torch.Tensor,
                padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3 * self.num_heads, self.head_dim).permute(0, 2, 1, 3).chunk(3, dim=1)
        rel_bias = self.cpb_fc2(self.cpb_act(self.cpb_fc1(relative_coords_table))).transpose(0, 1)
        rel_bias = rel_bias[:, relative_pos_index.view(-1)].view(-1, n, n)
        q = (F.normalize(q, dim=-1) + self.query_embedding) * F.softplus(self.temperature) * seq_length_scale
        attn = self.attn_drop((q @ F.normalize(k, dim=-1).transpose(-2, -1) + rel_bias).softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    """x + attn(norm1(x)), then x + ConvolutionalGLU(norm2(x)), with stochastic depth."""

    def __init__(self, dim: int, num_heads: int, window_size: int = 3, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, sr_ratio: int = 1,
                 norm_eps: float = 1e-6, with_cp: bool = False, core: str = "auto"):
        super().__init__()
        self.with_cp = with_cp
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        if sr_ratio == 1:
            self.attn: nn.Module = Attention(dim, num_heads, qkv_bias, attn_drop, drop)
        else:
            self.attn = AggregatedAttention(dim, num_heads, window_size, qkv_bias, attn_drop, drop, sr_ratio, core)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = ConvolutionalGLU(dim, int(dim * mlp_ratio), drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _forward(self, x: torch.Tensor, height: int, width: int, *geometry) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), height, width, *geometry))
        return x + self.drop_path(self.mlp(self.norm2(x), height, width))

    def forward(self, x: torch.Tensor, height: int, width: int, *geometry) -> torch.Tensor:
        if self.with_cp and x.requires_grad:
            return cp.checkpoint(self._forward, x, height, width, *geometry, use_reentrant=False)
        return self._forward(x, height, width, *geometry)


class OverlapPatchEmbed(nn.Module):
    """Strided convolution with overlapping patches, then LayerNorm; returns tokens and the grid size."""

    def __init__(self, patch_size: int = 7, stride: int = 4, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        if patch_size <= stride:
            raise ValueError("patch size must exceed the stride")
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        _, _, height, width = x.shape
        return self.norm(x.flatten(2).transpose(1, 2)), height, width


class TransNeXt(nn.Module):
    """TransNeXt backbone: (B, C, H, W) -> four NCHW feature maps at strides 4, 8, 16, 32."""

    def __init__(self, in_chans: int = 3, embed_dims: Sequence[int] = (72, 144, 288, 576),
                 num_heads: Sequence[int] = (3, 6, 12, 24), mlp_ratios: Sequence[float] = (8, 8, 4, 4),
                 depths: Sequence[int] = (2, 2, 15, 2), sr_ratios: Sequence[int] = (8, 4, 2, 1), window_size: int = 3,
                 patch_size: int = 4, qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.4, pretrain_size: int = 224, with_cp: bool = False, core: str = "auto"):
        super().__init__()
        lengths = {len(embed_dims), len(num_heads), len(mlp_ratios), len(depths), len(sr_ratios)}
        if len(lengths) != 1:
            raise ValueError("embed_dims, num_heads, mlp_ratios, depths and sr_ratios must have one entry per stage")
        self.num_stages = len(depths)
        self.depths = [int(d) for d in depths]
        self.sr_ratios = [int(s) for s in sr_ratios]
        self.window_size = int(window_size)
        self.pretrain_size = int(pretrain_size)
        self.out_channels = [int(c) for c in embed_dims]
        self._geometry_cache: dict[tuple, tuple] = {}
        dpr = torch.linspace(0, drop_path_rate, sum(self.depths), device="cpu").tolist()
        cur = 0
        for i in range(self.num_stages):
            patch_embed = OverlapPatchEmbed(patch_size * 2 - 1 if i == 0 else 3, patch_size if i == 0 else 2,
                                            in_chans if i == 0 else embed_dims[i - 1], embed_dims[i])
            block = nn.ModuleList(
                Block(embed_dims[i], num_heads[i], self.window_size, mlp_ratios[i], qkv_bias, drop_rate,
                      attn_drop_rate, dpr[cur + j], self.sr_ratios[i], with_cp=with_cp, core=core)
                for j in range(self.depths[i]))
            cur += self.depths[i]
            setattr(self, f"patch_embed{i + 1}", patch_embed)
            setattr(self, f"block{i + 1}", block)
            setattr(self, f"norm{i + 1}", nn.LayerNorm(embed_dims[i], eps=1e-6))
        for m in self.modules():
            self._init_weights(m)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        init_weights(m, fan_out_convs=True)

    def no_weight_decay_keywords(self) -> set[str]:
        """Name fragments the reference exempts from weight decay."""
        return {"query_embedding", "relative_pos_bias_local", "cpb", "temperature"}

    @torch.compiler.assume_constant_result
    def stage_geometry(self, stage: int, height: int, width: int, device: torch.device) -> tuple:
        """(relative_pos_index, relative_coords_table, seq_length_scale, padding_mask) of a stage's
        feature size; computed once per size and device (all without gradient). A function of
        the sizes only: torch.compile runs it once and keeps the tables as constants, instead of
        breaking the graph at the data-dependent ``torch.unique`` inside (22 breaks before)."""
        key = (stage, height, width, str(device))
        cached = self._geometry_cache.get(key)
        if cached is not None:
            return cached
        sr = self.sr_ratios[stage]
        pool_h, pool_w = pooled_size(height, width, sr)
        pretrain = self.pretrain_size // (2 ** (stage + 2))
        index, table = relative_position_cpb((height, width), (pool_h, pool_w), (pretrain, pretrain))
        if sr == 1:  # full attention: every query sees all N keys
            scale = torch.log(torch.tensor(float(pool_h * pool_w)))
            mask = None
        else:  # valid window taps + pooled keys, per query
            mask = local_padding_mask(height, width, self.window_size)
            local_len = (~mask).sum(-1, keepdim=True).float()
            scale = torch.log(local_len + pool_h * pool_w)
            mask = mask.to(device)
        cached = (index.to(device), table.to(device), scale.to(device), mask)
        if len(self._geometry_cache) >= GEOMETRY_CACHE_SIZE:  # e.g. whole images of many sizes
            self._geometry_cache.clear()
        self._geometry_cache[key] = cached
        return cached

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b = x.shape[0]
        outs = []
        for i in range(self.num_stages):
            x, height, width = getattr(self, f"patch_embed{i + 1}")(x)
            geometry = self.stage_geometry(i, height, width, x.device)
            for blk in getattr(self, f"block{i + 1}"):
                x = blk(x, height, width, *geometry)
            x = getattr(self, f"norm{i + 1}")(x)
            x = x.reshape(b, height, width, -1).permute(0, 3, 1, 2).contiguous()
            outs.append(x)
        return outs


class TransNeXtUPerNet(BackboneUPerNet):
    """TransNeXt backbone + UPerHead; logits at the input resolution."""


#: the authors' paramwise_cfg custom_keys with decay_mult=0 (mmcv matches them as substrings of the full name;
#: biases and the UPerHead's BatchNorm, named ``bn``, keep their weight decay)
NO_DECAY_KEYS = ("query_embedding", "relative_pos_bias_local", "cpb", "temperature", "norm")
WEIGHT_DECAY_DEVIATION = ("no weight decay on parameters named query_embedding, relative_pos_bias_local, cpb*, "
                          "temperature or *norm* (the authors' paramwise_cfg custom_keys, decay_mult=0); other "
                          "tensors use the plan's weight decay")


def no_weight_decay(name: str, param: torch.Tensor | None = None) -> bool:
    """The reference config's rule: any of :data:`NO_DECAY_KEYS` occurs in the parameter name."""
    return any(key in name for key in NO_DECAY_KEYS)


TRANSNEXT_T = ModelCard(
    paper_params_m=58.0,
    weights=Weights((WeightsFile(TRANSNEXT_T_FILENAME, TRANSNEXT_T_URL, target="backbone"),)),
    param_groups=ParamGroups(no_weight_decay=no_weight_decay),
    deviations=(WEIGHT_DECAY_DEVIATION,),
    test_options={"embed_dims": [8, 16, 32, 64], "num_heads": [1, 2, 4, 8], "depths": [1, 1, 1, 1],
                  "decoder_channels": 16},
)


@register_model("transnext_t", card=TRANSNEXT_T, family="transformer",
                description="TransNeXt-Tiny (aggregated attention) + UPerHead (Shi, CVPR 2024)")
def transnext_t(in_channels: int, num_classes: int, *, embed_dims: Sequence[int] = (72, 144, 288, 576),
                num_heads: Sequence[int] = (3, 6, 12, 24), mlp_ratios: Sequence[float] = (8, 8, 4, 4),
                depths: Sequence[int] = (2, 2, 15, 2),
                sr_ratios: Sequence[int] = (8, 4, 2, 1), window_size: int = 3, drop_path_rate: float = 0.4,
                pretrain_size: int = 224, decoder_channels: int = 512, with_cp: bool = False,
                local_attention: str = "auto") -> nn.Module:
    """TransNeXt-Tiny + UPerHead as in the authors' ADE20K config; ImageNet-1k weights ``transnext_tiny_224_1k.pth``.

    ``embed_dims``/``num_heads``/``depths``/``decoder_channels`` shrink the model (tests);
    ``with_cp`` trades compute for memory (gradient checkpointing per block);
    ``local_attention`` picks the sliding-window kernels (``auto``: the compiled ``swattention``
    extension on CUDA when installed, else PyTorch).
    """
    if local_attention not in LOCAL_ATTENTION_CORES:
        raise MedplanError(f"transnext_t: local_attention must be one of {', '.join(LOCAL_ATTENTION_CORES)}, "
                           f"got {local_attention!r}")
    backbone = TransNeXt(in_channels, embed_dims, num_heads, mlp_ratios, depths, sr_ratios, window_size,
                         drop_path_rate=drop_path_rate, pretrain_size=pretrain_size, with_cp=with_cp,
                         core=local_attention)
    return TransNeXtUPerNet(backbone, num_classes, decoder_channels)
