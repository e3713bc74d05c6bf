"""User overrides of plan decisions: ``--set key=value`` with dotted keys.

Values are parsed as JSON where possible (``--set input_size=[256,256]``,
``--set augmentation.hflip=true``, ``--set epochs.cv=50``), else kept as strings.
"""
from __future__ import annotations

import copy
import difflib
import json
from typing import Any

from medplan.errors import MedplanError


def parse_set_args(items: list[str] | None) -> dict[str, Any]:
    """``["a.b=1", "loss=ce"]`` -> ``{"a.b": 1, "loss": "ce"}``."""
    result: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise MedplanError(f"--set expects key=value, got {item!r}")
        key, _, raw = item.partition("=")
        key = key.strip()
        if not key:
            raise MedplanError(f"--set expects key=value, got {item!r}")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        result[key] = value
    return result


def _did_you_mean(key: str, node: Any) -> str:
    close = difflib.get_close_matches(key, list(node), n=1) if isinstance(node, dict) else []
    return f"; did you mean {close[0]!r}?" if close else ""


def apply_overrides(plan: dict, overrides: dict[str, Any] | None) -> dict:
    """Return a copy of ``plan`` with dotted-key overrides applied and recorded in ``reasons``.

    Only existing keys can be overridden, so a typo is an error rather than a silent no-op.
    """
    plan = copy.deepcopy(plan)
    for key, value in (overrides or {}).items():
        parts = key.split(".")
        node = plan
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node, dict) or part not in node:
                raise MedplanError(f"--set {key}: plans.json has no key {'.'.join(parts[: i + 1])!r}"
                                   + _did_you_mean(part, node))
            node = node[part]
        if not isinstance(node, dict) or parts[-1] not in node:
            raise MedplanError(f"--set {key}: plans.json has no key {key!r}" + _did_you_mean(parts[-1], node))
        node[parts[-1]] = value
        plan.setdefault("reasons", {})[key] = f"set by the user (--set {key}={json.dumps(value)})"
    if overrides:
        plan.setdefault("overrides", {}).update(overrides)
    return plan
