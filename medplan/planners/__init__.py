"""Planners turn a dataset fingerprint into a plan (``plans.json``).

The default planner reproduces the paper's protocol and chooses the augmentation from the
data. Another planner is named on the command line (``medplan_plan --planner NAME``) and
registers with :func:`register_planner` or the ``medplan.planners`` entry point group.
"""
from __future__ import annotations

import warnings
from importlib.metadata import entry_points
from typing import Callable

from medplan.errors import MedplanError

PlannerFn = Callable[..., dict]
_PLANNERS: dict[str, PlannerFn] = {}
_ENTRY_POINTS_LOADED = False


def register_planner(name: str) -> Callable[[PlannerFn], PlannerFn]:
    def decorator(fn: PlannerFn) -> PlannerFn:
        _PLANNERS[name] = fn
        return fn

    return decorator


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for ep in entry_points(group="medplan.planners"):
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plug-in must not break medplan
            warnings.warn(f"medplan planner plug-in {ep.name!r} failed to load: {exc}")
            continue
        if callable(obj) and ep.name not in _PLANNERS:
            _PLANNERS[ep.name] = obj


def get_planner(name: str) -> PlannerFn:
    from medplan.planners import default  # noqa: F401  (registers "default")

    _load_entry_points()
    if name not in _PLANNERS:
        raise MedplanError(f"unknown planner {name!r}; known: {', '.join(sorted(_PLANNERS))}")
    return _PLANNERS[name]


def list_planners() -> list[str]:
    get_planner("default")
    return sorted(_PLANNERS)
