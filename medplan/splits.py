"""Cross-validation splits: uniformly sized folds, patient-aware where patients are known.

The fold makers are scikit-learn's ``KFold(shuffle=True, random_state=seed)`` and
``GroupKFold()``, re-stated here in a few lines of numpy (tests/test_splits.py checks they give
the same folds as scikit-learn): importing scikit-learn cost ~1 CPU-s of every medplan_plan, and
a written-down rule keeps a seed's folds the same whatever scikit-learn version is installed.
``GroupKFold`` balances fold sizes greedily (largest group first into the lightest fold) but is
deterministic in the group labels, so the groups are relabelled by a seeded permutation first:
the seed then decides which patients share a fold.
"""
from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from medplan.errors import MedplanError
from medplan.names import RULE, is_valid_name

FOLD_KEYS = ("train", "val")


def kfold_val(n: int, n_folds: int, seed: int) -> list[np.ndarray]:
    """Validation indices of scikit-learn's ``KFold(n_folds, shuffle=True, random_state=seed)``."""
    indices = np.arange(n)
    np.random.RandomState(seed).shuffle(indices)
    sizes = np.full(n_folds, n // n_folds, dtype=int)
    sizes[: n % n_folds] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [indices[bounds[k]:bounds[k + 1]] for k in range(n_folds)]


def group_kfold_val(codes: np.ndarray, n_folds: int) -> list[np.ndarray]:
    """Validation indices of scikit-learn's ``GroupKFold(n_folds)`` (no shuffle): the largest
    group first, each into the fold holding the fewest cases so far."""
    _, group_idx = np.unique(codes, return_inverse=True)
    per_group = np.bincount(group_idx)
    order = np.argsort(per_group, kind="stable")[::-1]
    per_fold = np.zeros(n_folds)
    group_to_fold = np.zeros(len(per_group), dtype=int)
    for g in order:
        lightest = int(np.argmin(per_fold))
        per_fold[lightest] += per_group[g]
        group_to_fold[g] = lightest
    fold_of = group_to_fold[group_idx]
    return [np.flatnonzero(fold_of == f) for f in range(n_folds)]


def make_splits(case_ids: Sequence[str], groups: Sequence[str] | None, *, n_folds: int = 5,
                seed: int = 12345) -> list[dict[str, list[str]]]:
    """Folds as ``[{"train": [...], "val": [...]}, ...]``; every case in exactly one val list."""
    cases = np.asarray(sorted(case_ids))
    if len(set(cases.tolist())) != len(cases):
        raise MedplanError("case ids are not unique")
    if groups is not None:
        by_case = dict(zip(case_ids, groups))
        group_arr = np.asarray([by_case[c] for c in cases])
        unique = np.unique(group_arr)
        if len(unique) < n_folds:
            raise MedplanError(f"{len(unique)} groups cannot fill {n_folds} folds; lower split.n_folds")
        rng = np.random.default_rng(seed)
        code = dict(zip(unique.tolist(), rng.permutation(len(unique)).tolist()))
        codes = np.asarray([code[g] for g in group_arr])
        vals = group_kfold_val(codes, n_folds)
    else:
        if len(cases) < n_folds:
            raise MedplanError(f"{len(cases)} cases cannot fill {n_folds} folds; lower split.n_folds")
        vals = kfold_val(len(cases), n_folds, seed)
    folds = []
    for val in vals:
        is_val = np.zeros(len(cases), dtype=bool)
        is_val[val] = True
        folds.append({"train": cases[~is_val].tolist(), "val": cases[is_val].tolist()})  # sorted, as sklearn's
    return folds


def check_splits(splits: list[dict], case_ids: Sequence[str], groups: dict[str, str] | None = None) -> None:
    """Raise MedplanError unless every case is validated exactly once and no group spans two folds."""
    expected = set(case_ids)
    seen: list[str] = []
    for k, fold in enumerate(splits):
        if set(fold["train"]) & set(fold["val"]):
            raise MedplanError(f"splits.json: fold {k} has cases in both train and val")
        if set(fold["train"]) | set(fold["val"]) != expected:
            raise MedplanError(f"splits.json: fold {k} does not cover exactly the kept cases")
        seen.extend(fold["val"])
    if sorted(seen) != sorted(expected):
        raise MedplanError("splits.json: not every kept case is in exactly one validation fold")
    if groups:
        owner: dict[str, int] = {}
        for k, fold in enumerate(splits):
            for case in fold["val"]:
                g = groups[case]
                if owner.setdefault(g, k) != k:
                    raise MedplanError(f"splits.json: group {g!r} is in validation folds {owner[g]} and {k}")


def validate_splits(splits: object, kept: Sequence[str], groups: Mapping[str, str] | None = None, *,
                    n_folds: int | None = None, excluded: Sequence[str] = (),
                    source: str | Path = "splits.json") -> list[dict[str, list[str]]]:
    """Check a ``splits.json`` as it is read, before anything trains on it; return its folds.

    A list of ``{"train": [...], "val": [...]}`` with valid case ids (:mod:`medplan.names`), no
    id twice in a list, no id on both sides of a fold, only ``kept`` cases (cases.csv minus the
    plan's excluded cases), a non-empty train and val list per fold, no ``groups`` value on
    both sides of a fold (when the split is patient-aware) and ``n_folds`` folds. The first
    problem is a one-line MedplanError naming ``source``. Unlike :func:`check_splits` it does
    not ask every kept case to be validated once, so a hand-made split may leave cases out.
    """
    if not isinstance(splits, list) or not splits:
        raise MedplanError('expected a non-empty list of {"train": [...], "val": [...]}', source)
    kept_set, excluded_set = set(kept), set(excluded)
    for k, fold in enumerate(splits):
        if not isinstance(fold, dict):
            raise MedplanError(f'fold {k} is not an object {{"train": [...], "val": [...]}}', source)
        for key in fold:
            if key not in FOLD_KEYS:
                close = difflib.get_close_matches(str(key), FOLD_KEYS, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f" (a fold holds {' and '.join(FOLD_KEYS)})"
                raise MedplanError(f"fold {k} has unknown key {key!r}{hint}", source)
        seen: dict[str, str] = {}
        for side in FOLD_KEYS:
            ids = fold.get(side)
            if not isinstance(ids, list):
                raise MedplanError(f"fold {k} {side!r} must be a list of case ids, got {type(ids).__name__}", source)
            if not ids:
                raise MedplanError(f"fold {k} has an empty {side!r} list", source)
            for case in ids:
                if not is_valid_name(case):
                    shown = repr(case) if not isinstance(case, str) or len(case) <= 80 else repr(case[:80] + "...")
                    raise MedplanError(f"fold {k} {side!r}: invalid case id {shown}: must be {RULE}", source)
                if case in seen:
                    where = f"twice in fold {k} {side!r}" if seen[case] == side else f"in both train and val of fold {k}"
                    raise MedplanError(f"case {case!r} is {where}", source)
                seen[case] = side
                if case not in kept_set:
                    why = ("excluded by the plan (a duplicate, see duplicates.csv)" if case in excluded_set
                           else "not a case of cases.csv")
                    raise MedplanError(f"fold {k} {side!r}: case {case!r} is {why}", source)
        if groups:
            train_groups = {groups[c] for c in fold["train"] if c in groups}
            for case in fold["val"]:
                g = groups.get(case)
                if g is not None and g in train_groups:
                    raise MedplanError(f"fold {k}: group {g!r} (case {case!r}) is in both train and val; the plan's "
                                       "split is patient-aware", source)
    if n_folds is not None and len(splits) != n_folds:
        raise MedplanError(f"{len(splits)} fold(s), but the plan's split.n_folds is {n_folds}", source)
    return [{"train": list(f["train"]), "val": list(f["val"])} for f in splits]
