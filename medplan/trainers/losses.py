"""The protocol's losses: BCE for binary tasks (one logit channel), CE for multi-class.

The plan decides which (``plan.loss``); a per-architecture trainer may wrap or weight
them in its own ``build_loss``.
"""
from __future__ import annotations

import torch
from torch import nn

from medplan.plan import Plan


class SegmentationLoss(nn.Module):
    """Loss on logits ``(B, K, H, W)`` and integer labels ``(B, H, W)``, computed in float32."""

    def __init__(self, kind: str, num_outputs: int, class_weights: list[float] | None = None):
        super().__init__()
        # a plan's loss and outputs are checked when it is read (medplan.plan); this guards direct use
        if kind not in ("bce", "ce"):
            raise ValueError(f"unknown loss {kind!r} (expected bce or ce)")
        if kind == "bce" and num_outputs != 1:
            raise ValueError(f"loss bce needs num_outputs 1, got {num_outputs}")
        self.kind = kind
        self.num_outputs = num_outputs
        weight = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        if kind == "bce":
            # class_weights for bce: [w_background, w_foreground] -> pos_weight = w_fg / w_bg
            pos = None if weight is None else (weight[1] / weight[0]).reshape(1)
            self.criterion = nn.BCEWithLogitsLoss(pos_weight=pos)
        else:
            self.criterion = nn.CrossEntropyLoss(weight=weight)

    def forward(self, logits: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if logits.shape[1] != self.num_outputs:
            raise RuntimeError(f"network returned {logits.shape[1]} channels, the plan expects {self.num_outputs}")
        if self.kind == "bce":
            return self.criterion(logits[:, 0], (seg == 1).float())
        return self.criterion(logits, seg.long())


def build_loss(plan: Plan, class_weights: list[float] | None = None) -> SegmentationLoss:
    return SegmentationLoss(plan.loss, plan.num_outputs, class_weights)
