"""splits.json is checked on every read, before any folder is written (issue 11, item 3).

A colleague's or a tampered splits.json must never train silently: a case in train and val,
an empty val, a duplicate or unknown id, an excluded case, a patient on both sides of a fold
or a wrong number of folds is one line naming splits.json, before training starts.
"""
from __future__ import annotations

import json

import pytest

from medplan import pipeline
from medplan.cli.train import main as train_main
from medplan.errors import MedplanError
from medplan.splits import validate_splits
from medplan.trainers import base as trainer_base
from trainer_fixtures import make_dataset, use_roots

CASES = [f"case_{i:03d}" for i in range(12)]


@pytest.fixture
def toy(tmp_path, monkeypatch):
    use_roots(monkeypatch, tmp_path)
    make_dataset(tmp_path, epochs={"lr_search": 1, "cv": 1})
    # training must never start: a check that only fails after an epoch is a failure here
    def no_training(self, *args, **kwargs):
        raise AssertionError("training started on a bad splits.json")

    monkeypatch.setattr(trainer_base.Trainer, "run", no_training)
    return tmp_path


def _splits(root):
    return json.loads((root / "preprocessed" / "TOY" / "splits.json").read_text())


def _write_splits(root, splits):
    (root / "preprocessed" / "TOY" / "splits.json").write_text(json.dumps(splits))


def _edit_plan(root, **changes):
    path = root / "preprocessed" / "TOY" / "plans.json"
    plan = json.loads(path.read_text())
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(plan.get(key), dict):
            plan[key].update(value)
        else:
            plan[key] = value
    path.write_text(json.dumps(plan))


def _patient_aware(root):
    """Two cases per patient (p0: case_000, case_001; ...) and a group_kfold plan."""
    rows = "".join(f"{c},p{i // 2}\n" for i, c in enumerate(CASES))
    (root / "raw" / "TOY" / "cases.csv").write_text("case_id,group\n" + rows)
    _edit_plan(root, split={"strategy": "group_kfold", "group_column": "group"})
    patients = [[f"case_{2 * p:03d}", f"case_{2 * p + 1:03d}"] for p in range(6)]
    folds = [sum(patients[k::3], []) for k in range(3)]
    splits = [{"train": sorted(c for c in CASES if c not in folds[k]), "val": sorted(folds[k])} for k in range(3)]
    _write_splits(root, splits)
    return splits


def _refused(root, capsys, *fragments):
    capsys.readouterr()
    assert train_main(["TOY", "unet", "0", "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("medplan_train: error:") and "splits.json" in err, err
    for fragment in fragments:
        assert fragment in err, err
    assert not (root / "results" / "TOY").exists()  # no fold folder, nothing written


def tamper_overlap(splits):
    splits[0]["train"].append(splits[0]["val"][0])


def tamper_empty_val(splits):
    splits[0]["train"] += splits[0]["val"]
    splits[0]["val"] = []


def tamper_duplicate(splits):
    splits[0]["train"].append(splits[0]["train"][0])


def tamper_unknown(splits):
    splits[0]["val"].append("case_999")


def tamper_traversal(splits):
    splits[0]["val"].append("../../../../x")


def tamper_folds(splits):
    del splits[-1]


def tamper_not_a_list(splits):
    splits[0]["val"] = "case_000"


def tamper_key(splits):
    splits[0]["vals"] = splits[0].pop("val")


@pytest.mark.parametrize("tamper, fragments", [
    (tamper_overlap, ["both train and val"]),
    (tamper_empty_val, ["empty 'val'"]),
    (tamper_duplicate, ["twice"]),
    (tamper_unknown, ["case_999", "not a case of cases.csv"]),
    (tamper_traversal, ["invalid case id"]),
    (tamper_folds, ["2 fold(s)", "n_folds is 3"]),
    (tamper_not_a_list, ["must be a list"]),
    (tamper_key, ["did you mean 'val'"]),
])
def test_tampered_splits_are_refused_before_training(toy, capsys, tamper, fragments):
    splits = _splits(toy)
    tamper(splits)
    _write_splits(toy, splits)
    _refused(toy, capsys, *fragments)


def test_excluded_case_is_refused(toy, capsys):
    _edit_plan(toy, excluded_cases=["case_000"])  # a duplicate the plan dropped, still in the splits
    _refused(toy, capsys, "case_000", "excluded")


def test_a_patient_on_both_sides_of_a_fold_is_refused(toy, capsys):
    splits = _patient_aware(toy)
    assert len(pipeline.load_splits("TOY")) == 3  # the patient-aware split itself is fine
    moved = splits[0]["val"][0]  # case_000 of patient p0: its partner case_001 stays in val
    splits[0]["val"].remove(moved)
    splits[0]["train"].append(moved)
    _write_splits(toy, splits)
    _refused(toy, capsys, "group 'p0'", "both train and val")


def test_fold_all_needs_no_val_of_its_own(toy):
    splits = pipeline.load_splits("TOY")
    assert [len(f["val"]) for f in splits] == [4, 4, 4]
    from medplan.trainers import resolve_fold

    assert resolve_fold("all", splits) == "all"


@pytest.mark.parametrize("splits, message", [
    ({"train": [], "val": []}, "non-empty list"),
    ([], "non-empty list"),
    ([{"train": ["a"], "val": ["b"]}, 3], "fold 1 is not an object"),
    ([{"train": ["a", "b"], "val": ["a"]}], "both train and val"),
    ([{"train": ["a"], "val": ["b", "b"]}], "twice in fold 0 'val'"),
    ([{"train": ["a"], "val": [7]}], "invalid case id 7"),
    ([{"train": ["a"], "val": [".b"]}], "invalid case id '.b'"),
    ([{"train": ["a"], "val": ["c"]}], "excluded by the plan"),
    ([{"train": ["a"], "val": ["zz"]}], "not a case of cases.csv"),
])
def test_validate_splits_names_the_first_problem(splits, message):
    with pytest.raises(MedplanError, match="splits.json") as info:
        validate_splits(splits, ["a", "b"], excluded=["c"])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_validate_splits_accepts_a_hand_made_split_and_returns_plain_folds():
    folds = validate_splits([{"train": ["a", "b"], "val": ["c"]}, {"train": ["c"], "val": ["a"]}], ["a", "b", "c", "d"],
                            {"a": "p1", "b": "p2", "c": "p3", "d": "p4"}, n_folds=2)
    assert folds == [{"train": ["a", "b"], "val": ["c"]}, {"train": ["c"], "val": ["a"]}]
    with pytest.raises(MedplanError, match="group 'p1'"):
        validate_splits([{"train": ["a"], "val": ["b"]}], ["a", "b"], {"a": "p1", "b": "p1"})
