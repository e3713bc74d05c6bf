"""HiFormer and MISSFormer trainers: the shared protocol with the network run at 224x224.

The benchmark paper (Sec. 2.3, "Implementation") lists as a deviation from its unified setup
"MISSFormer and HiFormer, which internally operate at 224x224 resolution". Through the base trainer's
``internal_size`` hook each batch at the planned input size is resized bilinearly to 224x224, the
network runs there, and its logits are resized bilinearly back to the planned size before the loss;
validation and ``medplan_predict`` take the same path (``config.json`` records ``internal_size``).
Everything else (optimizer, LR, schedule, loss, batch size, epochs, augmentation) follows the plan.

Both models hold parameters their reference implementations build but never use in ``forward``
(HiFormer's DLF self-attention blocks; MISSFormer's ``decoder_3`` fusion blocks and spare FFN norms),
so DDP runs with ``find_unused_parameters``. That changes nothing in the optimisation.
"""
from __future__ import annotations

from typing import Any

from medplan.trainers.base import Trainer
from medplan.trainers.registry import register_trainer

INTERNAL = 224


def _resize_note(model: str, size: tuple[int, int], plan: dict) -> str:
    planned = "x".join(str(int(s)) for s in plan.get("input_size", ()))
    return (f"network runs at {size[0]}x{size[1]} internally: batches at the planned input size ({planned}) are "
            f"resized bilinearly to {size[0]}x{size[1]} and the logits resized back before the loss, in validation "
            f"and in prediction (the benchmark paper's deviation for {model})")


class Internal224Trainer(Trainer):
    """Shared protocol; the network sees ``internal_size`` inputs (224x224 unless the model is built smaller)."""

    internal_size: tuple[int, int] | None = (INTERNAL, INTERNAL)
    find_unused_parameters = True
    model_label = ""
    extra_deviations: list[str] = []

    def __init__(self, *args: Any, **kwargs: Any):
        options = kwargs.get("model_options") or {}
        size = int(options.get("img_size", INTERNAL))  # HiFormer's fixed resolution, when a run changes it
        self.internal_size = (size, size)
        self.deviations = [_resize_note(self.model_label, self.internal_size, kwargs.get("plan") or {}),
                           *self.extra_deviations]
        super().__init__(*args, **kwargs)


@register_trainer("hiformer_b")
class HiFormerTrainer(Internal224Trainer):
    """HiFormer-B at 224x224 (its position embeddings are sized for a 224x224 input)."""

    model_label = "HiFormer"


@register_trainer("missformer")
class MISSFormerTrainer(Internal224Trainer):
    """MISSFormer at 224x224, trained from scratch as in its reference implementation."""

    model_label = "MISSFormer"
    extra_deviations = ["no ImageNet weights: MISSFormer's reference implementation trains from scratch "
                        "(no pretrained checkpoint is published)"]
