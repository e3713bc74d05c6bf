"""A plan explained for people: each decision, its value and the evidence behind it."""
from __future__ import annotations

import json
import textwrap

from medplan.plan import Augmentation, Normalization, Plan

SHOWN = ("modality", "image_modality", "labels", "task", "loss", "split", "input_size", "batch_size",
         "normalization", "augmentation", "optimizer", "lr_schedule", "lr_grid", "lr", "epochs",
         "early_stopping", "excluded_cases")


def _normalization(n: Normalization) -> str:
    if n.scheme != "zscore":
        return json.dumps(n.to_json(), separators=(", ", ": "))
    mean = ", ".join(f"{m:.1f}" for m in n.mean)
    std = ", ".join(f"{s:.1f}" for s in n.std)
    return f"zscore mean [{mean}] std [{std}]"


def _augmentation(a: Augmentation) -> str:
    on = []
    if a.p_rotation:
        on.append(f"rot+-{a.rotation_deg:g}")
    if a.p_scale:
        on.append(f"scale{list(a.scale)}")
    on += [k for k in ("hflip", "vflip", "rot90") if getattr(a, k)]
    if a.p_intensity:
        on.append("bright/contrast")
    if a.p_gamma:
        on.append("gamma")
    if a.p_color:
        on.append("colour")
    if a.p_noise:
        on.append("noise")
    if a.p_blur:
        on.append("blur")
    return ", ".join(on) or "none"


def _value(plan: Plan, key: str, value: object) -> str:
    if key == "excluded_cases":
        return f"{len(plan.excluded_cases)} case(s)"
    if key == "normalization":
        return _normalization(plan.normalization)
    if key == "augmentation":
        return _augmentation(plan.augmentation)
    return json.dumps(value, separators=(", ", ": "))


def explain_plan(plan: Plan, width: int = 100) -> str:
    """Multi-line text: one block per decision with its value and reason."""
    data = plan.to_json()  # the decisions as plans.json holds them ('?' for a key it lacks)
    lines = [f"Plan for {plan.dataset} (planner {data.get('planner', '?')}): "
             f"{data.get('num_kept', '?')} of {data.get('num_cases', '?')} cases kept"]
    for key in SHOWN:
        if key not in data:
            continue
        lines.append(f"  {key:<15} {_value(plan, key, data[key])}")
        reason = plan.reason(key)
        if reason:
            lines += textwrap.wrap(reason, width=width, initial_indent=" " * 18, subsequent_indent=" " * 18)
    for key, reason in plan.reasons.items():  # user overrides of nested keys
        if key not in SHOWN and "." in key:
            lines.append(f"  {key:<15} {reason}")
    return "\n".join(lines)
