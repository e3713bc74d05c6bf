"""nnU-Net's 2D trainer choices for ``nnunet_2d``: deep supervision and Dice + CE, the plan for the rest.

Adopted from nnU-Net v2's ``nnUNetTrainer`` (each written to config.json under ``deviations``):

- the network planned for the plan's input size (``model_options["input_size"]``) with deep
  supervision: one loss term per decoder output, weights ``1/2^i`` (full resolution first), the
  lowest-resolution output weighted 0, then normalised to sum 1; targets downsampled to each
  output's size by nearest-neighbour;
- loss: soft Dice (per sample and class, ``batch_dice=False``, background excluded, smooth 1e-5,
  computed on softmax) + cross-entropy, equal weights (``DC_and_CE_loss``); for a binary plan
  (one output channel, ``loss "bce"``) Dice on the sigmoid + BCE, nnU-Net's region-based variant.
  As in nnU-Net, the Dice term enters as ``-Dice``, so the loss can be negative.

Kept from the shared protocol: the plan's optimizer (AdamW) and REX schedule, LR search, epochs,
batch size, augmentation and early stopping; nnU-Net's SGD (momentum 0.99, Nesterov, LR 1e-2)
with poly decay over 1000 epochs of 250 iterations is not adopted, so the comparison stays fair.
Validation and prediction use the full-resolution logits only (the model returns one tensor in
eval mode); the validation loss is the full-resolution Dice + CE.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medplan.plan import Plan
from medplan.trainers.base import Trainer
from medplan.trainers.registry import register_trainer

SMOOTH = 1e-5


def soft_dice(probs: torch.Tensor, onehot: torch.Tensor, smooth: float = SMOOTH) -> torch.Tensor:
    """Mean soft Dice over samples and channels (``batch_dice=False``: sums over space only)."""
    axes = tuple(range(2, probs.ndim))
    intersect = (probs * onehot).sum(axes)
    denom = probs.sum(axes) + onehot.sum(axes)
    return ((2 * intersect + smooth) / (denom + smooth).clamp_min(1e-8)).mean()


class DiceCELoss(nn.Module):
    """nnU-Net's ``DC_and_CE_loss`` (``ce``) or region-based ``DC_and_BCE_loss`` (``bce``) on one output."""

    def __init__(self, kind: str, num_outputs: int, weight_ce: float = 1.0, weight_dice: float = 1.0,
                 smooth: float = SMOOTH):
        super().__init__()
        # a plan's loss and outputs are checked when it is read (medplan.plan); this guards direct use
        if kind not in ("ce", "bce"):
            raise ValueError(f"unknown loss {kind!r} (expected bce or ce)")
        if kind == "bce" and num_outputs != 1:
            raise ValueError(f"loss bce needs num_outputs 1, got {num_outputs}")
        self.kind, self.num_outputs = kind, num_outputs
        self.weight_ce, self.weight_dice, self.smooth = weight_ce, weight_dice, smooth

    def forward(self, logits: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if logits.shape[1] != self.num_outputs:
            raise RuntimeError(f"network returned {logits.shape[1]} channels, the plan expects {self.num_outputs}")
        seg = seg.long()
        if self.kind == "bce":
            target = (seg == 1).float()[:, None]
            ce = F.binary_cross_entropy_with_logits(logits, target)
            dice = soft_dice(torch.sigmoid(logits), target, self.smooth)  # region: foreground only
        else:
            ce = F.cross_entropy(logits, seg)
            onehot = F.one_hot(seg, self.num_outputs).movedim(-1, 1).float()
            dice = soft_dice(torch.softmax(logits, 1)[:, 1:], onehot[:, 1:], self.smooth)  # do_bg=False
        return self.weight_ce * ce - self.weight_dice * dice


def deep_supervision_weights(n: int) -> list[float]:
    """nnU-Net's weights: 1/2^i, the lowest resolution dropped (weight 0), normalised to sum 1."""
    w = [1 / 2 ** i for i in range(n)]
    if n > 1:
        w[-1] = 0.0
    total = sum(w)
    return [v / total for v in w]


def downsample_seg(seg: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Integer labels (B, H, W) at ``size`` by nearest neighbour."""
    if tuple(seg.shape[-2:]) == tuple(size):
        return seg
    return F.interpolate(seg[:, None].float(), size=tuple(size), mode="nearest")[:, 0].to(seg.dtype)


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of ``loss`` over outputs (full resolution first); one tensor: the plain loss."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], seg: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, seg)
        weights = deep_supervision_weights(len(outputs))
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for w, out in zip(weights, outputs):
            if w:
                total = total + w * self.loss(out, downsample_seg(seg, out.shape[-2:]))
        return total


@register_trainer("nnunet_2d")
class NNUNet2DTrainer(Trainer):
    """Shared protocol + nnU-Net's planned topology, deep supervision and Dice + CE/BCE loss."""

    def __init__(self, *args: Any, **kwargs: Any):
        plan: Plan = kwargs["plan"]
        options = dict(kwargs.get("model_options") or {})
        # stored in model_options so the checkpoint and config.json rebuild the same topology
        options.setdefault("input_size", list(plan.input_size))
        options.setdefault("deep_supervision", True)
        kwargs["model_options"] = options
        size = "x".join(str(s) for s in options["input_size"])
        bce = plan.loss == "bce"
        self.deviations = [
            f"network topology planned by nnU-Net's 2D rules for the {size} input (stages until the bottleneck is "
            ">= 4 px, 32 features doubling to 512, 2 convs per stage, InstanceNorm + LeakyReLU)",
            ("loss: nnU-Net's Dice + BCE (region-based, sigmoid Dice, smooth 1e-5, equal weights)" if bce else
             "loss: nnU-Net's Dice + CE (soft Dice per sample, background excluded, smooth 1e-5, equal weights)")
            + " instead of the plan's plain " + ("BCE" if bce else "CE"),
        ]
        if options["deep_supervision"]:
            self.deviations.append("deep supervision: loss on every decoder output with weights 1/2^i (lowest "
                                   "resolution dropped, normalised), targets downsampled by nearest neighbour; "
                                   "validation and prediction use the full-resolution output only")
        else:
            self.find_unused_parameters = True  # the seg layers of the lower decoder stages get no gradient
        self.deviations.append("not adopted: nnU-Net's SGD (momentum 0.99, Nesterov, lr 1e-2) with poly decay; "
                               "the plan's optimizer, LR and schedule are kept")
        super().__init__(*args, **kwargs)

    def build_loss(self) -> nn.Module:
        return DeepSupervisionLoss(DiceCELoss(self.plan.loss, self.plan.num_outputs))
