"""Swin-UMamba's trainer: the authors' optimizer settings and frozen-encoder warm-up, the plan for the rest.

From the authors' ``nnUNetTrainerSwinUMamba`` (JiarunLiu/Swin-UMamba), adopted:

- AdamW with ``weight_decay=0.05`` and ``eps=1e-5`` (the plan's AdamW otherwise: its betas, and the
  LR from the benchmark's LR search);
- the VMamba encoder frozen, except its new patch embedding, for the first 10 epochs
  (``freeze_encoder_epochs = 10``) when ImageNet weights were loaded. Their from-scratch trainer
  (``nnUNetTrainerSwinUMambaScratch``, ``freeze_encoder_epochs = -1``) does not freeze, and
  neither does this one under ``--no-pretrained``.

Kept from the shared protocol (the benchmark's unified recipe), although the authors' nnU-Net
trainer differs: the LR (searched over the plan's grid; theirs is a fixed 1e-4, which is in the
grid), the REX schedule (theirs: cosine to 1e-6 over epochs), the plan's loss without deep
supervision (theirs: nnU-Net's Dice+CE with deep supervision), the plan's epochs and early stopping.

Each adopted change is written to config.json under ``deviations``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from medplan.trainers import distributed as ddp
from medplan.trainers.base import Trainer
from medplan.trainers.registry import register_trainer


@register_trainer("swin_umamba")
class SwinUMambaTrainer(Trainer):
    """Shared protocol + AdamW(weight_decay 0.05, eps 1e-5) + 10 frozen-encoder warm-up epochs."""

    weight_decay = 0.05
    adam_eps = 1e-5
    freeze_encoder_epochs = 10
    deviations = [
        "optimizer: AdamW weight_decay 0.05, eps 1e-5 (Swin-UMamba's nnUNetTrainerSwinUMamba) instead of the "
        "plan's weight_decay and eps 1e-8",
    ]

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.encoder_pretrained = False  # set by build_network: ImageNet weights were loaded

    def build_network(self) -> nn.Module:
        model = super().build_network()
        self.encoder_pretrained = getattr(model, "pretrained_report", None) is not None
        if self.encoder_pretrained and self.freeze_encoder_epochs > 0:
            # frozen parameters get no gradient: DDP must not wait for them (checked with 2 gloo processes)
            self.find_unused_parameters = True
            self.notes.append(f"VMamba encoder frozen (except patch_embed) for the first {self.freeze_encoder_epochs} "
                              "epochs (Swin-UMamba's freeze_encoder_epochs warm-up for ImageNet weights)")
        else:
            self.notes.append("no frozen-encoder warm-up: encoder trained from scratch (as the authors' "
                              "nnUNetTrainerSwinUMambaScratch)")
        return model

    def optimizer_options(self) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
        _, options = super().optimizer_options()
        return torch.optim.AdamW, {**options, "weight_decay": self.weight_decay, "eps": self.adam_eps}

    def encoder_frozen(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (1-based) trains with the encoder frozen."""
        return self.encoder_pretrained and epoch <= self.freeze_encoder_epochs

    def on_epoch_start(self, epoch: int) -> None:
        model = ddp.unwrap(self.model)
        frozen = self.encoder_frozen(epoch)
        was_frozen = not all(p.requires_grad for p in model.vssm_encoder.parameters())
        if frozen:
            model.freeze_encoder()
        else:
            model.unfreeze_encoder()
        if frozen != was_frozen and self.log is not None:
            self.log.info(f"epoch {epoch}: VMamba encoder {'frozen' if frozen else 'unfrozen'}")
