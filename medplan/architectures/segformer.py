"""SegFormer-B3 (Xie et al., NeurIPS 2021): MiT-B3 encoder + all-MLP decoder with 768 channels.

The pieces come from segmentation_models_pytorch 0.6: its ``MixVisionTransformer`` (NVIDIA's
MiT code, configured from smp's ``mit_b3`` entry: embed dims 64/128/320/512, depths 3/4/18/3,
heads 1/2/5/8, SR ratios 8/4/2/1, qkv bias, LayerNorm eps 1e-6, drop path 0.1 as in the
reference config) and its ``SegformerDecoder`` (per-stage linear embeddings, upsampling to 1/4,
1x1 fuse conv + BN + ReLU), followed by the reference head's ``Dropout2d(0.1)`` and 1x1
classifier; the 1/4-resolution logits are resized bilinearly (``align_corners=False``, as
mmseg) to the input size.

smp's MiT keeps NVIDIA's parameter names, so the official ImageNet checkpoint ``mit_b3.pth``
(``patch_embed1.proj.weight``, ``block1.0.attn.q.weight``, ``block1.0.attn.kv.weight``,
``block3.17.mlp.dwconv.dwconv.weight``, ``norm4.bias``, ...) loads into ``model.encoder``
without renaming; its classifier ``head.*`` is reported as unused. The mmseg-format full
checkpoint ``segformer.b3.512x512.ade.160k.pth`` loads too (its ``backbone.`` prefix is
stripped; ``decode_head.*`` is reported as unused). The smp-hub copy
(``smp-hub/mit_b3.imagenet`` in a filled Hugging Face cache) has the same names.

smp's ``MixVisionTransformerEncoder`` is not used because its ``load_state_dict`` takes no
``strict`` argument and it pads the feature list for smp's U-Net-style decoders; the base
class gives the four stage outputs directly.

The authors' optimizer recipe is in the model card (:data:`SEGFORMER_B3`): the official config
(NVlabs ``segformer.b3.512x512.ade.160k.py``) builds AdamW with ``paramwise_cfg=dict(custom_keys=
{'pos_block': dict(decay_mult=0.), 'norm': dict(decay_mult=0.), 'head': dict(lr_mult=10.)})``:
parameters whose name holds ``norm`` get no weight decay, the decode head learns 10x faster. mmcv
applies the first matching key (longest first, ties in the given order), so a head parameter
named ``norm`` keeps the base LR. The LR itself, its schedule, the weight decay value and
everything else follow the plan.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.decoders.segformer.decoder import SegformerDecoder
from segmentation_models_pytorch.encoders.mix_transformer import MixVisionTransformer, mix_transformer_encoders
from torch import nn

from medplan.architectures.card import ModelCard, ParamGroups, Weights, WeightsFile
from medplan.architectures.registry import register_model
from medplan.errors import MedplanError

MIT_B3_FILENAME = "mit_b3.pth"
MIT_B3_URL = ("https://github.com/NVlabs/SegFormer#training ('weights pretrained on ImageNet-1K': Google Drive "
              "https://drive.google.com/drive/folders/1b7bwrInTW4VLEm27YawHOAMSMikga2Ia); same tensors as "
              "https://huggingface.co/smp-hub/mit_b3.imagenet (model.safetensors)")
MIT_B3_HUB = "smp-hub/mit_b3.imagenet"
# keys of the ImageNet checkpoint that a segmentation model does not use (classifier head)
CLASSIFIER_KEYS = (r"^head\.",)
#: MiT-B3 ImageNet weights into ``model.encoder`` (VWFormer: ``backbone``); a filled Hugging Face cache also does
MIT_B3_WEIGHTS = WeightsFile(MIT_B3_FILENAME, MIT_B3_URL, target="encoder", ignore_missing=CLASSIFIER_KEYS,
                             hub_repo=MIT_B3_HUB)
HEAD_LR_MULT = 10.0
SEGFORMER_DEVIATION = ("AdamW parameter groups of the official SegFormer config: decode head LR x10 "
                       "(head lr_mult=10), no weight decay for parameters named 'norm' (decay_mult=0)")
#: smp's MiT-B3 configuration (NVIDIA's mit_b3 class)
MIT_B3 = {k: v for k, v in mix_transformer_encoders["mit_b3"]["params"].items() if k != "out_channels"}


# ------------------------------------------------------------------------- optimizer groups
def custom_keys_no_decay(name: str, param: torch.Tensor) -> bool:
    """mmcv's custom keys ``pos_block`` and ``norm`` (``decay_mult=0``) as substrings of the name."""
    return "pos_block" in name or "norm" in name


def segformer_param_groups(backbone: str) -> ParamGroups:
    """The official config's groups on our names: every parameter outside ``backbone`` is "head"
    (mmseg's ``decode_head``)."""
    return ParamGroups(no_weight_decay=custom_keys_no_decay, head_lr_factor=HEAD_LR_MULT, backbone=(f"{backbone}.",))


# ------------------------------------------------------------------------- model
class _LinspaceOnCPU(torch.overrides.TorchFunctionMode):
    """smp's MiT reads its drop-path rates with ``linspace(...).item()``, impossible on the ``meta``
    device (parameter counting); this mode computes that schedule on the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.linspace:
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


class MiT(MixVisionTransformer):
    """smp's (NVIDIA's) Mix Transformer returning the four stage outputs (strides 4, 8, 16, 32)."""

    def __init__(self, in_channels: int = 3, **config):
        with _LinspaceOnCPU():
            super().__init__(in_chans=in_channels, **config)
        self.in_channels = in_channels
        self.embed_dims = list(config.get("embed_dims", (64, 128, 256, 512)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_features(x)


def build_mit(in_channels: int, *, embed_dims: Sequence[int] | None = None, depths: Sequence[int] | None = None,
              num_heads: Sequence[int] | None = None, drop_path_rate: float = 0.1, name: str = "mit_b3") -> MiT:
    """MiT-B3 (smp's configuration); ``embed_dims``/``depths``/``num_heads`` shrink it for tests."""
    config = dict(MIT_B3, drop_path_rate=float(drop_path_rate))
    for key, value in (("embed_dims", embed_dims), ("depths", depths), ("num_heads", num_heads)):
        if value is not None:
            config[key] = int_list(value, key, name, length=4)
    if any(d % h for d, h in zip(config["embed_dims"], config["num_heads"])):
        raise MedplanError(f"{name}: embed_dims {config['embed_dims']} must be multiples of num_heads "
                           f"{config['num_heads']}")
    return MiT(in_channels, **config)


class SegFormer(nn.Module):
    """MiT ``encoder`` + smp's all-MLP ``decoder`` + ``segmentation_head`` (Dropout2d, 1x1 conv)."""

    def __init__(self, encoder: MiT, num_classes: int, *, decoder_channels: int = 768, dropout_ratio: float = 0.1):
        super().__init__()
        self.encoder = encoder
        # smp's decoder takes smp's feature list: [input, empty 1/2 level, 1/4, 1/8, 1/16, 1/32]
        self.decoder = SegformerDecoder([encoder.in_channels, 0, *encoder.embed_dims], encoder_depth=5,
                                        segmentation_channels=decoder_channels)
        self.segmentation_head = nn.Sequential(nn.Dropout2d(dropout_ratio), nn.Conv2d(decoder_channels, num_classes, 1))
        nn.init.normal_(self.segmentation_head[1].weight, std=0.01)  # mmseg's conv_seg initialisation
        nn.init.zeros_(self.segmentation_head[1].bias)
        self.pretrained_report: dict | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        features = self.encoder(x)
        empty = x.new_empty(b, 0, h // 2, w // 2)
        logits = self.segmentation_head(self.decoder([x, empty, *features]))
        return F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)


def int_list(value: Sequence[int], what: str, name: str, length: int | None = None) -> list[int]:
    try:
        out = [int(v) for v in value]
    except (TypeError, ValueError):
        raise MedplanError(f"{name}: {what} must be a list of positive integers, got {value!r}") from None
    if not out or any(v < 1 for v in out) or (length is not None and len(out) != length):
        n = f"{length} " if length else ""
        raise MedplanError(f"{name}: {what} must be a list of {n}positive integers, got {value!r}")
    return out


def check_drop_path(value: float, name: str) -> float:
    if not 0.0 <= float(value) < 1.0:
        raise MedplanError(f"{name}: drop_path_rate must be in [0, 1), got {value!r}")
    return float(value)


SEGFORMER_B3 = ModelCard(
    paper_params_m=47.0,
    weights=Weights((MIT_B3_WEIGHTS,)),
    param_groups=segformer_param_groups("encoder"),
    deviations=(SEGFORMER_DEVIATION,),
    test_options={"embed_dims": [8, 16, 32, 32], "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2],
                  "decoder_channels": 16},
)


@register_model("segformer_b3", card=SEGFORMER_B3, family="transformer",
                description="SegFormer-B3 (NeurIPS'21): MiT-B3 encoder + all-MLP head (768 ch)")
def segformer_b3(in_channels: int, num_classes: int, *, drop_path_rate: float = 0.1, decoder_channels: int = 768,
                 embed_dims: Sequence[int] | None = None, depths: Sequence[int] | None = None,
                 num_heads: Sequence[int] | None = None) -> SegFormer:
    """SegFormer-B3 as configured for ADE20K (``segformer.b3.512x512.ade.160k.py``); ``embed_dims``,
    ``depths``, ``num_heads`` and ``decoder_channels`` exist for tiny test models (the ImageNet weights
    ``mit_b3.pth`` fit only the defaults)."""
    name = "segformer_b3"
    encoder = build_mit(in_channels, embed_dims=embed_dims, depths=depths, num_heads=num_heads,
                        drop_path_rate=check_drop_path(drop_path_rate, name), name=name)
    channels = int_list([decoder_channels], "decoder_channels", name)[0]
    return SegFormer(encoder, num_classes, decoder_channels=channels)
