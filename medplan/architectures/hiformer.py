"""HiFormer-B (Heidari et al., WACV 2023): Swin Transformer and ResNet pyramids fused by the DLF module.

Written after the official implementation (amirhossein-kz/HiFormer: ``models/HiFormer.py``,
``models/Encoder.py``, ``models/Decoder.py``, ``utils.py``, ``configs/HiFormer_configs.py``
``get_hiformer_b_configs``). Module structure and parameter names follow it, so the official
state-dict keys hold (``All2Cross.pyramid.swin_transformer.layers.0.blocks.0.attn.qkv.weight``,
``All2Cross.pyramid.resnet_layers.4.0.conv1.weight``, ``All2Cross.pyramid.p1_pm.reduction.weight``,
``All2Cross.pos_embed.0``, ``All2Cross.blocks.0.fusion.0.attn.wq.weight``, ``ConvUp_s.convs_level.0.weight``,
``conv_pred.0.weight``, ``segmentation_head.0.weight``, ...). Libraries do the standard parts: timm's
``SwinTransformerStage`` (same block parameter names as the Swin reference), timm's ResNet-50 (the
torchvision parameter names) and timm's ViT ``Block``.

HiFormer-B: ResNet-50 stem + layer1..layer3 (256/512/1024 channels at strides 4/8/16) beside the first
three Swin-T stages (96/192/384 channels, depths 2/2/6, heads 3/6/12, window 7, drop path 0.1); 1x1
convolutions ``p*_ch`` bring the CNN maps to the Swin widths and the sums pass through Swin's patch
merging (``p1_pm``, ``p2_pm``). The Double-Level Fusion (DLF) module takes the stride-4 and the
stride-16 token sets, each with a CLS token (mean of the normalised tokens), adds learned position
embeddings and exchanges information between the two levels by cross-attention of each CLS token
(projected to the other level's width) over the other level's tokens (depth ``[1, 2, 0]``, heads
``(6, 12)``, MLP ratios ``(2, 2, 1)``). The decoder upsamples the stride-16 tokens twice (conv + GN +
ReLU), adds the convolved stride-4 tokens, reduces to 16 channels, upsamples x4 and predicts with a 3x3
convolution.

Choices, all documented against the reference:

- **Fixed 224x224 resolution.** The position embeddings have one entry per token of a 224x224 input
  (``img_size``), as in the reference; the benchmark paper ran HiFormer at 224 internally. The
  model card's input contract (``internal_size = img_size``, applied by ``build_model``) resizes
  any input bilinearly to ``img_size`` and the logits back, so training and prediction work on any
  image size; ``config.json`` records the deviation and ``internal_size``.
- **What reaches the output.** As in the reference (checked numerically against it): the decoder drops
  the CLS tokens (``x[:, 1:]``) and the DLF stage changes only the CLS tokens, so with HiFormer-B's
  single DLF stage the cross-attention path (``projs``, ``fusion``, ``revert_projs``, and the CLS
  LayerNorms ``norm_1``/``norm_2``) gets zero gradients; the DLF contributes its position embeddings and
  final LayerNorms. The reference's ``MultiScaleBlock`` also builds one transformer ``Block`` per level
  (``blocks``) whose output its ``forward`` discards (``outs_b``); their parameters are kept (official
  keys; Table 1's 26M counts them) and the discarded computation is skipped (same outputs, less time).
  They get no gradient at all, so the card asks the trainer to run DDP with ``find_unused_parameters``.
- **ImageNet weights really used.** The reference loads ``swin_tiny_patch4_window7_224.pth`` in
  ``PyramidFeatures.__init__`` and then ``All2Cross.__init__`` calls ``self.apply(_init_weights)`` over
  the whole subtree, which re-initialises every Swin ``Linear`` and ``LayerNorm`` (only the relative
  position bias tables survive). medplan loads the weights after initialisation, as the paper intends;
  ``reference_reinit=True`` reproduces the reference's behaviour.
- Gray input: the ResNet stem takes ``in_channels`` directly (RGB weights summed over channels).

Weights (``pretrained=True``: both files in ``$MEDPLAN_WEIGHTS``; ``pretrained=DIR``: both files in
that folder; ``pretrained=FILE``: a whole HiFormer checkpoint with the official key names):

- ``swin_tiny_patch4_window7_224.pth`` — Swin-T ImageNet-1k, as the reference's config downloads it;
  the timm layout (``timm/swin_tiny_patch4_window7_224.ms_in1k``, where ``layers.1.downsample`` is the
  first patch merging) is recognised too. Stages 0-2 go to ``swin_transformer``, the first two patch
  mergings to ``p1_pm``/``p2_pm``; ``patch_embed``, stage 3, ``norm`` and ``head`` are unused.
- ``resnet50-0676ba61.pth`` — torchvision's ResNet-50 ``IMAGENET1K_V1`` (what the reference's
  ``torchvision.models.resnet50(pretrained=True)`` loads); timm's ResNet-50 files have the same names.
  ``conv1``, ``bn1``, ``layer1``-``layer3`` load; ``layer4`` and ``fc`` are unused.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import timm
import torch
from timm.layers import trunc_normal_
from timm.models.swin_transformer import PatchMerging, SwinTransformerStage
from torch import nn

from medplan.architectures.card import InputContract, ModelCard, Weights, WeightsFile
# the DLF blocks, imported from here too
from medplan.architectures.hiformer_dlf import CrossAttention, CrossAttentionBlock, MultiScaleBlock  # noqa: F401
from medplan.architectures.registry import register_model
from medplan.errors import MedplanError

SWIN_T_FILENAME = "swin_tiny_patch4_window7_224.pth"
SWIN_T_URL = "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_tiny_patch4_window7_224.pth"
RESNET_FILES = {  # torchvision IMAGENET1K_V1, what ``torchvision.models.resnetXX(pretrained=True)`` loads
    "resnet50": ("resnet50-0676ba61.pth", "https://download.pytorch.org/models/resnet50-0676ba61.pth"),
    "resnet34": ("resnet34-b627a593.pth", "https://download.pytorch.org/models/resnet34-b627a593.pth"),
    "resnet18": ("resnet18-f37072fd.pth", "https://download.pytorch.org/models/resnet18-f37072fd.pth"),
}
INTERNAL_SIZE = 224


@dataclass
class HiFormerConfig:
    """The reference's ``get_hiformer_b_configs`` (names kept), plus the Swin stage settings it hard-codes."""

    swin_pyramid_fm: list[int] = field(default_factory=lambda: [96, 192, 384])
    image_size: int = 224
    patch_size: int = 4
    cnn_backbone: str = "resnet50"
    depth: list[list[int]] = field(default_factory=lambda: [[1, 2, 0]])
    num_heads: tuple[int, int] = (6, 12)
    mlp_ratio: tuple[float, float, float] = (2.0, 2.0, 1.0)
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    qkv_bias: bool = True
    qk_scale: float | None = None
    cross_pos_embed: bool = True
    # the reference's SwinTransformer(img_size, in_chans=3) defaults
    swin_depths: tuple[int, ...] = (2, 2, 6)
    swin_heads: tuple[int, ...] = (3, 6, 12)
    window_size: int = 7
    swin_mlp_ratio: float = 4.0
    swin_drop_path_rate: float = 0.1


def _init_weights(m: nn.Module) -> None:
    """The reference's ``_init_weights``: truncated normal (0.02) linears, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.LayerNorm):
        nn.init.constant_(m.bias, 0)
        nn.init.constant_(m.weight, 1.0)


# ------------------------------------------------------------------------------------- encoder
class SwinLayers(nn.Module):
    """The reference's ``SwinTransformer`` as HiFormer uses it: only ``layers`` (no patch embedding,
    no patch merging inside the stages, no final norm); timm stages on NHWC maps."""

    def __init__(self, cfg: HiFormerConfig):
        super().__init__()
        depths = list(cfg.swin_depths)
        dpr = [x.item() for x in torch.linspace(0, cfg.swin_drop_path_rate, sum(depths), device="cpu")]
        res = cfg.image_size // cfg.patch_size
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            dim = cfg.swin_pyramid_fm[i]
            size = res // 2**i
            self.layers.append(SwinTransformerStage(
                dim, dim, (size, size), depth, downsample=False, num_heads=cfg.swin_heads[i],
                window_size=cfg.window_size, mlp_ratio=cfg.swin_mlp_ratio, qkv_bias=True,
                proj_drop=cfg.drop_rate, attn_drop=cfg.attn_drop_rate,
                drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])], norm_layer=nn.LayerNorm))


class PyramidFeatures(nn.Module):
    """ResNet and Swin pyramids, summed level by level (the reference's ``PyramidFeatures``)."""

    def __init__(self, cfg: HiFormerConfig, in_channels: int = 3):
        super().__init__()
        self.swin_transformer = SwinLayers(cfg)
        # torchvision's initialisation (timm would zero the last BatchNorm of each block)
        resnet = timm.create_model(cfg.cnn_backbone, pretrained=False, in_chans=in_channels, zero_init_last=False)
        cnn_fm = [int(info["num_chs"]) for info in resnet.feature_info[1:4]]
        # conv1, bn1, act1, maxpool, layer1, layer2, layer3: torchvision's children()[:7]
        self.resnet_layers = nn.ModuleList(list(resnet.children())[:7])
        fm = cfg.swin_pyramid_fm
        res = cfg.image_size // cfg.patch_size
        self.p1_ch = nn.Conv2d(cnn_fm[0], fm[0], kernel_size=1)
        self.p1_pm = PatchMerging(fm[0], norm_layer=nn.LayerNorm)
        self.norm_1 = nn.LayerNorm(fm[0])
        self.p2_ch = nn.Conv2d(cnn_fm[1], fm[1], kernel_size=1)
        self.p2_pm = PatchMerging(fm[1], norm_layer=nn.LayerNorm)
        self.p3_ch = nn.Conv2d(cnn_fm[2], fm[2], kernel_size=1)
        self.norm_2 = nn.LayerNorm(fm[2])
        self.cnn_pyramid_fm = cnn_fm
        self.resolution = res

    # the reference registers layer2/layer3 a second time as p2/p3; properties keep one name each
    @property
    def p2(self) -> nn.Module:
        return self.resnet_layers[5]

    @property
    def p3(self) -> nn.Module:
        return self.resnet_layers[6]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        for i in range(5):
            x = self.resnet_layers[i](x)
        # level 1 (stride 4)
        fm1 = x
        fm1_ch = self.p1_ch(fm1).permute(0, 2, 3, 1)                      # B H W C
        sw1_skipped = fm1_ch + self.swin_transformer.layers[0](fm1_ch)
        cls1 = self.norm_1(sw1_skipped).mean(dim=(1, 2)).unsqueeze(1)      # B 1 C
        fm1_sw1 = self.p1_pm(sw1_skipped)
        # level 2 (stride 8)
        fm1_sw2 = self.swin_transformer.layers[1](fm1_sw1)
        fm2 = self.p2(fm1)
        fm2_sw2 = self.p2_pm(self.p2_ch(fm2).permute(0, 2, 3, 1) + fm1_sw2)
        # level 3 (stride 16)
        fm2_sw3 = self.swin_transformer.layers[2](fm2_sw2)
        fm3 = self.p3(fm2)
        fm3_sw3_skipped = self.p3_ch(fm3).permute(0, 2, 3, 1) + fm2_sw3
        cls3 = self.norm_2(fm3_sw3_skipped).mean(dim=(1, 2)).unsqueeze(1)
        return [torch.cat((cls1, sw1_skipped.flatten(1, 2)), dim=1),
                torch.cat((cls3, fm3_sw3_skipped.flatten(1, 2)), dim=1)]


# ------------------------------------------------------------------------------------- DLF
class All2Cross(nn.Module):
    """Pyramid features + position embeddings + DLF stages + per-level LayerNorm."""

    def __init__(self, cfg: HiFormerConfig, in_channels: int = 3, norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        embed_dim = (cfg.swin_pyramid_fm[0], cfg.swin_pyramid_fm[-1])
        self.cross_pos_embed = cfg.cross_pos_embed
        self.pyramid = PyramidFeatures(cfg, in_channels)
        n_p1 = (cfg.image_size // cfg.patch_size) ** 2
        n_p2 = (cfg.image_size // cfg.patch_size // 4) ** 2
        num_patches = (n_p1, n_p2)
        self.num_branches = 2
        self.pos_embed = nn.ParameterList(
            [nn.Parameter(torch.zeros(1, 1 + num_patches[i], embed_dim[i])) for i in range(self.num_branches)])
        total_depth = sum(sum(x[-2:]) for x in cfg.depth)
        dpr = [x.item() for x in torch.linspace(0, cfg.drop_path_rate, max(total_depth, 1), device="cpu")]
        ptr = 0
        self.blocks = nn.ModuleList()
        for block_cfg in cfg.depth:
            cur = max(block_cfg[:-1]) + block_cfg[-1]
            self.blocks.append(MultiScaleBlock(embed_dim, num_patches, block_cfg, num_heads=cfg.num_heads,
                                               mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, qk_scale=cfg.qk_scale,
                                               drop=cfg.drop_rate, attn_drop=cfg.attn_drop_rate,
                                               drop_path=dpr[ptr:ptr + cur], norm_layer=norm_layer))
            ptr += cur
        self.norm = nn.ModuleList([norm_layer(embed_dim[i]) for i in range(self.num_branches)])
        for p in self.pos_embed:
            trunc_normal_(p, std=0.02)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        xs = self.pyramid(x)
        if self.cross_pos_embed:
            xs = [t + self.pos_embed[i] for i, t in enumerate(xs)]
        for blk in self.blocks:
            xs = blk(xs)
        return [self.norm[i](t) for i, t in enumerate(xs)]


# ------------------------------------------------------------------------------------- decoder
class ConvUpsample(nn.Module):
    """3x3 conv + GroupNorm(32) + ReLU per entry of ``out_chans``, each followed by x2 upsampling if asked."""

    def __init__(self, in_chans: int = 384, out_chans: Sequence[int] = (128,), upsample: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        for i, out_ch in enumerate(out_chans):
            cin = in_chans if i == 0 else out_chans[i - 1]
            layers += [nn.Conv2d(cin, out_ch, kernel_size=3, stride=1, padding=1, bias=False),
                       nn.GroupNorm(32, out_ch), nn.ReLU(inplace=False)]
            if upsample:
                layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
        self.convs_level = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs_level(x)


class SegmentationHead(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__(nn.Conv2d(in_channels, out_channels, kernel_size=kernel_size, padding=kernel_size // 2))


class HiFormer(nn.Module):
    """HiFormer at ``cfg.image_size``; other input sizes are resized to it and the logits back."""

    def __init__(self, cfg: HiFormerConfig, in_channels: int = 3, num_classes: int = 9):
        super().__init__()
        self.cfg = cfg
        self.img_size = cfg.image_size
        self.patch_size = [cfg.patch_size, cfg.patch_size * 4]
        self.n_classes = num_classes
        fm = cfg.swin_pyramid_fm
        self.All2Cross = All2Cross(cfg, in_channels)
        self.ConvUp_s = ConvUpsample(in_chans=fm[-1], out_chans=[128, 128], upsample=True)
        self.ConvUp_l = ConvUpsample(in_chans=fm[0], upsample=False)
        self.segmentation_head = SegmentationHead(in_channels=16, out_channels=num_classes, kernel_size=3)
        self.conv_pred = nn.Sequential(
            nn.Conv2d(128, 16, kernel_size=1, stride=1, padding=0, bias=True),
            nn.ReLU(inplace=True), nn.Upsample(scale_factor=cfg.patch_size, mode="bilinear", align_corners=False),
        )
        self.pretrained_report: dict | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for an ``img_size`` x ``img_size`` input (the input contract resizes any other)."""
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise MedplanError(f"hiformer_b runs at {self.img_size}x{self.img_size}, got {tuple(x.shape[-2:])}; "
                               "build it with build_model, whose input contract resizes")
        xs = self.All2Cross(x)
        maps = []
        for i, tokens in enumerate(xs):
            side = self.img_size // self.patch_size[i]
            embed = tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], -1, side, side)
            maps.append(self.ConvUp_l(embed) if i == 0 else self.ConvUp_s(embed))
        return self.segmentation_head(self.conv_pred(maps[0] + maps[1]))


# ------------------------------------------------------------------------------------- weights
_SWIN_BUFFERS = re.compile(r"(relative_position_index|attn_mask)$")
_RESNET_NAMES = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6}


def swin_key_map(keys: Sequence[str], n_stages: int = 3):
    """Rename Swin ImageNet keys to ``PyramidFeatures`` names; the official and the timm layout differ in
    where the patch merging lives (end of stage i vs start of stage i+1), told apart by the keys present."""
    official = any(k.startswith("layers.0.downsample.") for k in keys)
    merge_stage = {0: "p1_pm", 1: "p2_pm"} if official else {1: "p1_pm", 2: "p2_pm"}

    def key_map(key: str) -> str | None:
        if _SWIN_BUFFERS.search(key):
            return None  # buffers computed by the model
        m = re.match(r"layers\.(\d+)\.(blocks|downsample)\.(.*)$", key)
        if m is None:
            return key  # patch_embed, norm, head: reported as unused
        stage, part, rest = int(m.group(1)), m.group(2), m.group(3)
        if part == "blocks" and stage < n_stages:
            return f"swin_transformer.layers.{stage}.blocks.{rest}"
        if part == "downsample" and stage in merge_stage:
            return f"{merge_stage[stage]}.{rest}"
        return key

    return key_map


def resnet_key_map(key: str) -> str | None:
    """torchvision/timm ResNet names -> ``resnet_layers.N`` (the reference's ``children()[:7]``)."""
    head, _, rest = key.partition(".")
    if head in _RESNET_NAMES:
        return f"resnet_layers.{_RESNET_NAMES[head]}.{rest}"
    return key  # layer4, fc: reported as unused


def reinit_swin_like_reference(model: HiFormer) -> None:
    """What the reference's ``All2Cross.apply(_init_weights)`` does to the loaded Swin weights."""
    pyr = model.All2Cross.pyramid
    for module in (pyr.swin_transformer, pyr.p1_pm, pyr.p2_pm):
        module.apply(_init_weights)


#: HiFormer's own layers: no ImageNet counterpart
NEW_LAYERS = (r"^p\d_ch\.", r"^norm_\d\.")
HIFORMER_URL = "https://github.com/amirhossein-kz/HiFormer (a trained HiFormer-B checkpoint, official keys)"


def hiformer_files(options) -> tuple[WeightsFile, ...]:
    """ImageNet Swin-T and the chosen torchvision ResNet, both into the CNN/Swin pyramid."""
    backbone = options.get("cnn_backbone", "resnet50")
    if backbone not in RESNET_FILES:
        raise MedplanError(f"hiformer_b: no documented ImageNet weights for cnn_backbone {backbone!r} "
                           f"(known: {', '.join(RESNET_FILES)})")
    resnet_file, resnet_url = RESNET_FILES[backbone]
    return (WeightsFile(SWIN_T_FILENAME, SWIN_T_URL, target="All2Cross.pyramid", part="swin", key_map_for=swin_key_map,
                        ignore_missing=(r"^resnet_layers\.", *NEW_LAYERS)),
            WeightsFile(resnet_file, resnet_url, target="All2Cross.pyramid", part="resnet", key_map=resnet_key_map,
                        ignore_missing=(r"^swin_transformer\.", r"^p\d_pm\.", *NEW_LAYERS)))


def after_weights(model: HiFormer) -> None:
    """``reference_reinit=True``: re-initialise the loaded Swin weights as the reference does."""
    if model.reference_reinit:
        reinit_swin_like_reference(model)


HIFORMER_B = ModelCard(
    paper_params_m=26.0,
    # pretrained=True / a folder: Swin-T + ResNet files; pretrained=FILE: a whole HiFormer checkpoint
    weights=Weights(hiformer_files, single_file=WeightsFile("", HIFORMER_URL, part="hiformer")),
    input=InputContract(internal_size=lambda options: options.get("img_size", INTERNAL_SIZE), label="HiFormer"),
    find_unused_parameters=True,  # DLF blocks built (official keys) but unused in forward
    after_weights=after_weights,
    test_options={"img_size": 64, "embed_dim": 16, "swin_heads": (1, 2, 4), "dlf_heads": (2, 4), "window_size": 4,
                  "cnn_backbone": "resnet18"},
)


# ------------------------------------------------------------------------------------- builder
def _positive(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MedplanError(f"hiformer_b: {what} must be a positive integer, got {value!r}")
    return value


@register_model("hiformer_b", card=HIFORMER_B, family="hybrid",
                description="HiFormer-B (WACV'23): Swin-T + ResNet-50 pyramids fused by DLF cross-attention; runs at "
                "224x224")
def hiformer_b(in_channels: int, num_classes: int, *, img_size: int = INTERNAL_SIZE, cnn_backbone: str = "resnet50",
               embed_dim: int = 96, swin_heads: Sequence[int] = (3, 6, 12), dlf_heads: Sequence[int] = (6, 12),
               window_size: int = 7, reference_reinit: bool = False) -> HiFormer:
    """HiFormer-B as ``get_hiformer_b_configs``. ``embed_dim``/``*_heads``/``cnn_backbone``/``window_size``
    exist for tiny test models (the ImageNet weights fit only the defaults); ``img_size`` is the fixed
    internal resolution (a multiple of 16 whose feature sizes fit the window); ``reference_reinit``
    re-initialises the loaded Swin weights as the reference does (after the weights step)."""
    _positive(img_size, "img_size")
    _positive(embed_dim, "embed_dim")
    _positive(window_size, "window_size")
    if img_size % 16:
        raise MedplanError(f"hiformer_b: img_size must be a multiple of 16 (strides 4, 8, 16), got {img_size}")
    swin_heads, dlf_heads = [int(h) for h in swin_heads], [int(h) for h in dlf_heads]
    dims = [embed_dim, 2 * embed_dim, 4 * embed_dim]
    if len(swin_heads) != 3 or any(d % h for d, h in zip(dims, swin_heads)):
        raise MedplanError(f"hiformer_b: swin_heads {swin_heads} must be 3 values dividing {dims}")
    if len(dlf_heads) != 2 or dims[0] % dlf_heads[0] or dims[2] % dlf_heads[1]:
        raise MedplanError(f"hiformer_b: dlf_heads {dlf_heads} must be 2 values dividing {dims[0]} and {dims[2]}")
    if cnn_backbone not in RESNET_FILES:
        raise MedplanError(f"hiformer_b: cnn_backbone must be one of {', '.join(RESNET_FILES)}, got {cnn_backbone!r}")
    cfg = HiFormerConfig(swin_pyramid_fm=dims, image_size=img_size, cnn_backbone=cnn_backbone,
                         num_heads=(dlf_heads[0], dlf_heads[1]), swin_heads=tuple(swin_heads), window_size=window_size)
    res = img_size // cfg.patch_size
    for i in range(3):
        side = res // 2**i
        if side > window_size and side % window_size:
            raise MedplanError(f"hiformer_b: img_size {img_size} gives a {side}x{side} Swin stage that the window "
                               f"{window_size} does not tile (use a multiple of {4 * 4 * window_size}, e.g. 224)")
    model = HiFormer(cfg, in_channels, num_classes)
    model.reference_reinit = bool(reference_reinit)
    return model


__all__ = ["HiFormer", "HiFormerConfig", "HIFORMER_B", "hiformer_b", "hiformer_files", "reinit_swin_like_reference",
           "swin_key_map", "resnet_key_map", "SWIN_T_FILENAME", "RESNET_FILES", "INTERNAL_SIZE"]
