"""Learning-rate schedules. The paper's protocol uses REX (Chen, Wolfe & Kyrillidis, MLSys 2022).

REX decays the rate as ``lr_t = lr_0 * (1 - z) / (1 - z / 2)`` with ``z = t / T``: it keeps the
rate high for longer than a linear decay and still reaches zero at the end of the budget. The
schedule is stepped once per optimizer step, so ``T`` is the full budget in steps (epochs times
steps per epoch); early stopping ends a run before ``z`` reaches 1, as in the paper.
"""
from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler


SCHEDULES = ("rex", "constant")


def rex_factor(step: int | float, total_steps: int | float) -> float:
    """The REX multiplier ``(1 - z) / (1 - z / 2)`` at ``z = step / total_steps`` (clipped to [0, 1])."""
    if total_steps <= 0:
        raise ValueError("total_steps must be positive")
    z = min(max(float(step) / float(total_steps), 0.0), 1.0)
    return (1.0 - z) / (1.0 - z / 2.0)


def rex_lr(lr0: float, step: int | float, total_steps: int | float) -> float:
    return lr0 * rex_factor(step, total_steps)


class _RexLambda:
    """A picklable multiplier (a closure would not survive a checkpoint round trip)."""

    def __init__(self, total_steps: int):
        self.total_steps = int(total_steps)

    def __call__(self, step: int) -> float:
        return rex_factor(step, self.total_steps)


class _Constant:
    def __call__(self, step: int) -> float:
        return 1.0


def build_scheduler(optimizer: Optimizer, name: str, total_steps: int) -> LRScheduler:
    """Scheduler named ``name`` (the plan's ``lr_schedule.name``, any case), stepped once per optimizer step."""
    name = name.lower()
    if name == "rex":
        return LambdaLR(optimizer, _RexLambda(max(1, total_steps)))
    if name == "constant":
        return LambdaLR(optimizer, _Constant())
    # a plan's schedule name is checked when it is read (medplan.plan); this guards direct use
    raise ValueError(f"unknown lr_schedule {name!r} (known: {', '.join(SCHEDULES)})")
