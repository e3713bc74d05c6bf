"""SyncSAM's trainer: box prompts from the labels, Dice + focal loss, SAM's encoder frozen.

From the SyncSAM paper (Sec. 2.4, "Training Details"), adopted:

- loss ``L = 20 * Dice + Focal`` (lambda = 20; focal with SAM's gamma 2, alpha 0.25 for the binary head);
- box prompts in training: the bounding box of the label's foreground (all non-background
  classes), each side jittered by up to ``box_jitter`` pixels, the whole image when the label is
  empty (the paper simulates interactive prompts from the ground-truth masks);
- SAM's image encoder frozen (the model freezes it; this trainer checks it stays frozen).

Validation and prediction have no labels to prompt from: the box is the whole image (or the
builder's ``box=`` option), so the benchmark stays prompt-free at test time. Kept from the shared
protocol: optimizer, LR search, schedule, epochs, batch size, augmentation, the plan's input size
(the paper: 256x256, 12 epochs, LR 1e-4, five masks per image per step).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medplan.trainers import distributed as ddp
from medplan.trainers.base import Trainer
from medplan.trainers.registry import register_trainer

DICE_WEIGHT = 20.0
BOX_JITTER = 5


def boxes_from_labels(seg: torch.Tensor, jitter: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 4) boxes x0, y0, x1, y1 (pixels, inclusive) around ``seg > 0``; whole image where empty."""
    b, h, w = seg.shape
    fg = seg > 0
    rows, cols = fg.any(dim=2), fg.any(dim=1)  # (B, H), (B, W)
    ar_h = torch.arange(h, device=seg.device)
    ar_w = torch.arange(w, device=seg.device)
    big = max(h, w) + 1
    y0 = torch.where(rows, ar_h, big).amin(1)
    y1 = torch.where(rows, ar_h, -1).amax(1)
    x0 = torch.where(cols, ar_w, big).amin(1)
    x1 = torch.where(cols, ar_w, -1).amax(1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    if jitter > 0:
        noise = torch.randint(-jitter, jitter + 1, (b, 4), generator=generator).to(boxes)
        boxes = boxes + noise
    limit = boxes.new_tensor([w - 1, h - 1, w - 1, h - 1])
    boxes = torch.minimum(boxes.clamp(min=0), limit)
    # keep x0 <= x1, y0 <= y1 after jitter
    lo = torch.minimum(boxes[:, :2], boxes[:, 2:])
    hi = torch.maximum(boxes[:, :2], boxes[:, 2:])
    boxes = torch.cat([lo, hi], dim=1)
    empty = ~fg.flatten(1).any(1)
    boxes[empty] = boxes.new_tensor([0.0, 0.0, w - 1.0, h - 1.0])
    return boxes


class DiceFocalLoss(nn.Module):
    """``dice_weight * soft Dice + focal`` on logits (B, K, H, W) and integer labels (B, H, W).

    K == 1: sigmoid focal (alpha 0.25, gamma 2, as SAM) and Dice of the foreground;
    K > 1: softmax focal (gamma 2) and Dice averaged over the K classes.
    """

    def __init__(self, num_outputs: int, dice_weight: float = DICE_WEIGHT, gamma: float = 2.0, alpha: float = 0.25,
                 eps: float = 1.0):
        super().__init__()
        self.num_outputs, self.dice_weight, self.gamma, self.alpha, self.eps = num_outputs, dice_weight, gamma, alpha, eps

    def forward(self, logits: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if logits.shape[1] != self.num_outputs:
            raise RuntimeError(f"network returned {logits.shape[1]} channels, the plan expects {self.num_outputs}")
        if self.num_outputs == 1:
            target = (seg == 1).float().unsqueeze(1)
            prob = torch.sigmoid(logits)
            ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
            p_t = prob * target + (1 - prob) * (1 - target)
            a_t = self.alpha * target + (1 - self.alpha) * (1 - target)
            focal = (a_t * ce * (1 - p_t) ** self.gamma).mean()
        else:
            target = F.one_hot(seg.long(), self.num_outputs).permute(0, 3, 1, 2).float()
            logp = F.log_softmax(logits, dim=1)
            prob = logp.exp()
            focal = -(target * (1 - prob) ** self.gamma * logp).sum(1).mean()
        dims = (0, 2, 3)
        inter = (prob * target).sum(dims)
        dice = 1 - (2 * inter + self.eps) / (prob.sum(dims) + target.sum(dims) + self.eps)
        return self.dice_weight * dice.mean() + focal


@register_trainer("syncsam")
class SyncSAMTrainer(Trainer):
    """Shared protocol + label-derived box prompts + 20*Dice + focal; SAM's ViT frozen."""

    box_jitter = BOX_JITTER
    dice_weight = DICE_WEIGHT
    # SAM's point embeddings 0/1 and not_a_point_embed (kept so the checkpoint loads) get no gradient from box prompts
    find_unused_parameters = True
    deviations = [
        f"loss: {DICE_WEIGHT:g} * Dice + focal (SyncSAM paper, lambda = 20) instead of the plan's loss; "
        "class_weights not used",
        f"training prompts: bounding box of the label's foreground jittered by up to {BOX_JITTER} px per side "
        "(whole image if empty); validation and prediction prompt with the whole image (no labels at test time)",
        "SAM ViT-B image encoder frozen (paper); ResNet branch, fusion convolutions, prompt encoder and decoder trained",
    ]

    def build_network(self) -> nn.Module:
        model = super().build_network()
        frozen = [n for n, p in model.image_encoder.named_parameters() if p.requires_grad]
        if frozen:
            raise RuntimeError(f"syncsam: SAM image encoder parameters not frozen: {frozen[:3]}")
        return model

    def build_loss(self) -> nn.Module:
        return DiceFocalLoss(self.plan.num_outputs, dice_weight=self.dice_weight)

    def forward_batch(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """Training: prompted with the box of the batch's labels; validation and prediction
        (no labels at test time): the whole image, through :meth:`forward_logits`."""
        images = batch["image"]
        if ddp.unwrap(model).training:
            boxes = boxes_from_labels(batch["seg"].to(images.device), jitter=self.box_jitter).to(images.device)
            return model(images, boxes)
        return self.forward_logits(model, images)
