"""U-Net (Ronneberger, Fischer & Brox, MICCAI 2015), the paper's baseline SMA.

Structure as in the paper: a contracting path of ``depth`` levels (two 3x3 convolutions,
then 2x2 max-pooling), a bottleneck, and an expanding path (2x2 transposed convolution that
halves the channels, concatenation with the skip, two 3x3 convolutions), then a 1x1
convolution to the classes. Channels double per level: 64, 128, 256, 512, 1024 for the
default ``base_channels=64, depth=4`` (31.0M parameters, Table 1 of the benchmark paper).

Two modern deviations, as in most re-implementations used for benchmarks: the 3x3
convolutions are padded (``padding=1``), so the logits have the input's size and no
cropping of skips is needed; and each convolution is followed by BatchNorm + ReLU (the
convolution then has no bias). Inputs whose sides are not multiples of ``2**depth`` are
zero-padded and the logits cropped back (the card's input contract, applied by ``build_model``),
so any size works.
"""
from __future__ import annotations

import torch
from torch import nn

from medplan.architectures.card import InputContract, ModelCard
from medplan.architectures.registry import register_model
from medplan.errors import MedplanError


class DoubleConv(nn.Sequential):
    """Two (3x3 conv -> BatchNorm -> ReLU): one level of either path."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class Up(nn.Module):
    """2x2 transposed conv halving the channels, concat with the skip, DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        self.conv = DoubleConv(2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """U-Net mapping ``(B, in_channels, H, W)`` to logits ``(B, num_classes, H, W)``."""

    def __init__(self, in_channels: int, num_classes: int, base_channels: int = 64, depth: int = 4):
        super().__init__()
        for what, value in (("base_channels", base_channels), ("depth", depth)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MedplanError(f"unet: {what} must be a positive integer, got {value!r}")
        self.depth = depth
        widths = [base_channels * 2**i for i in range(depth + 1)]  # 64, 128, 256, 512, 1024
        self.inc = DoubleConv(in_channels, widths[0])
        self.down = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), DoubleConv(widths[i], widths[i + 1])) for i in range(depth)
        )
        self.up = nn.ModuleList(Up(widths[i + 1], widths[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(widths[0], num_classes, kernel_size=1)

    def bottleneck(self, y: torch.Tensor) -> torch.Tensor:
        """Hook on the deepest feature map (identity here; LLM4Seg puts its LLM layer there)."""
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for sides that are multiples of ``2**depth`` (the input contract pads the others)."""
        skips = [self.inc(x)]
        for down in self.down:
            skips.append(down(skips[-1]))
        y = self.bottleneck(skips.pop())
        for up in self.up:
            y = up(y, skips.pop())
        return self.head(y)


#: every max-pooling halves the map: sides must be multiples of 2**depth
UNET_INPUT = InputContract(pad_to_multiple=lambda model: 2**model.depth)
UNET = ModelCard(paper_params_m=31.0, input=UNET_INPUT, test_options={"base_channels": 4, "depth": 3})
UNET_SMALL = ModelCard(input=UNET_INPUT, test_options={"base_channels": 4, "depth": 3})


@register_model("unet", card=UNET, description="U-Net (Ronneberger 2015), BatchNorm, padded convs", family="cnn")
def unet(in_channels: int, num_classes: int, *, base_channels: int = 64, depth: int = 4) -> nn.Module:
    return UNet(in_channels, num_classes, base_channels=base_channels, depth=depth)


@register_model("unet_small", card=UNET_SMALL, description="U-Net with 16 base channels (CPU demo and tests)",
                family="cnn")
def unet_small(in_channels: int, num_classes: int, *, base_channels: int = 16, depth: int = 4) -> nn.Module:
    return UNet(in_channels, num_classes, base_channels=base_channels, depth=depth)
