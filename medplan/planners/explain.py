"""A plan explained for people: each decision, its value and the evidence behind it."""
from __future__ import annotations

import json
import textwrap

SHOWN = ("modality", "image_modality", "labels", "task", "loss", "split", "input_size", "batch_size",
         "normalization", "augmentation", "optimizer", "lr_schedule", "lr_grid", "lr", "epochs",
         "early_stopping", "excluded_cases")


def _value(key: str, value: object) -> str:
    if key == "excluded_cases":
        return f"{len(value)} case(s)"  # type: ignore[arg-type]
    if key == "normalization" and isinstance(value, dict) and value.get("scheme") == "zscore":
        mean = ", ".join(f"{m:.1f}" for m in value["mean"])
        std = ", ".join(f"{s:.1f}" for s in value["std"])
        return f"zscore mean [{mean}] std [{std}]"
    if key == "augmentation" and isinstance(value, dict):
        on = []
        if value.get("p_rotation"):
            on.append(f"rot+-{value['rotation_deg']:g}")
        if value.get("p_scale"):
            on.append(f"scale{value['scale']}")
        on += [k for k in ("hflip", "vflip", "rot90") if value.get(k)]
        if value.get("p_intensity"):
            on.append("bright/contrast")
        if value.get("p_gamma"):
            on.append("gamma")
        if value.get("p_color"):
            on.append("colour")
        if value.get("p_noise"):
            on.append("noise")
        if value.get("p_blur"):
            on.append("blur")
        return ", ".join(on) or "none"
    return json.dumps(value, separators=(", ", ": "))


def explain_plan(plan: dict, width: int = 100) -> str:
    """Multi-line text: one block per decision with its value and reason."""
    lines = [f"Plan for {plan.get('dataset')} (planner {plan.get('planner', '?')}): "
             f"{plan.get('num_kept', '?')} of {plan.get('num_cases', '?')} cases kept"]
    reasons = plan.get("reasons", {})
    for key in SHOWN:
        if key not in plan:
            continue
        lines.append(f"  {key:<15} {_value(key, plan[key])}")
        reason = reasons.get(key)
        if reason:
            lines += textwrap.wrap(reason, width=width, initial_indent=" " * 18, subsequent_indent=" " * 18)
    for key, reason in reasons.items():  # user overrides of nested keys
        if key not in SHOWN and "." in key:
            lines.append(f"  {key:<15} {reason}")
    return "\n".join(lines)
