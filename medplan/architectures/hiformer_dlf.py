"""HiFormer's Double-Level Fusion blocks (:mod:`medplan.architectures.hiformer`): CrossViT's
multi-scale block, in which each level's CLS token cross-attends over the other level's patch
tokens. Names follow the reference, so its checkpoints load without renaming."""
from __future__ import annotations

from typing import Sequence

import torch
from timm.layers import DropPath
from timm.models.vision_transformer import Block, Mlp
from torch import nn


class CrossAttention(nn.Module):
    """The CLS token (first token) attends over all tokens of the other level."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: float | None = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.wq = nn.Linear(dim, dim, bias=qkv_bias)
        self.wk = nn.Linear(dim, dim, bias=qkv_bias)
        self.wv = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        h = self.num_heads
        q = self.wq(x[:, 0:1]).reshape(B, 1, h, C // h).transpose(1, 2)   # B h 1 d
        k = self.wk(x).reshape(B, N, h, C // h).transpose(1, 2)           # B h N d
        v = self.wv(x).reshape(B, N, h, C // h).transpose(1, 2)
        attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(B, 1, C)
        return self.proj_drop(self.proj(out))


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention of the CLS token with a residual (no MLP in HiFormer)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 qk_scale: float | None = None, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 norm_layer: type[nn.Module] = nn.LayerNorm, has_mlp: bool = True):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = CrossAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                                   attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.has_mlp = has_mlp
        if has_mlp:
            self.norm2 = norm_layer(dim)
            self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, 0:1] + self.drop_path(self.attn(self.norm1(x)))
        if self.has_mlp:
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class MultiScaleBlock(nn.Module):
    """One DLF stage: each level's CLS token, projected to the other level's width, cross-attends
    over that level's patch tokens and is projected back (CrossViT's multi-scale block)."""

    def __init__(self, dim: Sequence[int], patches: Sequence[int], depth: Sequence[int], num_heads: Sequence[int],
                 mlp_ratio: Sequence[float], qkv_bias: bool = False, qk_scale: float | None = None, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: Sequence[float] = (0.0,),
                 norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        n = len(dim)
        self.num_branches = n
        branch_blocks = []
        for d in range(n):
            tmp = [Block(dim=dim[d], num_heads=num_heads[d], mlp_ratio=mlp_ratio[d], qkv_bias=qkv_bias,
                         attn_drop=attn_drop, drop_path=drop_path[i], norm_layer=norm_layer) for i in range(depth[d])]
            if tmp:
                branch_blocks.append(nn.Sequential(*tmp))
        # built as in the reference but, as there, without effect on the output (see the docstring
        # of medplan.architectures.hiformer)
        self.blocks = nn.ModuleList(branch_blocks) if branch_blocks else None
        self.projs = nn.ModuleList(
            nn.Sequential(norm_layer(dim[d]), nn.GELU(), nn.Linear(dim[d], dim[(d + 1) % n])) for d in range(n))
        self.fusion = nn.ModuleList()
        for d in range(n):
            d_ = (d + 1) % n
            kwargs = dict(dim=dim[d_], num_heads=num_heads[d_], mlp_ratio=mlp_ratio[d], qkv_bias=qkv_bias,
                          qk_scale=qk_scale, drop=drop, attn_drop=attn_drop, drop_path=drop_path[-1],
                          norm_layer=norm_layer, has_mlp=False)
            if depth[-1] == 0:  # the reference's "backward capability": one block, not a Sequential
                self.fusion.append(CrossAttentionBlock(**kwargs))
            else:
                self.fusion.append(nn.Sequential(*[CrossAttentionBlock(**kwargs) for _ in range(depth[-1])]))
        self.revert_projs = nn.ModuleList(
            nn.Sequential(norm_layer(dim[(d + 1) % n]), nn.GELU(), nn.Linear(dim[(d + 1) % n], dim[d]))
            for d in range(n))

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        proj_cls = [proj(x[:, 0:1]) for x, proj in zip(xs, self.projs)]
        outs = []
        for i in range(self.num_branches):
            other = xs[(i + 1) % self.num_branches]
            fused = self.fusion[i](torch.cat((proj_cls[i], other[:, 1:]), dim=1))
            outs.append(torch.cat((self.revert_projs[i](fused[:, 0:1]), xs[i][:, 1:]), dim=1))
        return outs
