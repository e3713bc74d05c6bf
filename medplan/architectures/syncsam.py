"""SyncSAM (Improved Baselines with Synchronized Encoding for Universal Medical Image Segmentation).

Structure (paper Sec. 2, Fig. 1):

- ``image_encoder``: SAM's ViT-B (timm's ``VisionTransformerSAM``, same parameter names as SAM's
  ``ImageEncoderViT`` except ``mlp.lin1/2`` -> ``mlp.fc1/2``), FROZEN. Its 12 blocks form four
  stages of (two windowed blocks, one global block), global blocks 2, 5, 8, 11.
- ``cnn``: a timm ResNet (``resnet50`` = SyncSAM-50, ``resnet34`` = SyncSAM-34), trainable.
  Stage 0 (stem) runs beside the patch embedding, then ResNet ``layer{i}`` beside ViT stage i.
- synchronized fusion: at stage i the CNN feature is resized to the ViT grid (H/16), a 3x3
  convolution (``fusion_convs[i]``) maps it to the ViT width and it is added to the windowed
  blocks' output before the stage's global-attention block; the neck then gives F (256, H/16).
- ``prompt_encoder``: SAM's PromptEncoder for boxes (``pe_layer.positional_encoding_gaussian_matrix``,
  ``point_embeddings``, ``no_mask_embed``); no mask prompts (``mask_downscaling`` not built).
- ``mask_decoder``: SAM's MaskDecoder (``transformer`` = TwoWayTransformer, ``output_upscaling``)
  with the IoU head and the four mask tokens replaced by Med-Output Token(s) (``med_token``) and a
  multi-scale fusion branch (``ms_*``): the outputs of the first three ViT stages and F are
  summed, upsampled to 32 x H/4 x W/4 together with F and added to the upscaled mask feature.

Choices of ours (the paper and its code give no more detail):

- One Med-Output Token per output channel (``num_classes``; 1 = the paper's binary mask), each with
  its own hypernetwork MLP, so the model fits the benchmark's ``(B, K, H, W)`` contract.
- Input size: the plan's patch size (the paper uses 256x256; SAM natively 1024). Parameters keep
  SAM's 1024 shapes (absolute position embedding 64x64, global relative positions 127) so the
  official checkpoint loads unchanged; at run time the position embedding is resampled to the
  input grid and relative positions interpolated (timm does both). Inputs whose sides are not a
  multiple of 32 are zero-padded right/bottom and the logits cropped back.
- No SAM pixel normalisation: the plan's normalisation is applied upstream, as for every model.
- Parameter count at ResNet-50 (meta device): about 144.1M total, 54.5M trainable (89.7M frozen), vs the paper's
  ~138M / ~48M; the 3x3 fusion convolutions (26.5M) are what makes the SyncSAM-50 vs -34
  difference in the paper's trainable counts (22M) come out, but the exact layer is not published.

Weights (offline, ``$MEDPLAN_WEIGHTS``): ``sam_vit_b_01ec64.pth``
(https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth) for the image encoder,
prompt encoder and the mask decoder's transformer/upscaling, and torchvision's ResNet file
(``resnet50-0676ba61.pth``, https://download.pytorch.org/models/resnet50-0676ba61.pth) for the CNN.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import timm
import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from timm.models.vision_transformer_sam import VisionTransformerSAM
from torch import nn

from medplan.architectures.card import ModelCard, Weights, WeightsFile
from medplan.architectures.registry import register_model
from medplan.errors import MedplanError

SAM_FILENAME = "sam_vit_b_01ec64.pth"
SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"
RESNET_FILES = {  # torchvision IMAGENET1K_V1 files; timm's ResNets use the same parameter names
    "resnet50": ("resnet50-0676ba61.pth", "https://download.pytorch.org/models/resnet50-0676ba61.pth"),
    "resnet34": ("resnet34-b627a593.pth", "https://download.pytorch.org/models/resnet34-b627a593.pth"),
    "resnet18": ("resnet18-f37072fd.pth", "https://download.pytorch.org/models/resnet18-f37072fd.pth"),
}


@dataclass
class SamConfig:
    """SAM sizes; the defaults are ViT-B (``sam_vit_b``)."""

    img_size: int = 1024  # sets parameter shapes only (position tables); any input size runs
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    prompt_embed_dim: int = 256  # neck / prompt / decoder width
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8

    def __post_init__(self) -> None:
        idx = tuple(self.global_attn_indexes)
        if len(idx) != 4 or idx[-1] != self.depth - 1 or list(idx) != sorted(idx):
            raise MedplanError(f"syncsam needs four stages ending in a global block, got global_attn_indexes {idx} "
                               f"for depth {self.depth}")
        self.global_attn_indexes = idx


# ----------------------------------------------------------------------------- prompt encoder
class PositionEmbeddingRandom(nn.Module):
    """SAM's random-Fourier positional encoding (name kept for checkpoint loading)."""

    def __init__(self, num_pos_feats: int):
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, num_pos_feats))

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        coords = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix.to(coords.dtype)
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        h, w = size
        dev = self.positional_encoding_gaussian_matrix.device
        y = (torch.arange(h, device=dev, dtype=torch.float32) + 0.5) / h
        x = (torch.arange(w, device=dev, dtype=torch.float32) + 0.5) / w
        grid = torch.stack(torch.meshgrid(x, y, indexing="xy"), dim=-1)  # (h, w, 2) as (x, y)
        return self._pe_encoding(grid).permute(2, 0, 1)  # C x h x w

    def forward_with_coords(self, coords: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        coords = coords.clone()
        coords[..., 0] = coords[..., 0] / image_size[1]
        coords[..., 1] = coords[..., 1] / image_size[0]
        return self._pe_encoding(coords.float())


class PromptEncoder(nn.Module):
    """SAM's prompt encoder, box prompts only (a box is two corner points)."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.embed_dim = embed_dim
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.point_embeddings = nn.ModuleList([nn.Embedding(1, embed_dim) for _ in range(4)])
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def forward(self, boxes: torch.Tensor, image_size: tuple[int, int], grid: tuple[int, int]):
        """Sparse (B, 2, D) corner embeddings and dense (B, D, h, w) no-mask embeddings."""
        corners = (boxes.float() + 0.5).reshape(-1, 2, 2)
        sparse = self.pe_layer.forward_with_coords(corners, image_size)
        sparse = torch.stack([sparse[:, 0] + self.point_embeddings[2].weight[0],
                              sparse[:, 1] + self.point_embeddings[3].weight[0]], dim=1)
        dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(boxes.shape[0], -1, *grid)
        return sparse, dense


# ----------------------------------------------------------------------------- mask decoder
class MLPBlock(nn.Module):
    def __init__(self, dim: int, mlp_dim: int):
        super().__init__()
        self.lin1 = nn.Linear(dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, dim)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class Attention(nn.Module):
    """SAM's token attention with an optional channel downsampling."""

    def __init__(self, dim: int, num_heads: int, downsample_rate: int = 1):
        super().__init__()
        inner = dim // downsample_rate
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(dim, inner)
        self.v_proj = nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.q_proj(q)), self._split(self.k_proj(k)), self._split(self.v_proj(v))
        out = F.scaled_dot_product_attention(q, k, v)
        b, h, n, c = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * c))


class TwoWayAttentionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_dim: int, skip_first_layer_pe: bool = False):
        super().__init__()
        self.self_attn = Attention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = Attention(dim, num_heads, downsample_rate=2)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(dim, num_heads, downsample_rate=2)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries, keys, query_pe, key_pe):
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(self, depth: int, dim: int, num_heads: int, mlp_dim: int):
        super().__init__()
        self.layers = nn.ModuleList([TwoWayAttentionBlock(dim, num_heads, mlp_dim, skip_first_layer_pe=i == 0)
                                     for i in range(depth)])
        self.final_attn_token_to_image = Attention(dim, num_heads, downsample_rate=2)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor):
        keys = image.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        q, k = queries + tokens, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys


class MLP(nn.Module):
    def __init__(self, dims: list[int]):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


def _up4(cin: int, mid: int, cout: int) -> nn.Sequential:
    """x4 transposed-convolution upsampling (SAM's output_upscaling pattern)."""
    return nn.Sequential(nn.ConvTranspose2d(cin, mid, 2, 2), LayerNorm2d(mid), nn.GELU(),
                         nn.ConvTranspose2d(mid, cout, 2, 2))


class MaskDecoder(nn.Module):
    """SAM's mask decoder with Med-Output Token(s) and the multi-scale fusion branch."""

    def __init__(self, dim: int, vit_dim: int, num_outputs: int, depth: int, mlp_dim: int, num_heads: int):
        super().__init__()
        self.transformer = TwoWayTransformer(depth, dim, num_heads, mlp_dim)
        self.num_outputs = num_outputs
        self.med_token = nn.Embedding(num_outputs, dim)
        self.output_upscaling = nn.Sequential(nn.ConvTranspose2d(dim, dim // 4, 2, 2), LayerNorm2d(dim // 4), nn.GELU(),
                                              nn.ConvTranspose2d(dim // 4, dim // 8, 2, 2), nn.GELU())
        self.output_hypernetworks_mlps = nn.ModuleList(MLP([dim, dim, dim, dim // 8]) for _ in range(num_outputs))
        # multi-scale fusion branch: early ViT stages + F -> (dim/8, H/4, W/4)
        self.ms_vit_feat = _up4(vit_dim, dim, dim // 8)  # HQ-SAM's compress_vit_feat pattern
        self.ms_embedding = _up4(dim, dim // 4, dim // 8)
        self.ms_fuse = nn.Sequential(nn.Conv2d(dim // 8, dim // 8, 3, padding=1), LayerNorm2d(dim // 8), nn.GELU(),
                                     nn.Conv2d(dim // 8, dim // 8, 3, padding=1))

    def forward(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor,
                dense: torch.Tensor, early: list[torch.Tensor]) -> torch.Tensor:
        b = image_embeddings.shape[0]
        tokens = torch.cat([self.med_token.weight.unsqueeze(0).expand(b, -1, -1), sparse.to(image_embeddings.dtype)], 1)
        src = image_embeddings + dense.to(image_embeddings.dtype)
        pos = image_pe.to(src.dtype).unsqueeze(0).expand(b, -1, -1, -1)
        hs, keys = self.transformer(src, pos, tokens)
        h, w = src.shape[-2:]
        upscaled = self.output_upscaling(keys.transpose(1, 2).reshape(b, -1, h, w))
        multi = self.ms_fuse(self.ms_vit_feat(sum(early)) + self.ms_embedding(image_embeddings))
        upscaled = upscaled + multi
        hyper = torch.stack([mlp(hs[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        return (hyper @ upscaled.flatten(2)).reshape(b, self.num_outputs, *upscaled.shape[-2:])


# ----------------------------------------------------------------------------- the model
class SyncSAM(nn.Module):
    """Frozen SAM ViT + trainable ResNet fused stage by stage; box-prompted mask decoder."""

    def __init__(self, in_channels: int, num_classes: int, cfg: SamConfig | None = None, resnet: str = "resnet50",
                 default_box: tuple[float, float, float, float] | None = None):
        super().__init__()
        cfg = cfg or SamConfig()
        self.cfg = cfg
        self.default_box = None if default_box is None else tuple(float(v) for v in default_box)
        self.image_encoder = VisionTransformerSAM(
            img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=in_channels, num_classes=0, global_pool="",
            embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, window_size=cfg.window_size,
            global_attn_indexes=cfg.global_attn_indexes, use_rel_pos=True, neck_chans=cfg.prompt_embed_dim)
        try:
            self.cnn = timm.create_model(resnet, pretrained=False, num_classes=0, global_pool="", in_chans=in_channels,
                                         zero_init_last=False)  # torchvision init, as the reference ResNets
        except RuntimeError as exc:
            raise MedplanError(f"syncsam: unknown timm ResNet {resnet!r} ({exc})") from None
        self.resnet_name = resnet
        cnn_chs = [int(info["num_chs"]) for info in self.cnn.feature_info[1:5]]
        self.fusion_convs = nn.ModuleList(nn.Conv2d(c, cfg.embed_dim, 3, padding=1) for c in cnn_chs)
        self.prompt_encoder = PromptEncoder(cfg.prompt_embed_dim)
        self.mask_decoder = MaskDecoder(cfg.prompt_embed_dim, cfg.embed_dim, num_classes, cfg.decoder_depth,
                                        cfg.decoder_mlp_dim, cfg.decoder_heads)
        self.stage_ends = [i + 1 for i in cfg.global_attn_indexes]
        self.freeze_image_encoder()

    def freeze_image_encoder(self) -> None:
        """SAM's ViT stays frozen (paper Sec. 2.2)."""
        for p in self.image_encoder.parameters():
            p.requires_grad_(False)

    def _cnn_stem(self, x: torch.Tensor) -> torch.Tensor:
        c = self.cnn
        return c.maxpool(c.act1(c.bn1(c.conv1(x))))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """F (B, D, H/16, W/16) and the outputs of the first three stages (B, C_vit, H/16, W/16)."""
        vit = self.image_encoder
        t = vit.patch_embed(x)  # B, h, w, C
        t = t + timm.layers.resample_abs_pos_embed_nhwc(vit.pos_embed, t.shape[1:3])
        grid = t.shape[1:3]
        f_cnn = self._cnn_stem(x)
        layers = [self.cnn.layer1, self.cnn.layer2, self.cnn.layer3, self.cnn.layer4]
        stage_outputs = []
        start = 0
        for i, end in enumerate(self.stage_ends):
            for blk in vit.blocks[start:end - 1]:  # windowed-attention blocks
                t = blk(t)
            f_cnn = layers[i](f_cnn)
            fused = F.interpolate(f_cnn, size=grid, mode="bilinear", align_corners=False) \
                if tuple(f_cnn.shape[-2:]) != tuple(grid) else f_cnn
            t = t + self.fusion_convs[i](fused).permute(0, 2, 3, 1)
            t = vit.blocks[end - 1](t)  # global-attention block
            stage_outputs.append(t)
            start = end
        feat = vit.neck(t.permute(0, 3, 1, 2))
        return feat, [s.permute(0, 3, 1, 2) for s in stage_outputs[:3]]

    def forward(self, images: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, K, H, W); ``boxes`` (B, 4) as x0, y0, x1, y1 input pixels, default the whole image."""
        b, _, h, w = images.shape
        if boxes is None:
            box = self.default_box or (0.0, 0.0, w - 1.0, h - 1.0)
            boxes = images.new_tensor(box).expand(b, 4)
        if boxes.shape != (b, 4):
            raise MedplanError(f"syncsam: boxes must have shape ({b}, 4), got {tuple(boxes.shape)}")
        ph, pw = (-h) % 32, (-w) % 32
        x = F.pad(images, (0, pw, 0, ph)) if ph or pw else images
        feat, early = self.encode(x)
        grid = tuple(feat.shape[-2:])
        sparse, dense = self.prompt_encoder(boxes.to(feat.device), (x.shape[-2], x.shape[-1]), grid)
        image_pe = self.prompt_encoder.pe_layer(grid)
        masks = self.mask_decoder(feat, image_pe, sparse, dense, early)
        logits = F.interpolate(masks, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits[..., :h, :w]


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable and frozen parameter counts (the issue asks for both)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"total": total, "trainable": trainable, "frozen": total - trainable}


# ----------------------------------------------------------------------------- weights
def sam_key_map(key: str) -> str | None:
    """Official SAM checkpoint names -> this module's (None: not used by SyncSAM)."""
    if key.startswith("image_encoder."):
        return key.replace(".mlp.lin1.", ".mlp.fc1.").replace(".mlp.lin2.", ".mlp.fc2.")
    if key.startswith("prompt_encoder."):
        return None if key.startswith("prompt_encoder.mask_downscaling.") else key
    if key.startswith("mask_decoder."):
        rest = key[len("mask_decoder."):]
        if rest.startswith(("transformer.", "output_upscaling.")):
            return key
        return None  # iou_token, mask_tokens, iou_prediction_head, SAM's hypernetwork MLPs: replaced
    return None


NEW_PARTS = (r"^cnn\.", r"^fusion_convs\.", r"^mask_decoder\.(med_token|output_hypernetworks_mlps|ms_)")


def syncsam_files(options) -> tuple[WeightsFile, ...]:
    """SAM checkpoint into encoder/prompt/decoder; torchvision ResNet file into the CNN branch."""
    resnet = options.get("resnet", "resnet50")
    name, url = RESNET_FILES.get(resnet, (None, None))
    if name is None:
        raise MedplanError(f"syncsam: no documented weights file for {resnet!r} (known: {', '.join(RESNET_FILES)})")
    return (WeightsFile(SAM_FILENAME, SAM_URL, part="sam", key_map=sam_key_map, strip_prefixes=(),
                        ignore_missing=NEW_PARTS),
            WeightsFile(name, url, target="cnn", part="resnet", ignore_missing=(r"^fc\.",)))


SYNCSAM = ModelCard(
    paper_params_m=138.0,
    # pretrained=True / a folder: SAM + ResNet files; pretrained=FILE: the SAM checkpoint only
    weights=Weights(syncsam_files,
                    unloaded_note="random init (pretrained= a SAM checkpoint file; give a folder for both files)"),
    test_options={"sam_config": {"embed_dim": 32, "depth": 4, "num_heads": 2, "window_size": 4,
                                 "global_attn_indexes": [0, 1, 2, 3], "prompt_embed_dim": 32, "decoder_mlp_dim": 32,
                                 "decoder_heads": 2, "img_size": 64}, "resnet": "resnet18"},
    test_sizes=((64, 64), (41, 53)),
)


@register_model("syncsam", card=SYNCSAM,
                description="SyncSAM: frozen SAM ViT-B + ResNet-50 fused stage by stage, box prompt")
def syncsam(in_channels: int, num_classes: int, *, sam_config: SamConfig | dict | None = None, resnet: str = "resnet50",
            box: tuple[float, float, float, float] | None = None) -> SyncSAM:
    """SyncSAM-50 by default (``resnet="resnet34"``: SyncSAM-34). ``box`` is a fixed default prompt
    (x0, y0, x1, y1 in input pixels) used when forward gets none; else the whole image."""
    if isinstance(sam_config, dict):
        cfg = SamConfig(**sam_config)
    else:
        cfg = sam_config or SamConfig()
    if box is not None and len(box) != 4:
        raise MedplanError(f"syncsam: box must be x0, y0, x1, y1, got {box!r}")
    return SyncSAM(in_channels, num_classes, replace(cfg), resnet=resnet, default_box=box)
