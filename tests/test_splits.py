"""Split properties: uniform folds, no group in two folds, every case validated once."""
import numpy as np
import pytest

from medplan.errors import MedplanError
from medplan.splits import check_splits, group_kfold_val, make_splits


def camus_like(n_patients=23, dropped=("p3_b",)):
    cases, groups = [], []
    for p in range(n_patients):
        for v in "abcd":
            cid = f"p{p}_{v}"
            if cid not in dropped:
                cases.append(cid)
                groups.append(f"p{p}")
    return cases, groups


def test_group_splits_keep_patients_together_and_are_uniform():
    cases, groups = camus_like()
    splits = make_splits(cases, groups, n_folds=5, seed=1)
    check_splits(splits, cases, dict(zip(cases, groups)))
    sizes = [len(f["val"]) for f in splits]
    assert max(sizes) - min(sizes) <= 4  # at most one patient apart
    assert "p3_b" not in sum((f["train"] + f["val"] for f in splits), [])
    for f in splits:
        val_groups = {c.split("_")[0] for c in f["val"]}
        train_groups = {c.split("_")[0] for c in f["train"]}
        assert not val_groups & train_groups


def test_random_splits_are_uniform_and_seeded():
    cases = [f"c{i:03d}" for i in range(103)]
    a = make_splits(cases, None, n_folds=5, seed=7)
    b = make_splits(cases, None, n_folds=5, seed=7)
    c = make_splits(cases, None, n_folds=5, seed=8)
    check_splits(a, cases)
    assert a == b and a != c
    assert sorted(len(f["val"]) for f in a) == [20, 20, 21, 21, 21]


def test_group_seed_changes_assignment():
    cases, groups = camus_like()
    a = make_splits(cases, groups, seed=1)
    b = make_splits(cases, groups, seed=2)
    assert a != b


def test_check_splits_catches_violations():
    cases, groups = camus_like(10, ())
    gmap = dict(zip(cases, groups))
    splits = make_splits(cases, groups, n_folds=5)
    bad = [dict(f) for f in splits]
    moved = bad[0]["val"][0]
    bad[0] = {"train": bad[0]["train"] + [moved], "val": bad[0]["val"][1:]}
    bad[1] = {"train": [c for c in bad[1]["train"] if c != moved], "val": bad[1]["val"] + [moved]}
    with pytest.raises(MedplanError, match="group"):
        check_splits(bad, cases, gmap)
    with pytest.raises(MedplanError):
        check_splits(splits, cases[:-1])


def test_too_few_groups_is_an_error():
    with pytest.raises(MedplanError, match="groups cannot fill"):
        make_splits(["a", "b", "c"], ["g", "g", "h"], n_folds=5)


@pytest.mark.parametrize("n,k,seed", [(5, 5, 0), (17, 5, 12345), (96, 3, 7), (250, 10, 1)])
def test_fold_makers_equal_scikit_learn(n, k, seed):
    model_selection = pytest.importorskip("sklearn.model_selection")
    ids = [f"case{i:04d}" for i in range(n)]
    ours = make_splits(ids, None, n_folds=k, seed=seed)
    theirs = model_selection.KFold(n_splits=k, shuffle=True, random_state=seed).split(ids)
    assert [(f["train"], f["val"]) for f in ours] == [([ids[i] for i in tr], [ids[i] for i in va])
                                                      for tr, va in theirs]
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, max(k, n // 3), size=n)
    codes[:k] = np.arange(k)  # at least k groups
    theirs = [va.tolist() for _, va in model_selection.GroupKFold(n_splits=k).split(ids, groups=codes)]
    assert [v.tolist() for v in group_kfold_val(codes, k)] == theirs
