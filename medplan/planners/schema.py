"""What every plan must hold, whichever planner wrote it, and the keys derived from others.

Trainers and predictors rely on these keys; checking them here turns a bad edit of
plans.json or a bad ``--set`` into a one-line error instead of a crash mid-training. Every
key is type- and range-checked where it is read (:func:`finalize_plan`), and a key medplan
does not know, at the top level or inside a section, is an error with a "did you mean"
(``batchsize`` -> ``batch_size``): a typo would otherwise be ignored silently. A planner
plug-in keeps its own data under ``extra``, which is not checked.
"""
from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any, Callable

from medplan.errors import MedplanError
from medplan.names import check_name, is_valid_name, RULE

REQUIRED_KEYS = (
    "dataset", "modality", "channels", "labels", "num_classes", "task", "loss", "num_outputs",
    "split", "input_size", "batch_size", "normalization", "augmentation", "optimizer",
    "lr_schedule", "lr_grid", "lr", "epochs", "early_stopping", "excluded_cases", "reasons",
)
# written by the default planner and the pipeline besides the required keys
OPTIONAL_KEYS = (
    "planner", "medplan_version", "created", "raw_dir", "image_modality", "duplicates", "num_cases",
    "num_kept", "overrides", "extra", "intensity_window",
)
LOSSES = ("bce", "ce")
SPLIT_STRATEGIES = ("kfold", "group_kfold")
OPTIMIZERS = ("AdamW", "Adam")
LR_SCHEDULES = ("rex", "constant")  # medplan.trainers.schedule.SCHEDULES (kept equal by a test)
MONITORS = ("val_mIoU", "val_mDSC", "val_loss")
MAX_SEED = 2**32 - 1

# Every key of plans.json["augmentation"], with the value that switches it off (the data
# pipeline reads the same table, so planner and augmenter cannot drift apart).
AUGMENTATION_OFF: dict[str, object] = {
    "rotation_deg": 0.0, "p_rotation": 0.0,
    "scale": [1.0, 1.0], "p_scale": 0.0,
    "hflip": False, "vflip": False, "rot90": False,
    "brightness": 0.0, "contrast": 0.0, "p_intensity": 0.0,
    "saturation": 0.0, "hue": 0.0, "p_color": 0.0,
    "gamma": [1.0, 1.0], "p_gamma": 0.0,
    "noise_std": 0.0, "p_noise": 0.0,
    "blur_sigma": [0.5, 1.0], "p_blur": 0.0,
}

Check = Callable[[Any, str, Any, "dict | None"], Any]  # (value, key, source, plan or None) -> value


# ----------------------------------------------------------------------------- value checks
def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fail(key: str, what: str, value: Any, source: Any) -> MedplanError:
    return MedplanError(f"'{key}' must be {what}, got {_shown(value)}", source)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def number(lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False, hi_open: bool = False) -> Check:
    """A finite number in [lo, hi] (``lo_open``/``hi_open``: that end excluded)."""
    left, right = "(" if lo_open else "[", ")" if hi_open else "]"
    if lo == -math.inf and hi == math.inf:
        what = "a finite number"
    elif hi == math.inf and lo_open and lo == 0:
        what = "a positive number"
    elif hi == math.inf:
        what = f"a number {'>' if lo_open else '>='} {lo:g}"
    else:
        what = f"a number in {left}{lo:g}, {hi:g}{right}"

    def check(value: Any, key: str, source: Any, plan: dict | None) -> Any:
        if not _is_number(value) or value < lo or value > hi or (lo_open and value == lo) or (hi_open and value == hi):
            raise _fail(key, what, value, source)
        return value

    return check


def integer(lo: int = 0, hi: int | None = None, *, optional: bool = False) -> Check:
    what = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
    what += " or null" if optional else ""

    def check(value: Any, key: str, source: Any, plan: dict | None) -> Any:
        if optional and value is None:
            return value
        if not _is_int(value) or value < lo or (hi is not None and value > hi):
            raise _fail(key, what, value, source)
        return value

    return check


def choice(options: tuple[str, ...], *, case_insensitive: bool = False) -> Check:
    def check(value: Any, key: str, source: Any, plan: dict | None) -> Any:
        ok = isinstance(value, str) and (value.lower() in {o.lower() for o in options} if case_insensitive
                                         else value in options)
        if not ok:
            raise _fail(key, "one of " + ", ".join(options), value, source)
        return value

    return check


def text(*, optional: bool = False) -> Check:
    def check(value: Any, key: str, source: Any, plan: dict | None) -> Any:
        if not (isinstance(value, str) or (optional and value is None)):
            raise _fail(key, "a string" + (" or null" if optional else ""), value, source)
        return value

    return check


def flag(value: Any, key: str, source: Any, plan: dict | None) -> Any:
    if not isinstance(value, bool):
        raise _fail(key, "true or false", value, source)
    return value


def span(lo: float, hi: float = math.inf) -> Check:
    """``[low, high]`` with ``lo < low <= high <= hi``."""
    what = f"[low, high] with {lo:g} < low <= high" + ("" if hi == math.inf else f" < {hi:g}")

    def check(value: Any, key: str, source: Any, plan: dict | None) -> Any:
        if (not isinstance(value, list) or len(value) != 2 or not all(_is_number(v) for v in value)
                or not lo < value[0] <= value[1] or value[1] >= hi):
            raise _fail(key, what, value, source)
        return value

    return check


def pair(lo: float, hi: float) -> Check:
    """Two numbers, each in [lo, hi) (Adam's betas)."""
    def check(value: Any, key: str, source: Any, plan: dict | None) -> Any:
        if not isinstance(value, list) or len(value) != 2 or not all(_is_number(v) and lo <= v < hi for v in value):
            raise _fail(key, f"two numbers in [{lo:g}, {hi:g})", value, source)
        return value

    return check


def numbers(check_one: Check, what: str, *, non_empty: bool = True) -> Check:
    def check(value: Any, key: str, source: Any, plan: dict | None) -> Any:
        if not isinstance(value, list) or (non_empty and not value):
            raise _fail(key, f"a {'non-empty ' if non_empty else ''}list of {what}", value, source)
        for i, v in enumerate(value):
            try:
                check_one(v, f"{key}[{i}]", source, plan)
            except MedplanError:
                raise _fail(key, f"a list of {what}", value, source) from None
        return value

    return check


def anything(value: Any, key: str, source: Any, plan: dict | None) -> Any:
    return value


def mapping(value: Any, key: str, source: Any, plan: dict | None) -> Any:
    if not isinstance(value, dict):
        raise _fail(key, "an object", value, source)
    return value


# ----------------------------------------------------------------------------- sections
def _unknown(key: str, known: Any, where: str, source: Any) -> MedplanError:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(known)})"
    return MedplanError(f"unknown key {where}{key!r}{hint}", source)


def section(spec: dict[str, Check], required: tuple[str, ...] = ()) -> Check:
    """An object whose keys are those of ``spec`` (``required`` ones must be there)."""

    def check(value: Any, key: str, source: Any, plan: dict | None) -> Any:
        if not isinstance(value, dict):
            raise _fail(key, "an object", value, source)
        for sub in value:
            if sub not in spec:
                raise _unknown(str(sub), spec, f"in '{key}': ", source)
        missing = [r for r in required if r not in value]
        if missing:
            raise MedplanError(f"'{key}' lacks key(s) {', '.join(missing)}", source)
        for sub, sub_value in value.items():
            spec[sub](sub_value, f"{key}.{sub}", source, plan)
        return value

    check.spec = spec  # type: ignore[attr-defined]  (read by check_overrides)
    return check


def _labels(value: Any, key: str, source: Any, plan: dict | None) -> Any:
    if (not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value)
            or not all(_is_int(v) for v in value.values()) or sorted(value.values()) != list(range(len(value)))):
        raise MedplanError("'labels' must map names to contiguous indices 0..K-1", source)
    return value


def _channels(value: Any, key: str, source: Any, plan: dict | None) -> Any:
    if not _is_int(value) or value not in (1, 3):
        raise MedplanError(f"'channels' must be 1 (gray) or 3 (rgb), got {_shown(value)}", source)
    return value


def _input_size(value: Any, key: str, source: Any, plan: dict | None) -> Any:
    size = [value, value] if _is_int(value) else value
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(_is_int(s) and s >= 8 for s in size)):
        raise MedplanError(f"'input_size' must be [height, width] of integers >= 8, got {_shown(value)}", source)
    return list(size)


def _dataset(value: Any, key: str, source: Any, plan: dict | None) -> Any:
    return check_name(value, "dataset name", source)


def _case_ids(value: Any, key: str, source: Any, plan: dict | None) -> Any:
    if not isinstance(value, list):
        raise _fail(key, "a list of case ids", value, source)
    seen = set()
    for case in value:
        if not is_valid_name(case):
            raise MedplanError(f"'{key}': invalid case id {_shown(case)}: must be {RULE}", source)
        if case in seen:
            raise MedplanError(f"'{key}': case id {case!r} appears twice", source)
        seen.add(case)
    return value


def _reasons(value: Any, key: str, source: Any, plan: dict | None) -> Any:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise _fail(key, "an object of strings (decision -> reason)", value, source)
    return value


def _normalization(value: Any, key: str, source: Any, plan: dict | None) -> Any:
    NORMALIZATION(value, key, source, plan)
    scheme = value.get("scheme")
    if scheme is None:
        raise MedplanError("'normalization' lacks key(s) scheme", source)
    if scheme == "zscore":
        for sub in ("mean", "std"):
            if sub not in value:
                raise MedplanError(f"'normalization' (zscore) lacks key {sub!r}", source)
        if plan is not None and (len(value["mean"]) != plan.get("channels") or len(value["std"]) != plan.get("channels")):
            raise MedplanError("'normalization' needs one mean and one std per channel", source)
    return value


NORMALIZATION = section({
    "scheme": choice(("zscore", "minmax")),
    "mean": numbers(number(), "numbers (one per channel)"),
    "std": numbers(number(0, lo_open=True), "positive numbers (one per channel)"),
})

AUGMENTATION_SPEC: dict[str, Check] = {
    "rotation_deg": number(0, 180), "p_rotation": number(0, 1),
    "scale": span(0), "p_scale": number(0, 1),
    "hflip": flag, "vflip": flag, "rot90": flag,
    "brightness": number(0, 1), "contrast": number(0, 1), "p_intensity": number(0, 1),
    "saturation": number(0, 1), "hue": number(0, 0.5), "p_color": number(0, 1),
    "gamma": span(0), "p_gamma": number(0, 1),
    "noise_std": number(0, 1), "p_noise": number(0, 1),
    "blur_sigma": span(0), "p_blur": number(0, 1),
}
_WINDOW = section({"low": number(), "high": number(), "images": integer(0), "source": text()},
                  required=("low", "high"))


def _intensity_window(value: Any, key: str, source: Any, plan: dict | None) -> Any:
    """dataset.json's one window for images with more than 8 bits (null: all 8-bit); prediction
    maps new images through the same window."""
    if value is None:
        return value
    _WINDOW(value, key, source, plan)
    if not value["high"] > value["low"]:
        raise _fail(key, "a window with high > low", value, source)
    return value


_normalization.spec = NORMALIZATION.spec  # type: ignore[attr-defined]
assert set(AUGMENTATION_SPEC) == set(AUGMENTATION_OFF)

SPEC: dict[str, Check] = {
    "dataset": _dataset,
    "planner": text(),
    "medplan_version": text(),
    "created": text(),
    "raw_dir": text(),
    "modality": choice(("gray", "rgb")),
    "channels": _channels,
    "image_modality": text(optional=True),
    "labels": _labels,
    "num_classes": anything,   # derived from labels
    "task": anything,          # derived from labels
    "loss": choice(LOSSES),
    "num_outputs": anything,   # derived from loss and labels
    "split": section({"strategy": choice(SPLIT_STRATEGIES), "n_folds": integer(2), "seed": integer(0, MAX_SEED),
                      "group_column": text(optional=True)}, required=("strategy", "n_folds", "seed")),
    "input_size": _input_size,
    "batch_size": integer(1),
    "normalization": _normalization,
    "augmentation": section(AUGMENTATION_SPEC),
    "optimizer": section({"name": choice(OPTIMIZERS, case_insensitive=True), "weight_decay": number(0),
                          "betas": pair(0.0, 1.0)}, required=("name",)),
    "lr_schedule": section({"name": choice(LR_SCHEDULES, case_insensitive=True)}, required=("name",)),
    "lr_grid": numbers(number(0, lo_open=True), "positive numbers"),
    "lr": number(0, lo_open=True),
    "epochs": section({"lr_search": integer(1), "cv": integer(1)}, required=("lr_search", "cv")),
    "early_stopping": section({"monitor": choice(MONITORS), "mode": choice(("max", "min")),
                               "patience": integer(1, optional=True), "min_delta": number(0)},
                              required=("monitor", "mode")),
    "duplicates": section({"hash": text(optional=True), "hash_size": integer(1, optional=True),
                           "threshold": integer(0, optional=True), "n_dropped": integer(0, optional=True)}),
    "num_cases": integer(0, optional=True),
    "num_kept": integer(0, optional=True),
    "excluded_cases": _case_ids,
    "reasons": _reasons,
    "overrides": mapping,
    "extra": mapping,
    "intensity_window": _intensity_window,
}
assert set(SPEC) == set(REQUIRED_KEYS) | set(OPTIONAL_KEYS)


# ----------------------------------------------------------------------------- entry points
def finalize_plan(plan: dict, source: str | Path = "plans.json") -> dict:
    """Recompute derived keys and validate every key; raise MedplanError naming ``source`` on
    the first problem."""
    if not isinstance(plan, dict):
        raise MedplanError("a plan must be a JSON object", source)
    for key in plan:
        if key not in SPEC:
            raise _unknown(str(key), SPEC, "", source)
    missing = [k for k in REQUIRED_KEYS if k not in plan]
    if missing:
        raise MedplanError(f"plan lacks key(s) {', '.join(missing)}", source)
    # the keys others depend on first, so their messages come before the dependants'
    for key in ("modality", "channels", "labels", "loss"):
        SPEC[key](plan[key], key, source, plan)

    plan["num_classes"] = len(plan["labels"])
    if plan["num_classes"] < 2:
        raise MedplanError("a segmentation plan needs at least 2 classes (background + one)", source)
    plan["task"] = "binary" if plan["num_classes"] == 2 else "multiclass"
    if plan["loss"] == "bce" and plan["num_classes"] != 2:
        raise MedplanError("'loss': bce needs a binary task (2 classes); use ce", source)
    plan["num_outputs"] = 1 if plan["loss"] == "bce" else plan["num_classes"]
    if (plan["modality"] == "rgb") != (plan["channels"] == 3):
        plan["channels"] = 3 if plan["modality"] == "rgb" else 1

    for key, value in list(plan.items()):
        plan[key] = SPEC[key](value, key, source, plan)

    split = plan["split"]
    if split["strategy"] == "group_kfold" and not split.get("group_column"):
        raise MedplanError("'split.group_column' must name the cases.csv column of the groups (patients) "
                           "when split.strategy is group_kfold", source)
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
                raise _unknown(part, spec, f"in '{'.'.join(parts[:i])}': " if i else "", f"{source} {dotted}")
            check = spec[part]
            spec = getattr(check, "spec", None)
        if check is not None:
            check(value, dotted, f"{source} {dotted}", None)
