"""Cross-validation splits: uniformly sized folds, patient-aware where patients are known.

Uses scikit-learn's fold makers. ``GroupKFold`` balances fold sizes greedily (largest group
first into the smallest fold) but is deterministic in the group labels, so the groups are
relabelled by a seeded permutation first: the seed then decides which patients share a fold.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medplan.errors import MedplanError


def make_splits(case_ids: Sequence[str], groups: Sequence[str] | None, *, n_folds: int = 5,
                seed: int = 12345) -> list[dict[str, list[str]]]:
    """Folds as ``[{"train": [...], "val": [...]}, ...]``; every case in exactly one val list."""
    from sklearn.model_selection import GroupKFold, KFold  # imported here: 1.6 s, needed only when splitting

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
        folds = GroupKFold(n_splits=n_folds).split(cases, groups=codes)
    else:
        if len(cases) < n_folds:
            raise MedplanError(f"{len(cases)} cases cannot fill {n_folds} folds; lower split.n_folds")
        folds = KFold(n_splits=n_folds, shuffle=True, random_state=seed).split(cases)
    return [{"train": cases[tr].tolist(), "val": cases[va].tolist()} for tr, va in folds]


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
