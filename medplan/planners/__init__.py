"""Planners turn a dataset fingerprint into a plan (``plans.json``).

The default planner reproduces the paper's protocol and chooses the augmentation from the
data. Another planner is named on the command line (``medplan_plan --planner NAME``) and
registers with :func:`register_planner` or the ``medplan.planners`` entry point group::

    [project.entry-points."medplan.planners"]
    my_planner = "my_package.plan:plan_my_way"     # a function (fingerprint, dataset_json, **kw) -> plan

Planners are served by a :class:`medplan.registry.Registry` (one registration per name,
plug-ins never replace built-ins, a broken plug-in is a warning, unknown names suggest close ones).
"""
from __future__ import annotations

from typing import Any, Callable

from medplan.registry import Registry

PlannerFn = Callable[..., dict]
ENTRY_POINT_GROUP = "medplan.planners"


def _from_plugin(name: str, obj: Any) -> PlannerFn:
    if not callable(obj):
        raise TypeError(f"planner plug-in {name!r} is not a function: {obj!r}")
    return obj


#: planner name -> planner function
PLANNERS: Registry[PlannerFn] = Registry("planner", group=ENTRY_POINT_GROUP, builtins=["medplan.planners.default"],
                                         from_plugin=_from_plugin)


def register_planner(name: str) -> Callable[[PlannerFn], PlannerFn]:
    """Decorator: ``@register_planner("mine")`` makes the function the planner of that name."""
    return PLANNERS.register(name)


def get_planner(name: str) -> PlannerFn:
    """The planner registered as ``name``; an unknown name is a MedplanError suggesting close ones."""
    return PLANNERS[name]


def list_planners() -> list[str]:
    return PLANNERS.names()
