"""SegNeXt trainer: the shared protocol in full precision.

The benchmark paper (Sec. 2.3, "Implementation") trains every model with mixed precision
"except for SegNeXt due to instability" (its NMF Hamburger divides by small numbers in the
multiplicative updates). Everything else follows the plan. The base trainer decides AMP in
``_setup`` from ``settings.amp``; this trainer turns that setting off for its runs, so
``config.json`` records ``settings.amp = false``, ``amp = null`` and the deviation.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from medplan.trainers.base import Trainer, TrainSettings
from medplan.trainers.registry import register_trainer

AMP_DEVIATION = ("mixed precision off (fp32): the benchmark paper trained SegNeXt without mixed precision "
                 "due to instability; --amp is ignored")


@register_trainer("segnext_l")
class SegNeXtTrainer(Trainer):
    """Shared protocol without mixed precision."""

    deviations = [AMP_DEVIATION]

    def __init__(self, *args: Any, settings: TrainSettings, **kwargs: Any):
        # a copy: the caller's settings object (e.g. reused across an LR search) stays as given
        super().__init__(*args, settings=dataclasses.replace(settings, amp=False), **kwargs)
