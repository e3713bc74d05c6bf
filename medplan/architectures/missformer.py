"""MISSFormer (Huang et al., IEEE TMI 2023): enhanced transformer encoder, context bridge and decoder.

Written after the official implementation (ZhifangDeng/MISSFormer: ``networks/MISSFormer.py``,
``networks/segformer.py``), with its module structure and parameter names (``backbone.patch_embed1.proj``,
``backbone.block1.0.attn.kv``, ``backbone.block1.0.mlp.dwconv.dwconv``, ``bridge.bridge_layer1.attn.
scale_reduce.sr0``, ``bridge.bridge_layer1.mixffn3.fc1``, ``decoder_2.concat_linear``, ``decoder_0.layer_up.
expand``, ``decoder_0.last_layer``, the reference's spelling ``BridegeBlock_4`` included). No library has
these blocks; they are small and written here in plain PyTorch. With the same weights the outputs equal
the reference's at 224x224 (checked against its code).

- Encoder (``MiT``): overlapping patch embeddings (7x7/4, then 3x3/2) to 64/128/320/512 channels, two
  *enhanced transformer blocks* per stage (efficient self-attention with spatial reduction 8/4/2/1,
  heads 1/2/5/8, and the ReMix-FFN ``MixFFN_skip``: ``GELU(LN(dwconv(fc1 x) + fc1 x))``).
- Enhanced transformer context bridge (``BridegeBlock_4``, four ``BridgeLayer_4``): the four encoder maps
  are flattened into one token sequence of width 64 (a C-channel pixel becomes C/64 tokens), attend
  jointly (keys/values from the spatially reduced maps, ``Scale_reduce``), and each level's share goes
  through its own ReMix-FFN before being cut back into the four maps.
- Decoder (``MyDecoderLayer``): concatenation with the bridged skip, linear fusion, two enhanced
  transformer blocks, patch expanding x2 (x4 and a 1x1 convolution at the last level).

Size: 42.46M parameters for 2 output channels (Table 1: 42M). The count includes parameters the
reference builds but never uses, kept for its checkpoint keys: ``MixFFN_skip.norm2``/``norm3`` and, in
``decoder_3`` (called without a skip), ``concat_linear`` and both ``layer_former`` blocks (6.9M; 7.0M
unused in all). They get no gradient, so the card asks the trainer to run DDP with
``find_unused_parameters``.

No pretrained weights: the reference trains MISSFormer from scratch (its ``encoder_pretrained`` argument
is never used and ``train.py`` loads nothing), so the model is registered with ``pretrained=False``.

Resolution: the reference hard-codes a 224x224 input (token offsets 3136/4704/5684/6076 and a 7x7
decoder start); here every offset follows the input's feature sizes, so any input whose sides are
multiples of 32 runs natively; other sizes are resized bilinearly up to the next multiple of 32 inside
``forward`` and the logits resized back. The benchmark paper ran MISSFormer at 224x224 internally:
the model card's input contract (applied by ``build_model``) resizes every input to ``img_size``
(default 224) and the logits back, and ``config.json`` records the deviation. The gray-to-RGB ``repeat`` of the reference is
replaced by a first patch embedding with ``in_channels`` inputs (the same for a from-scratch model).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medplan.architectures.card import InputContract, ModelCard
from medplan.architectures.registry import register_model
from medplan.errors import MedplanError

STRIDE = 32
INTERNAL_SIZE = 224


# ----------------------------------------------------------------------------------- blocks
class DWConv(nn.Module):
    """3x3 depth-wise convolution on a token sequence of an H x W map."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, C = x.shape
        return self.dwconv(x.transpose(1, 2).reshape(B, C, H, W)).flatten(2).transpose(1, 2)


class MixFFN_skip(nn.Module):  # noqa: N801 (the reference's name)
    """ReMix-FFN: ``fc2(GELU(LN(dwconv(fc1 x) + fc1 x)))``; ``norm2``/``norm3`` exist, unused, as in the reference."""

    def __init__(self, c1: int, c2: int):
        super().__init__()
        self.fc1 = nn.Linear(c1, c2)
        self.dwconv = DWConv(c2)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(c2, c1)
        self.norm1 = nn.LayerNorm(c2)
        self.norm2 = nn.LayerNorm(c2)
        self.norm3 = nn.LayerNorm(c2)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(self.act(self.norm1(self.dwconv(h, H, W) + h)))


class EfficientSelfAtten(nn.Module):
    """Multi-head self-attention with keys/values from an R x R strided convolution of the map."""

    def __init__(self, dim: int, head: int, reduction_ratio: int):
        super().__init__()
        self.head = head
        self.reduction_ratio = reduction_ratio
        self.scale = (dim // head) ** -0.5
        self.q = nn.Linear(dim, dim, bias=True)
        self.kv = nn.Linear(dim, dim * 2, bias=True)
        self.proj = nn.Linear(dim, dim)
        if reduction_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, reduction_ratio, reduction_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.head, C // self.head).permute(0, 2, 1, 3)
        if self.reduction_ratio > 1:
            x = self.norm(self.sr(x.permute(0, 2, 1).reshape(B, C, H, W)).reshape(B, C, -1).permute(0, 2, 1))
        return self.proj(_attend(q, self.kv(x), self.head, self.scale, B, N, C))


def _attend(q: torch.Tensor, kv: torch.Tensor, head: int, scale: float, B: int, N: int, C: int) -> torch.Tensor:
    """softmax(q k^T * scale) v with the reference's head split; (B, N, C)."""
    kv = kv.reshape(B, -1, 2, head, C // head).permute(2, 0, 3, 1, 4)
    attn = ((q @ kv[0].transpose(-2, -1)) * scale).softmax(dim=-1)
    return (attn @ kv[1]).transpose(1, 2).reshape(B, N, C)


class TransformerBlock(nn.Module):
    """Enhanced transformer block: pre-norm efficient attention + pre-norm ReMix-FFN."""

    def __init__(self, dim: int, head: int, reduction_ratio: int = 1, token_mlp: str = "mix_skip"):
        super().__init__()
        if token_mlp != "mix_skip":
            raise MedplanError(f"missformer: only the paper's token_mlp 'mix_skip' is implemented, got {token_mlp!r}")
        self.norm1 = nn.LayerNorm(dim)
        self.attn = EfficientSelfAtten(dim, head, reduction_ratio)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MixFFN_skip(dim, int(dim * 4))

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), H, W)
        return x + self.mlp(self.norm2(x), H, W)


class OverlapPatchEmbeddings(nn.Module):
    def __init__(self, patch_size: int = 7, stride: int = 4, padding: int = 1, in_ch: int = 3, dim: int = 768):
        super().__init__()
        self.proj = nn.Conv2d(in_ch, dim, patch_size, stride, padding)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        px = self.proj(x)
        _, _, H, W = px.shape
        return self.norm(px.flatten(2).transpose(1, 2)), H, W


class MiT(nn.Module):
    """The encoder: four stages of overlapping patch embedding + enhanced transformer blocks + LayerNorm."""

    def __init__(self, in_channels: int, dims: Sequence[int], layers: Sequence[int], heads: Sequence[int],
                 reduction_ratios: Sequence[int], token_mlp: str = "mix_skip"):
        super().__init__()
        patch_sizes, strides, paddings = [7, 3, 3, 3], [4, 2, 2, 2], [3, 1, 1, 1]
        for i in range(4):
            cin = in_channels if i == 0 else dims[i - 1]
            setattr(self, f"patch_embed{i + 1}", OverlapPatchEmbeddings(patch_sizes[i], strides[i], paddings[i], cin,
                                                                        dims[i]))
            setattr(self, f"block{i + 1}", nn.ModuleList(
                TransformerBlock(dims[i], heads[i], reduction_ratios[i], token_mlp) for _ in range(layers[i])))
            setattr(self, f"norm{i + 1}", nn.LayerNorm(dims[i]))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        B = x.shape[0]
        outs = []
        for i in range(1, 5):
            x, H, W = getattr(self, f"patch_embed{i}")(x)
            for blk in getattr(self, f"block{i}"):
                x = blk(x, H, W)
            x = getattr(self, f"norm{i}")(x)
            x = x.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous()
            outs.append(x)
        return outs


# ----------------------------------------------------------------------------------- bridge
def _level_lengths(sizes: Sequence[tuple[int, int]], mults: Sequence[int]) -> list[int]:
    """Tokens per level in the bridge's sequence: an H x W map of m*C channels gives m*H*W tokens."""
    return [m * h * w for (h, w), m in zip(sizes, mults)]


class Scale_reduce(nn.Module):  # noqa: N801 (the reference's name)
    """Keys/values of the bridge: levels 1-3 reduced by strided convolutions (8/4/2 at 224), level 4 as is."""

    def __init__(self, dim: int, reduction_ratio: Sequence[int], mults: Sequence[int]):
        super().__init__()
        self.dim = dim
        self.reduction_ratio = list(reduction_ratio)
        self.mults = list(mults)
        if len(self.reduction_ratio) != 4:
            raise MedplanError("missformer: the bridge needs four reduction ratios")
        for j in range(3):
            c = dim * self.mults[j]
            r = self.reduction_ratio[3 - j]
            setattr(self, f"sr{j}", nn.Conv2d(c, c, r, r))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> torch.Tensor:
        B, N, C = x.shape
        lengths = _level_lengths(sizes, self.mults)
        parts = torch.split(x, lengths, dim=1)
        reduced = []
        for j in range(3):
            (h, w), m = sizes[j], self.mults[j]
            level = parts[j].reshape(B, h, w, C * m).permute(0, 3, 1, 2)
            # the reference's reshape(B, C, -1).permute: channel groups of the reduced map become tokens
            reduced.append(getattr(self, f"sr{j}")(level).reshape(B, C, -1).permute(0, 2, 1))
        reduced.append(parts[3])
        return self.norm(torch.cat(reduced, dim=-2))


class M_EfficientSelfAtten(nn.Module):  # noqa: N801 (the reference's name)
    def __init__(self, dim: int, head: int, reduction_ratio: Sequence[int], mults: Sequence[int]):
        super().__init__()
        self.head = head
        self.reduction_ratio = reduction_ratio
        self.scale = (dim // head) ** -0.5
        self.q = nn.Linear(dim, dim, bias=True)
        self.kv = nn.Linear(dim, dim * 2, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.scale_reduce = Scale_reduce(dim, reduction_ratio, mults)

    def forward(self, x: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> torch.Tensor:
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.head, C // self.head).permute(0, 2, 1, 3)
        return self.proj(_attend(q, self.kv(self.scale_reduce(x, sizes)), self.head, self.scale, B, N, C))


class BridgeLayer_4(nn.Module):  # noqa: N801 (the reference's name)
    """Joint attention over the four levels' tokens, then one ReMix-FFN per level (residual around each)."""

    def __init__(self, dims: int, head: int, reduction_ratios: Sequence[int], mults: Sequence[int]):
        super().__init__()
        self.mults = list(mults)
        self.norm1 = nn.LayerNorm(dims)
        self.attn = M_EfficientSelfAtten(dims, head, reduction_ratios, mults)
        self.norm2 = nn.LayerNorm(dims)
        for j, m in enumerate(self.mults):
            setattr(self, f"mixffn{j + 1}", MixFFN_skip(dims * m, dims * m * 4))

    def forward(self, x: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> torch.Tensor:
        B, _, C = x.shape
        tx1 = x + self.attn(self.norm1(x), sizes)
        parts = torch.split(self.norm2(tx1), _level_lengths(sizes, self.mults), dim=1)
        mixed = [getattr(self, f"mixffn{j + 1}")(part.reshape(B, -1, C * m), h, w).reshape(B, -1, C)
                 for j, (part, (h, w), m) in enumerate(zip(parts, sizes, self.mults))]
        return tx1 + torch.cat(mixed, dim=-2)


class BridegeBlock_4(nn.Module):  # noqa: N801 (the reference's name and spelling)
    """Four bridge layers over the flattened encoder maps; returns the four maps (B, C_i, H_i, W_i)."""

    def __init__(self, dims: int, head: int, reduction_ratios: Sequence[int], mults: Sequence[int]):
        super().__init__()
        self.mults = list(mults)
        for i in range(1, 5):
            setattr(self, f"bridge_layer{i}", BridgeLayer_4(dims, head, reduction_ratios, mults))

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        B, C = feats[0].shape[:2]
        sizes = [(f.shape[2], f.shape[3]) for f in feats]
        x = torch.cat([f.permute(0, 2, 3, 1).reshape(B, -1, C) for f in feats], dim=-2)
        for i in range(1, 5):
            x = getattr(self, f"bridge_layer{i}")(x, sizes)
        parts = torch.split(x, _level_lengths(sizes, self.mults), dim=1)
        return [p.reshape(B, h, w, C * m).permute(0, 3, 1, 2) for p, (h, w), m in zip(parts, sizes, self.mults)]


# ----------------------------------------------------------------------------------- decoder
def _expand(x: torch.Tensor, H: int, W: int, p: int) -> torch.Tensor:
    """'b h w (p1 p2 c) -> b (h p1) (w p2) c' on a (B, H*W, p*p*c) sequence; returns (B, p*H*p*W, c)."""
    B, _, D = x.shape
    c = D // (p * p)
    return x.reshape(B, H, W, p, p, c).permute(0, 1, 3, 2, 4, 5).reshape(B, H * p * W * p, c)


class PatchExpand(nn.Module):
    """x2 upsampling of tokens: Linear(dim -> 2 dim), pixel shuffle to dim/2 channels, LayerNorm."""

    def __init__(self, dim: int, dim_scale: int = 2, norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.dim = dim
        self.expand = nn.Linear(dim, 2 * dim, bias=False) if dim_scale == 2 else nn.Identity()
        self.norm = norm_layer(dim // dim_scale)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        return self.norm(_expand(self.expand(x), H, W, 2))


class FinalPatchExpand_X4(nn.Module):  # noqa: N801 (the reference's name)
    """x4 upsampling of tokens: Linear(dim -> 16 dim), pixel shuffle to dim channels, LayerNorm."""

    def __init__(self, dim: int, dim_scale: int = 4, norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.dim = dim
        self.dim_scale = dim_scale
        self.expand = nn.Linear(dim, 16 * dim, bias=False)
        self.output_dim = dim
        self.norm = norm_layer(self.output_dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        return self.norm(_expand(self.expand(x), H, W, self.dim_scale))


class MyDecoderLayer(nn.Module):
    """Concatenate with the skip, fuse linearly, two enhanced transformer blocks, expand (and classify last)."""

    def __init__(self, in_dim: int, out_dim: int, heads: int, reduction_ratio: int, token_mlp: str = "mix_skip",
                 n_class: int = 9, is_last: bool = False):
        super().__init__()
        self.concat_linear = nn.Linear(in_dim, out_dim)
        if not is_last:
            self.layer_up: nn.Module = PatchExpand(out_dim, dim_scale=2)
            self.last_layer = None
        else:
            self.layer_up = FinalPatchExpand_X4(out_dim, dim_scale=4)
            self.last_layer = nn.Conv2d(out_dim, n_class, 1)
        self.layer_former_1 = TransformerBlock(out_dim, heads, reduction_ratio, token_mlp)
        self.layer_former_2 = TransformerBlock(out_dim, heads, reduction_ratio, token_mlp)
        for m in self.modules():  # the reference's init_weights
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor | None = None, hw: tuple[int, int] | None = None
                ) -> torch.Tensor:
        if x2 is None:  # the deepest level: only the expansion (as in the reference)
            assert hw is not None
            return self.layer_up(x1, *hw)
        b, h, w, c = x2.shape
        x = self.concat_linear(torch.cat([x1, x2.reshape(b, -1, c)], dim=-1))
        x = self.layer_former_2(self.layer_former_1(x, h, w), h, w)
        if self.last_layer is not None:
            up = self.layer_up(x, h, w)
            return self.last_layer(up.reshape(b, 4 * h, 4 * w, -1).permute(0, 3, 1, 2))
        return self.layer_up(x, h, w)


class MISSFormer(nn.Module):
    """MISSFormer; logits at the input size (inputs not a multiple of 32 are resized internally)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 9, dims: Sequence[int] = (64, 128, 320, 512),
                 layers: Sequence[int] = (2, 2, 2, 2), heads: Sequence[int] = (1, 2, 5, 8),
                 token_mlp_mode: str = "mix_skip"):
        super().__init__()
        dims = [int(d) for d in dims]
        reduction_ratios = [8, 4, 2, 1]
        mults = [d // dims[0] for d in dims]
        self.backbone = MiT(in_channels, dims, layers, heads, reduction_ratios, token_mlp_mode)
        self.reduction_ratios = [1, 2, 4, 8]
        self.bridge = BridegeBlock_4(dims[0], 1, self.reduction_ratios, mults)
        # concat_linear widths: upsampled deeper level (half its channels) + skip; decoder_3 as the
        # reference (2 x 512, unused: called without a skip); decoder_0 as the reference (4 x 32 = 64 + 64)
        in_dims = [dims[1] // 2 + dims[0], dims[2] // 2 + dims[1], dims[3] // 2 + dims[2], 2 * dims[3]]
        for i in (3, 2, 1, 0):
            setattr(self, f"decoder_{i}", MyDecoderLayer(in_dims[i], dims[i], heads[i], reduction_ratios[i],
                                                         token_mlp_mode, n_class=num_classes, is_last=i == 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple(x.shape[-2:])
        run = tuple(max(STRIDE, math.ceil(s / STRIDE) * STRIDE) for s in size)
        if run != size:
            x = F.interpolate(x, size=run, mode="bilinear", align_corners=False)
        bridge = self.bridge(self.backbone(x))
        b, c, h4, w4 = bridge[3].shape
        tmp = self.decoder_3(bridge[3].permute(0, 2, 3, 1).reshape(b, -1, c), hw=(h4, w4))
        tmp = self.decoder_2(tmp, bridge[2].permute(0, 2, 3, 1))
        tmp = self.decoder_1(tmp, bridge[1].permute(0, 2, 3, 1))
        out = self.decoder_0(tmp, bridge[0].permute(0, 2, 3, 1))
        if run != size:
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
        return out


def _ints(value: Sequence[int], what: str) -> list[int]:
    try:
        out = [int(v) for v in value]
    except (TypeError, ValueError):
        raise MedplanError(f"missformer: {what} must be 4 positive integers, got {value!r}") from None
    if len(out) != 4 or any(v < 1 for v in out):
        raise MedplanError(f"missformer: {what} must be 4 positive integers, got {value!r}")
    return out


MISSFORMER = ModelCard(
    paper_params_m=42.0,
    input=InputContract(internal_size=lambda options: options.get("img_size", INTERNAL_SIZE), label="MISSFormer"),
    deviations=("no ImageNet weights: MISSFormer's reference implementation trains from scratch "
                "(no pretrained checkpoint is published)",),
    find_unused_parameters=True,  # decoder_3 fusion blocks and spare FFN norms: built, never used
    test_options={"dims": (8, 16, 40, 64), "layers": (1, 1, 1, 1), "img_size": 64},
)


@register_model("missformer", card=MISSFORMER, family="transformer",
                description="MISSFormer (IEEE TMI'23): enhanced transformer blocks with ReMix-FFN and enhanced "
                "transformer context bridge; from scratch, runs at 224x224")
def missformer(in_channels: int, num_classes: int, *, dims: Sequence[int] = (64, 128, 320, 512),
               layers: Sequence[int] = (2, 2, 2, 2), heads: Sequence[int] = (1, 2, 5, 8),
               img_size: int = INTERNAL_SIZE) -> MISSFormer:
    """MISSFormer as in the reference; ``dims``/``layers``/``heads`` exist for tiny test models (every width
    a multiple of the first, every head count dividing its width). ``img_size`` is the resolution the
    network runs at (the card's input contract resizes there and back; the reference's and the
    benchmark's 224, a multiple of 32 to run natively)."""
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < STRIDE or img_size % STRIDE:
        raise MedplanError(f"missformer: img_size must be a positive multiple of {STRIDE}, got {img_size!r}")
    dims, layers, heads = _ints(dims, "dims"), _ints(layers, "layers"), _ints(heads, "heads")
    if any(d % dims[0] for d in dims) or any(d % h for d, h in zip(dims, heads)) or any(d % 2 for d in dims):
        raise MedplanError(f"missformer: dims {dims} must be even multiples of dims[0] and divisible by heads {heads}")
    return MISSFormer(in_channels, num_classes, dims, layers, heads)


__all__ = ["MISSFormer", "missformer", "INTERNAL_SIZE"]
