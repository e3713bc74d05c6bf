"""The plan: every decision of ``plans.json``, typed, checked in one place.

A :class:`Plan` is made from JSON by :meth:`Plan.from_json`, which does every check (types,
ranges, unknown keys with a "did you mean", rules between keys) and raises a one-line
:class:`~medplan.errors.MedplanError` naming the file on the first problem; stages then read
attributes (``plan.augmentation.hflip``, ``plan.epochs.cv``) and never check again.
:meth:`Plan.to_json` gives the JSON back, key for key and in the same order, so JSON stays
the file format (plans.json, config.json's ``plan``, a checkpoint's ``plan``) and a plan read
and written again is unchanged. The values derived from others (``num_classes``, ``task``,
``num_outputs``) are properties: written to JSON for its readers, never read from it.

Each section is a frozen dataclass whose fields are its table: a field's check, default (for
an optional key: the value used when the key is absent; for the augmentation: the value that
switches it off) and description sit in the field's declaration (:func:`entry`), and the
key lists, the off values and the section checks are derived from it. The augmentation table
(:class:`Augmentation`) drives the planner (its off values), validation and the augmenter
(:class:`medplan.data.augmentation.BatchAugmenter` reads the same object).

The reason of each decision stays beside it: ``plan.reasons`` (``plan.reason("split")``), as
in plans.json. ``--set`` overrides (:mod:`medplan.planners.overrides`) edit the JSON, which
:meth:`Plan.from_json` then checks; :func:`check_overrides` checks them before any work.
:func:`make_plan` builds a valid plan for tests and plug-ins.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from medplan.errors import MedplanError
from medplan.plan.checks import (Check, anything, check_case_ids, check_channels, check_dataset, check_input_size,
                                 check_labels, check_reasons, choice, integer, mapping, number, numbers, text,
                                 unknown_key)
from medplan.plan.sections import (LR_SCHEDULES, MONITORS, OPTIMIZERS, SPLIT_STRATEGIES, Augmentation, Duplicates,
                                   EarlyStopping, Epochs, FrozenDict, IntensityWindow, Normalization, Optimizer,
                                   Schedule, Section, Split, entry, freeze, has_default, json_keys_field, nullable,
                                   rows, section_check, thaw, written_keys)

__all__ = ["Plan", "make_plan", "check_overrides", "thaw", "Augmentation", "Duplicates", "EarlyStopping", "Epochs",
           "FrozenDict", "IntensityWindow", "Normalization", "Optimizer", "Schedule", "Section", "Split",
           "AUGMENTATION_OFF", "DERIVED_KEYS", "JSON_ORDER", "LOSSES", "LR_SCHEDULES", "MONITORS", "OPTIMIZERS",
           "OPTIONAL_KEYS", "REQUIRED_KEYS", "SPEC", "SPLIT_STRATEGIES"]

LOSSES = ("bce", "ce")
#: keys plans.json holds for its readers, computed from others (:attr:`Plan.num_classes`, ...)
DERIVED_KEYS = ("num_classes", "task", "num_outputs")


# ----------------------------------------------------------------------------- the plan
@dataclass(frozen=True, kw_only=True)
class Plan:
    """Every decision of plans.json (docs/formats.md), checked; build with :meth:`from_json`
    (or :func:`make_plan`), read attributes, write with :meth:`to_json`. A planner plug-in keeps
    its own data under ``extra``, which is not checked."""

    dataset: str = entry(check_dataset, doc="dataset name")
    planner: str | None = entry(text(), None, "planner that wrote the plan")
    medplan_version: str | None = entry(text(), None, "medplan version that wrote the plan")
    created: str | None = entry(text(), None, "when")
    raw_dir: str | None = entry(text(), None, "the raw dataset the plan was made from")
    modality: str = entry(choice(("gray", "rgb")), doc="what the network sees: gray or rgb")
    channels: int = entry(check_channels, doc="network input channels (1 or 3)")
    image_modality: str | None = entry(text(optional=True), None, "acquisition (echocardiography, ...)")
    labels: Mapping[str, int] = entry(check_labels, doc="class name -> index, background 0")
    loss: str = entry(choice(LOSSES), doc="bce (binary, 1 output) or ce (K outputs)")
    split: Split = entry(section_check(Split))
    input_size: tuple[int, int] = entry(check_input_size, doc="(height, width) the network sees")
    batch_size: int = entry(integer(1), doc="global batch size")
    normalization: Normalization = entry(section_check(Normalization))
    augmentation: Augmentation = entry(section_check(Augmentation))
    optimizer: Optimizer = entry(section_check(Optimizer))
    lr_schedule: Schedule = entry(section_check(Schedule))
    lr_grid: tuple[float, ...] = entry(numbers(number(0, lo_open=True), "positive numbers"),
                                       doc="learning rates of the LR search")
    lr: float = entry(number(0, lo_open=True), doc="learning rate before an LR search has chosen one")
    epochs: Epochs = entry(section_check(Epochs))
    early_stopping: EarlyStopping = entry(section_check(EarlyStopping))
    duplicates: Duplicates | None = entry(section_check(Duplicates), None, "the duplicate search's settings")
    num_cases: int | None = entry(integer(0, optional=True), None, "cases in the raw dataset")
    num_kept: int | None = entry(integer(0, optional=True), None, "cases kept")
    excluded_cases: tuple[str, ...] = entry(check_case_ids, doc="dropped duplicates: never in splits or arrays")
    intensity_window: IntensityWindow | None = entry(nullable(section_check(IntensityWindow)), None,
                                                     "one window for images with more than 8 bits (null: 8-bit)")
    reasons: Mapping[str, str] = entry(check_reasons, doc="decision -> why")
    overrides: Mapping[str, Any] = entry(mapping, FrozenDict(), "the user's --set values")
    extra: Mapping[str, Any] = entry(mapping, FrozenDict(), "a planner plug-in's own data (not checked)")
    json_keys: tuple[str, ...] | None = json_keys_field()

    # -- derived (written to JSON for its readers, never read from it)
    @property
    def num_classes(self) -> int:
        """Classes including background."""
        return len(self.labels)

    @property
    def task(self) -> str:
        return "binary" if self.num_classes == 2 else "multiclass"

    @property
    def num_outputs(self) -> int:
        """Channels of the network's logits: 1 for bce, K for ce (a model builder's ``num_classes``)."""
        return 1 if self.loss == "bce" else self.num_classes

    @property
    def class_names(self) -> list[str]:
        """Class names by index, background first."""
        return [name for name, _ in sorted(self.labels.items(), key=lambda kv: kv[1])]

    def reason(self, key: str) -> str | None:
        """Why decision ``key`` (a top-level key, or a dotted key the user set) was made."""
        return self.reasons.get(key)

    def updated(self, source: str | Path = "plans.json", **values: Any) -> "Plan":
        """A new plan with top-level JSON values replaced (``plan.updated(lr=1e-3)``), checked again."""
        return Plan.from_json({**self.to_json(), **{k: thaw(v) for k, v in values.items()}}, source=source)

    # -- JSON
    @classmethod
    def from_json(cls, data: Any, source: str | Path = "plans.json") -> "Plan":
        """Check every key of a plan's JSON and build the Plan; a MedplanError naming ``source``
        on the first problem. ``data`` is not modified."""
        checked = _check_plan(data, source)
        values: dict[str, Any] = {}
        for f in rows(cls):
            if f.name not in checked:
                continue
            value = checked[f.name]
            section = getattr(f.metadata["check"], "section", None)
            values[f.name] = (section.from_checked(value) if section is not None and value is not None
                              else freeze(value))
        return cls(**values, json_keys=tuple(checked))

    def to_json(self) -> dict:
        """The plan as JSON (a fresh dict): the keys it was read with, in their order, the
        derived ones recomputed."""
        keys = written_keys(self)
        if self.json_keys is None:
            keys = [k for k in JSON_ORDER if k in keys or k in DERIVED_KEYS]
        else:
            for k in DERIVED_KEYS:
                if k not in keys:
                    keys.insert(keys.index(_DERIVED_AFTER[k]) + 1 if _DERIVED_AFTER[k] in keys else len(keys), k)
        return {k: thaw(getattr(self, k)) for k in keys}


#: the order the default planner writes (and plans built in code are written in)
JSON_ORDER = ("dataset", "planner", "medplan_version", "created", "raw_dir", "modality", "channels", "image_modality",
              "labels", "num_classes", "task", "loss", "num_outputs", "split", "input_size", "batch_size",
              "normalization", "augmentation", "optimizer", "lr_schedule", "lr_grid", "lr", "epochs",
              "early_stopping", "duplicates", "num_cases", "num_kept", "excluded_cases", "intensity_window",
              "reasons", "overrides", "extra")
_DERIVED_AFTER = {"num_classes": "labels", "task": "num_classes", "num_outputs": "loss"}

#: every top-level key with its check (derived keys: any value, recomputed)
SPEC: dict[str, Check] = {**{f.name: f.metadata["check"] for f in rows(Plan)},
                          **{k: anything for k in DERIVED_KEYS}}
REQUIRED_KEYS = tuple(f.name for f in rows(Plan) if not has_default(f))
OPTIONAL_KEYS = tuple(k for k in SPEC if k not in REQUIRED_KEYS and k not in DERIVED_KEYS)
#: every key of plans.json["augmentation"] with the value that switches it off
AUGMENTATION_OFF: dict[str, Any] = Augmentation.off_json()
assert set(JSON_ORDER) == set(SPEC)


def _check_plan(data: Any, source: str | Path) -> dict:
    """Every check of a plan's JSON; returns a checked copy (channels made to agree with
    modality, input_size a list)."""
    if not isinstance(data, dict):
        raise MedplanError("a plan must be a JSON object", source)
    for key in data:
        if key not in SPEC:
            raise unknown_key(str(key), SPEC, "", source)
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise MedplanError(f"plan lacks key(s) {', '.join(missing)}", source)
    plan = copy.deepcopy(data)
    # the keys others depend on first, so their messages come before the dependants'
    for key in ("modality", "channels", "labels", "loss"):
        SPEC[key](plan[key], key, source, plan)
    if len(plan["labels"]) < 2:
        raise MedplanError("a segmentation plan needs at least 2 classes (background + one)", source)
    if plan["loss"] == "bce" and len(plan["labels"]) != 2:
        raise MedplanError("'loss': bce needs a binary task (2 classes); use ce", source)
    if (plan["modality"] == "rgb") != (plan["channels"] == 3):
        plan["channels"] = 3 if plan["modality"] == "rgb" else 1
    for key, value in list(plan.items()):
        plan[key] = SPEC[key](value, key, source, plan)
    return plan


def check_overrides(overrides: dict[str, Any] | None, source: str | Path = "--set") -> None:
    """Check ``--set`` keys and the values whose rule needs no other key, before any work is done
    (``--set lr=abc`` fails at once, not after the fingerprint pass or in medplan_train)."""
    for dotted, value in (overrides or {}).items():
        parts = dotted.split(".")
        spec: dict[str, Check] | None = SPEC
        check: Check | None = None
        for i, part in enumerate(parts):
            if spec is None:  # below a free-form object (labels, reasons, overrides, extra)
                check = None
                break
            if part not in spec:
                raise unknown_key(part, spec, f"in '{'.'.join(parts[:i])}': " if i else "", f"{source} {dotted}")
            check = spec[part]
            spec = getattr(check, "spec", None)
        if check is not None:
            check(value, dotted, f"{source} {dotted}", None)


# ----------------------------------------------------------------------------- a plan for tests and plug-ins
_SECTIONS = {f.name for f in rows(Plan) if getattr(f.metadata["check"], "section", None) is not None}


def make_plan(**overrides: Any) -> Plan:
    """A valid plan for tests and plug-ins: a gray binary dataset ``TOY`` under the paper's
    protocol, augmentation off. Keywords replace JSON values; a section given as a dict updates
    that section's values (``make_plan(augmentation={"hflip": True})``); ``num_classes=K`` makes
    K labels. ``modality``, ``loss`` and ``normalization`` follow ``channels`` and the labels
    unless given. Checked like any plan (:meth:`Plan.from_json`)."""
    num_classes = overrides.pop("num_classes", None)
    for key in ("task", "num_outputs"):
        overrides.pop(key, None)  # derived: accepted and recomputed, as in plans.json
    channels = overrides.get("channels", 3 if overrides.get("modality") == "rgb" else 1)
    labels = overrides.get("labels") or (
        {"background": 0, "foreground": 1} if num_classes in (None, 2)
        else {"background": 0, **{f"class_{i}": i for i in range(1, int(num_classes))}})
    data: dict[str, Any] = {
        "dataset": "TOY", "planner": "test", "medplan_version": "0.1.0", "created": "2026-01-01T00:00:00",
        "modality": "rgb" if channels == 3 else "gray", "channels": channels, "image_modality": "unknown",
        "labels": labels, "loss": "bce" if len(labels) == 2 else "ce",
        "split": {"strategy": "kfold", "n_folds": 5, "seed": 12345, "group_column": None},
        "input_size": [512, 512], "batch_size": 8,
        "normalization": {"scheme": "zscore", "mean": [0.0] * channels, "std": [255.0] * channels},
        "augmentation": Augmentation.off_json(),
        "optimizer": {"name": "AdamW", "weight_decay": 0.01, "betas": [0.9, 0.999]},
        "lr_schedule": {"name": "rex"}, "lr_grid": [1e-4, 5e-5, 1e-5], "lr": 1e-4,
        "epochs": {"lr_search": 100, "cv": 150},
        "early_stopping": {"monitor": "val_mIoU", "mode": "max", "patience": 30, "min_delta": 0.001},
        "excluded_cases": [], "intensity_window": None, "reasons": {},
    }
    for key, value in overrides.items():
        value = thaw(value)
        if key in _SECTIONS and isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return Plan.from_json({k: data[k] for k in JSON_ORDER if k in data}, source="make_plan")
