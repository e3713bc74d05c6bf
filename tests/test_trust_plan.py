"""The plan's checks (medplan.plan) are complete and plan + splits are one step (issue 11, items 5 and 6).

Every key of plans.json is type- and range-checked when it is read, an unknown key is an
error with a "did you mean", ``--set lr=abc`` fails at medplan_plan time, and a failed split
never leaves a plan without splits (the loop preprocess -> train -> "run preprocess").
"""
from __future__ import annotations

import copy
import json

import pytest

from medplan import pipeline
from medplan.cli.convert import main as convert_main
from medplan.cli.plan import main as plan_main
from medplan.cli.preprocess import main as preprocess_main
from medplan.cli.train import main as train_main
from medplan.datasets import synthetic
from medplan.errors import MedplanError
from medplan.planners import get_planner
from medplan.planners.overrides import apply_overrides, parse_set_args
from medplan.plan import LR_SCHEDULES, SPEC, Plan
from medplan.trainers import base as trainer_base
from trainer_fixtures import make_dataset, use_roots


def _one_line(capsys, prog):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"{prog}: error:"), err
    return err


# ----------------------------------------------------------------------------- the schema
def checked(plan, source="plans.json"):
    """The plan's JSON read through :meth:`Plan.from_json` and written back."""
    return Plan.from_json(plan, source=source).to_json()


def default_plan(tmp_path, rgb=False, groups=True):
    fp = {"dataset": "X", "num_cases": 10, "num_kept": 10, "channels": 3 if rgb else 1,
          "intensity": {"mean": [50.0] * (3 if rgb else 1), "std": [20.0] * (3 if rgb else 1)},
          "groups": {"column": "group", "n_groups": 5, "max_cases_per_group": 2, "has_groups": groups},
          "duplicates": {"hash": "phash", "hash_size": 8, "threshold": 6, "n_dropped": 1, "dropped": ["c7"]}}
    ds = {"name": "X", "labels": {"background": 0, "fg": 1}, "modality": "dermoscopy" if rgb else None}
    plan = get_planner("default")(fp, ds, raw_dir=tmp_path)
    plan.update(dataset="X", planner="default")
    return plan


@pytest.mark.parametrize("rgb, groups", [(False, True), (True, False)])
def test_every_key_the_planner_and_pipeline_write_is_known(tmp_path, rgb, groups):
    plan = checked(apply_overrides(default_plan(tmp_path, rgb, groups), {"epochs.cv": 3}))
    assert set(plan) <= set(SPEC) and "overrides" in plan
    assert checked(json.loads(json.dumps(plan))) == plan  # a written plan reads back unchanged


def test_lr_schedules_match_the_trainer():
    from medplan.trainers.schedule import SCHEDULES

    assert set(LR_SCHEDULES) == set(SCHEDULES)


def _set(plan, dotted, value):
    plan = copy.deepcopy(plan)
    node = plan
    *parents, last = dotted.split(".")
    for p in parents:
        node = node[p]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return plan


DELETE = object()


@pytest.mark.parametrize("key, value, message", [
    ("normalization.mean", "abc", "'normalization.mean' must be"),
    ("normalization.mean", [1.0, 2.0], "one mean and one std per channel"),
    ("normalization.std", [0.0], "'normalization.std' must be"),
    ("normalization.std", ["20"], "'normalization.std' must be"),
    ("normalization.scheme", "robust", "'normalization.scheme' must be one of zscore, minmax"),
    ("normalization.mean", DELETE, "lacks key 'mean'"),
    ("normalization", "zscore", "'normalization' must be an object"),
    ("optimizer.weight_decay", "0.01", "'optimizer.weight_decay' must be a number >= 0"),
    ("optimizer.weight_decay", -1, "'optimizer.weight_decay' must be a number >= 0"),
    ("optimizer.name", "SGD", "'optimizer.name' must be one of AdamW, Adam"),
    ("optimizer.betas", [0.9, 1.0], "'optimizer.betas' must be two numbers in [0, 1)"),
    ("optimizer.betas", 0.9, "'optimizer.betas' must be two numbers"),
    ("early_stopping.patience", "30", "'early_stopping.patience' must be an integer >= 1 or null"),
    ("early_stopping.patience", 0, "'early_stopping.patience'"),
    ("early_stopping.patience", 2.5, "'early_stopping.patience'"),
    ("early_stopping.min_delta", -0.1, "'early_stopping.min_delta'"),
    ("early_stopping.mode", "up", "'early_stopping.mode'"),
    ("early_stopping.monitor", "val_acc", "'early_stopping.monitor'"),
    ("augmentation.p_rotation", 1.5, "'augmentation.p_rotation' must be a number in [0, 1]"),
    ("augmentation.hflip", "yes", "'augmentation.hflip' must be true or false"),
    ("augmentation.scale", [1.2, 0.8], "'augmentation.scale' must be [low, high]"),
    ("augmentation.gamma", [0.8], "'augmentation.gamma'"),
    ("augmentation.hue", 0.7, "'augmentation.hue'"),
    ("lr", "abc", "'lr' must be a positive number, got 'abc'"),
    ("lr", 0, "'lr' must be a positive number"),
    ("lr", True, "'lr' must be a positive number"),
    ("lr_grid", [1e-4, "x"], "'lr_grid'"),
    ("lr_schedule.name", "cosine", "'lr_schedule.name'"),
    ("epochs.cv", 0, "'epochs.cv'"),
    ("epochs.cv", True, "'epochs.cv'"),
    ("batch_size", "8", "'batch_size'"),
    ("split.seed", "x", "'split.seed'"),
    ("split.seed", -1, "'split.seed'"),
    ("split.strategy", "random", "'split.strategy'"),
    ("split.group_column", None, "'split.group_column' must name"),
    ("split.n_folds", 1, "'split.n_folds'"),
    ("channels", 2, "'channels'"),
    ("excluded_cases", ["../x"], "invalid case id"),
    ("excluded_cases", ["a", "a"], "appears twice"),
    ("excluded_cases", "a", "'excluded_cases'"),
    ("dataset", "../x", "invalid dataset name"),
    ("reasons", {"lr": 3}, "'reasons'"),
    ("num_kept", -1, "'num_kept'"),
    ("duplicates.threshold", "6", "'duplicates.threshold'"),
])
def test_wrong_types_and_ranges_are_one_line_errors(tmp_path, key, value, message):
    plan = checked(default_plan(tmp_path))
    with pytest.raises(MedplanError) as info:
        checked(_set(plan, key, value), source="plans.json")
    text = str(info.value)
    assert message in text and text.startswith("plans.json: ") and "\n" not in text, text


@pytest.mark.parametrize("key, close", [
    ("batchsize", "batch_size"),
    ("optimizer.weigth_decay", "weight_decay"),
    ("augmentation.hflp", "hflip"),
    ("early_stopping.patiense", "patience"),
    ("split.nfolds", "n_folds"),
])
def test_unknown_keys_are_errors_with_a_suggestion(tmp_path, key, close):
    plan = checked(default_plan(tmp_path))
    with pytest.raises(MedplanError, match=f"unknown key .*did you mean '{close}'"):
        checked(_set(plan, key, 1))


# ----------------------------------------------------------------------------- at load and at --set
@pytest.fixture
def toy(tmp_path, monkeypatch):
    use_roots(monkeypatch, tmp_path)
    make_dataset(tmp_path, epochs={"lr_search": 1, "cv": 1})

    def no_training(self, *args, **kwargs):
        raise AssertionError("training started on a bad plan")

    monkeypatch.setattr(trainer_base.Trainer, "run", no_training)
    return tmp_path


@pytest.mark.parametrize("key, value, message", [
    ("normalization.std", "high", "normalization.std"),
    ("optimizer.weight_decay", "0.01", "optimizer.weight_decay"),
    ("early_stopping.patience", "30", "early_stopping.patience"),
    ("batchsize", 8, "did you mean 'batch_size'?"),
])
def test_a_bad_plans_json_fails_at_load_before_any_epoch(toy, capsys, key, value, message):
    path = toy / "preprocessed" / "TOY" / "plans.json"
    path.write_text(json.dumps(_set(json.loads(path.read_text()), key, value)))
    with pytest.raises(MedplanError, match="plans.json"):
        pipeline.load_plan("TOY")
    assert train_main(["TOY", "unet", "0", "--device", "cpu", "--no-progress"]) == 2
    err = _one_line(capsys, "medplan_train")
    assert message in err and "plans.json" in err
    assert not (toy / "results" / "TOY").exists()


@pytest.fixture
def camus(medplan_env):
    src = synthetic.write_camus(medplan_env / "downloads", n_patients=7, size=(72, 56), seed=3)
    assert convert_main(["camus", str(src), "-d", "CAMUS", "--no-progress"]) == 0
    return medplan_env


@pytest.mark.parametrize("item, message", [
    ("lr=abc", "'lr' must be a positive number, got 'abc'"),
    ("batchsize=4", "did you mean 'batch_size'?"),
    ("optimizer.weight_decay=x", "'optimizer.weight_decay' must be a number >= 0"),
    ("input_size=abc", "input_size"),
])
def test_a_bad_set_fails_at_plan_time_before_any_work(camus, capsys, item, message):
    capsys.readouterr()
    assert plan_main(["-d", "CAMUS", "--set", item, "--no-progress"]) == 2
    err = _one_line(capsys, "medplan_plan")
    assert message in err and "--set" in err, err
    pre = camus / "preprocessed" / "CAMUS"
    assert not (pre / "fingerprint.json").exists() and not (pre / "plans.json").exists()  # not even a fingerprint pass


def test_a_set_the_schema_only_catches_with_the_whole_plan_is_still_refused_before_writing(camus, capsys):
    capsys.readouterr()
    assert plan_main(["-d", "CAMUS", "--set", "normalization.mean=[1,2,3]", "--no-progress"]) == 2
    err = _one_line(capsys, "medplan_plan")
    assert "per channel" in err and "--set normalization.mean" in err
    assert not (camus / "preprocessed" / "CAMUS" / "plans.json").exists()


# ----------------------------------------------------------------------------- plan + splits, one step
def test_a_failed_split_leaves_no_plan_and_preprocess_does_not_loop(medplan_env, capsys):
    src = synthetic.write_camus(medplan_env / "downloads", n_patients=2, size=(72, 56), seed=3)
    assert convert_main(["camus", str(src), "-d", "TINY", "--no-progress"]) == 0
    pre = medplan_env / "preprocessed" / "TINY"
    capsys.readouterr()
    assert plan_main(["-d", "TINY", "--set", "input_size=[32,32]", "--no-progress"]) == 2
    err = _one_line(capsys, "medplan_plan")
    assert "cannot fill 5 folds" in err and "split.n_folds" in err
    assert not (pre / "plans.json").exists() and not (pre / "splits.json").exists()
    # preprocess plans, fails the same way (non-zero, one line) instead of returning 0 without splits
    assert preprocess_main(["-d", "TINY", "--set", "input_size=[32,32]", "--no-progress"]) == 2
    assert "cannot fill 5 folds" in _one_line(capsys, "medplan_preprocess")
    assert not (pre / "plans.json").exists()
    # and the advice works
    assert plan_main(["-d", "TINY", "--set", "input_size=[32,32]", "--set", "split.n_folds=2", "--no-progress"]) == 0
    assert len(json.loads((pre / "splits.json").read_text())) == 2


def test_a_failed_replan_keeps_the_earlier_plan_and_splits(camus, capsys):
    pre = camus / "preprocessed" / "CAMUS"
    assert plan_main(["-d", "CAMUS", "--set", "input_size=[32,32]", "--no-progress"]) == 0
    before = {n: (pre / n).read_bytes() for n in ("plans.json", "splits.json", "splits_settings.json")}
    capsys.readouterr()
    assert plan_main(["-d", "CAMUS", "--set", "input_size=[32,32]", "--set", "split.n_folds=50",
                      "--no-progress"]) == 2
    assert "cannot fill 50 folds" in _one_line(capsys, "medplan_plan")
    assert {n: (pre / n).read_bytes() for n in before} == before
    assert not (pre / "plans.previous.json").exists()


def test_plan_writes_the_splits_before_the_plan(camus, monkeypatch):
    """Killed between the two writes, a new plan never stands without its splits."""
    import medplan.pipeline as pl

    order = []
    real = pl.atomic_write_json
    monkeypatch.setattr(pl, "atomic_write_json", lambda path, obj: (order.append(path.name), real(path, obj)))
    pipeline.plan("CAMUS", overrides={"input_size": [32, 32]}, progress=False)
    assert order.index("splits.json") < order.index("plans.json")


def test_preprocess_repairs_a_missing_splits_json(camus, capsys):
    pre = camus / "preprocessed" / "CAMUS"
    assert plan_main(["-d", "CAMUS", "--set", "input_size=[32,32]", "--no-progress"]) == 0
    splits = (pre / "splits.json").read_bytes()
    (pre / "splits.json").unlink()  # a plan without splits: a killed earlier version, or a user
    capsys.readouterr()
    assert preprocess_main(["-d", "CAMUS", "--no-progress"]) == 0
    assert "splits.json was missing" in capsys.readouterr().out
    assert (pre / "splits.json").read_bytes() == splits  # the same seed and cases: the same folds
    assert len(pipeline.load_splits("CAMUS")) == 5


def test_preprocess_refuses_a_bad_splits_json_and_says_what_to_run(camus, capsys):
    pre = camus / "preprocessed" / "CAMUS"
    assert plan_main(["-d", "CAMUS", "--set", "input_size=[32,32]", "--no-progress"]) == 0
    splits = json.loads((pre / "splits.json").read_text())
    splits[0]["train"].append(splits[0]["val"][0])
    (pre / "splits.json").write_text(json.dumps(splits))
    capsys.readouterr()
    assert preprocess_main(["-d", "CAMUS", "--no-progress"]) == 2
    err = _one_line(capsys, "medplan_preprocess")
    assert "splits.json" in err and "both train and val" in err
    assert "medplan_plan -d CAMUS --set input_size=[32,32]" in err  # the user's --set kept
    # running it repairs the splits
    assert plan_main(["-d", "CAMUS", "--set", "input_size=[32,32]", "--no-progress"]) == 0
    assert len(pipeline.load_splits("CAMUS")) == 5
