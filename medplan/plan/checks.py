"""The value checks of a plan's keys: each ``(value, key, source, plan) -> value`` raises a
one-line :class:`~medplan.errors.MedplanError` naming ``source`` (the file, or ``--set KEY``)."""
from __future__ import annotations

import difflib
import math
from typing import Any, Callable

from medplan.errors import MedplanError
from medplan.names import RULE, check_name, is_valid_name

Check = Callable[[Any, str, Any, "dict | None"], Any]  # (value, key, source, plan JSON or None) -> value


# ----------------------------------------------------------------------------- value checks
def shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def fail(key: str, what: str, value: Any, source: Any) -> MedplanError:
    return MedplanError(f"'{key}' must be {what}, got {shown(value)}", source)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_int(value: Any) -> bool:
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
        if not is_number(value) or value < lo or value > hi or (lo_open and value == lo) or (hi_open and value == hi):
            raise fail(key, what, value, source)
        return value

    return check


def integer(lo: int = 0, hi: int | None = None, *, optional: bool = False) -> Check:
    what = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
    what += " or null" if optional else ""

    def check(value: Any, key: str, source: Any, plan: dict | None) -> Any:
        if optional and value is None:
            return value
        if not is_int(value) or value < lo or (hi is not None and value > hi):
            raise fail(key, what, value, source)
        return value

    return check


def choice(options: tuple[str, ...], *, case_insensitive: bool = False, suggest: bool = False) -> Check:
    """One of ``options``; ``suggest``: a near miss gets a "did you mean" (like unknown keys)."""
    def check(value: Any, key: str, source: Any, plan: dict | None) -> Any:
        ok = isinstance(value, str) and (value.lower() in {o.lower() for o in options} if case_insensitive
                                         else value in options)
        if not ok:
            lowered = {o.lower(): o for o in options}
            close = difflib.get_close_matches(value.lower(), list(lowered), n=1, cutoff=0.6) \
                if suggest and isinstance(value, str) else []
            hint = f"; did you mean {lowered[close[0]]!r}?" if close else ""
            raise MedplanError(f"'{key}' must be one of {', '.join(options)}, got {shown(value)}{hint}", source)
        return value

    return check


def text(*, optional: bool = False) -> Check:
    def check(value: Any, key: str, source: Any, plan: dict | None) -> Any:
        if not (isinstance(value, str) or (optional and value is None)):
            raise fail(key, "a string" + (" or null" if optional else ""), value, source)
        return value

    return check


def flag(value: Any, key: str, source: Any, plan: dict | None) -> Any:
    if not isinstance(value, bool):
        raise fail(key, "true or false", value, source)
    return value


def span(lo: float, hi: float = math.inf) -> Check:
    """``[low, high]`` with ``lo < low <= high <= hi``."""
    what = f"[low, high] with {lo:g} < low <= high" + ("" if hi == math.inf else f" < {hi:g}")

    def check(value: Any, key: str, source: Any, plan: dict | None) -> Any:
        if (not isinstance(value, list) or len(value) != 2 or not all(is_number(v) for v in value)
                or not lo < value[0] <= value[1] or value[1] >= hi):
            raise fail(key, what, value, source)
        return value

    return check


def pair(lo: float, hi: float) -> Check:
    """Two numbers, each in [lo, hi) (Adam's betas)."""
    def check(value: Any, key: str, source: Any, plan: dict | None) -> Any:
        if not isinstance(value, list) or len(value) != 2 or not all(is_number(v) and lo <= v < hi for v in value):
            raise fail(key, f"two numbers in [{lo:g}, {hi:g})", value, source)
        return value

    return check


def numbers(check_one: Check, what: str, *, non_empty: bool = True) -> Check:
    def check(value: Any, key: str, source: Any, plan: dict | None) -> Any:
        if not isinstance(value, list) or (non_empty and not value):
            raise fail(key, f"a {'non-empty ' if non_empty else ''}list of {what}", value, source)
        for i, v in enumerate(value):
            try:
                check_one(v, f"{key}[{i}]", source, plan)
            except MedplanError:
                raise fail(key, f"a list of {what}", value, source) from None
        return value

    return check


def anything(value: Any, key: str, source: Any, plan: dict | None) -> Any:
    return value


def mapping(value: Any, key: str, source: Any, plan: dict | None) -> Any:
    if not isinstance(value, dict):
        raise fail(key, "an object", value, source)
    return value


def unknown_key(key: str, known: Any, where: str, source: Any) -> MedplanError:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(known)})"
    return MedplanError(f"unknown key {where}{key!r}{hint}", source)


# ----------------------------------------------------------------------------- top-level keys
def check_labels(value: Any, key: str, source: Any, plan: dict | None) -> Any:
    if (not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value)
            or not all(is_int(v) for v in value.values()) or sorted(value.values()) != list(range(len(value)))):
        raise MedplanError("'labels' must map names to contiguous indices 0..K-1", source)
    return value


def check_channels(value: Any, key: str, source: Any, plan: dict | None) -> Any:
    if not is_int(value) or value not in (1, 3):
        raise MedplanError(f"'channels' must be 1 (gray) or 3 (rgb), got {shown(value)}", source)
    return value


def check_input_size(value: Any, key: str, source: Any, plan: dict | None) -> Any:
    size = [value, value] if is_int(value) else value
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(is_int(s) and s >= 8 for s in size)):
        raise MedplanError(f"'input_size' must be [height, width] of integers >= 8, got {shown(value)}", source)
    return list(size)


def check_dataset(value: Any, key: str, source: Any, plan: dict | None) -> Any:
    return check_name(value, "dataset name", source)


def check_case_ids(value: Any, key: str, source: Any, plan: dict | None) -> Any:
    if not isinstance(value, list):
        raise fail(key, "a list of case ids", value, source)
    seen = set()
    for case in value:
        if not is_valid_name(case):
            raise MedplanError(f"'{key}': invalid case id {shown(case)}: must be {RULE}", source)
        if case in seen:
            raise MedplanError(f"'{key}': case id {case!r} appears twice", source)
        seen.add(case)
    return value


def check_reasons(value: Any, key: str, source: Any, plan: dict | None) -> Any:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise fail(key, "an object of strings (decision -> reason)", value, source)
    return value
