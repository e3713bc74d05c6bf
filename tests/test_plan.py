"""The typed plan (medplan.plan): JSON in, the same JSON out, frozen, derived values computed,
and one augmentation table that validation, the planner and the augmenter all follow."""
from __future__ import annotations

import copy
import dataclasses
import json
import pickle

import pytest
import torch

from medplan.data import build_augmentation
from medplan.errors import MedplanError
from medplan.plan import (AUGMENTATION_OFF, DERIVED_KEYS, JSON_ORDER, SPEC, Augmentation, Plan, check_overrides,
                          make_plan)
from medplan.planners import get_planner
from medplan.planners.default import choose_augmentation
from medplan.planners.overrides import apply_overrides

FINGERPRINT = {
    "dataset": "X", "num_cases": 10, "num_kept": 9, "channels": 1, "border_black_fraction": 0.7,
    "sizes": {"median": [60, 80], "min": [50, 70], "max": [70, 90]},
    "intensity": {"mean": [50.0], "std": [20.0]}, "labels": {"pixel_share": {"background": 0.9, "LV": 0.1}},
    "groups": {"column": "group", "n_groups": 5, "max_cases_per_group": 2, "has_groups": True},
    "duplicates": {"hash": "phash", "hash_size": 8, "threshold": 6, "n_dropped": 1, "dropped": ["c7"]},
}


def default_plan_json(tmp_path) -> dict:
    """What medplan_plan writes: the default planner's plan with the pipeline's keys."""
    ds = {"name": "X", "labels": {"background": 0, "LV": 1, "LA": 2}, "modality": "echocardiography"}
    data = get_planner("default")(FINGERPRINT, ds, raw_dir=tmp_path)
    data.update(dataset="X", planner="default")
    return data


# ----------------------------------------------------------------------------- JSON round trip
def test_default_planner_plan_round_trips_to_identical_json(tmp_path):
    data = default_plan_json(tmp_path)
    text = json.dumps(data, indent=2)
    plan = Plan.from_json(json.loads(text))
    assert json.dumps(plan.to_json(), indent=2) == text  # same keys, same order, same values
    again = Plan.from_json(plan.to_json())
    assert again == plan and json.dumps(again.to_json(), indent=2) == text
    before = copy.deepcopy(data)
    Plan.from_json(data)
    assert data == before  # from_json changes nothing it is given


def test_a_hand_edited_plan_keeps_its_key_order_and_absent_optional_keys(tmp_path):
    data = default_plan_json(tmp_path)
    for key in ("duplicates", "num_cases", "intensity_window", "image_modality"):
        del data[key]
    del data["optimizer"]["betas"], data["early_stopping"]["patience"], data["augmentation"]["p_blur"]
    data = {"raw_dir": data.pop("raw_dir"), **data}
    plan = Plan.from_json(data)
    assert list(plan.to_json()) == list(data) and plan.to_json() == data
    # absent keys read as their defaults: the value used when the key is missing
    assert plan.optimizer.betas == (0.9, 0.999) and plan.early_stopping.patience is None
    assert plan.augmentation.p_blur == 0.0 and plan.duplicates is None and plan.num_cases is None


def test_overrides_edit_the_json_and_are_checked_by_from_json(tmp_path):
    plan = Plan.from_json(default_plan_json(tmp_path))
    sets = {"input_size": [64, 48], "augmentation.hflip": True, "epochs.cv": 5}
    check_overrides(sets)
    new = Plan.from_json(apply_overrides(plan.to_json(), sets))
    assert new.input_size == (64, 48) and new.augmentation.hflip and new.epochs.cv == 5
    assert new.to_json()["overrides"] == sets and "--set" in new.reason("epochs.cv")
    with pytest.raises(MedplanError, match=r"--set augmentation\.hflp: unknown key in 'augmentation': 'hflp'; "
                                           "did you mean 'hflip'"):
        check_overrides({"augmentation.hflp": True})
    with pytest.raises(MedplanError, match="'epochs.cv' must be an integer >= 1"):
        Plan.from_json(apply_overrides(plan.to_json(), {"epochs.cv": 0}))


# ----------------------------------------------------------------------------- frozen, derived, reasons
def test_a_plan_is_frozen(tmp_path):
    plan = Plan.from_json(default_plan_json(tmp_path))
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.lr = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.augmentation.hflip = True  # type: ignore[misc]
    with pytest.raises(TypeError):
        plan.labels["new"] = 3  # type: ignore[index]
    with pytest.raises(TypeError):
        plan.reasons.update(lr="mine")  # type: ignore[attr-defined]
    assert isinstance(plan.input_size, tuple) and isinstance(plan.lr_grid, tuple)
    # a changed plan is a new, checked one
    assert plan.updated(lr=1e-3).lr == 1e-3 and plan.lr == 1e-4
    with pytest.raises(MedplanError, match="'lr' must be a positive number"):
        plan.updated(lr=-1)
    # pickles (loader workers) and copies as plain data
    assert pickle.loads(pickle.dumps(plan)) == plan and copy.deepcopy(plan) == plan


@pytest.mark.parametrize("labels, loss, expect", [
    ({"background": 0, "fg": 1}, "bce", (2, "binary", 1)),
    ({"background": 0, "fg": 1}, "ce", (2, "binary", 2)),
    ({"background": 0, "a": 1, "b": 2, "c": 3}, "ce", (4, "multiclass", 4)),
])
def test_derived_values_are_computed_and_written_not_read(labels, loss, expect):
    data = make_plan(labels=labels, loss=loss).to_json()
    data.update(num_classes=99, task="nonsense", num_outputs=-1)  # stale values in the file
    plan = Plan.from_json(data)
    assert (plan.num_classes, plan.task, plan.num_outputs) == expect
    assert tuple(plan.to_json()[k] for k in DERIVED_KEYS) == expect
    assert plan.class_names == sorted(labels, key=labels.get)
    no_derived = {k: v for k, v in data.items() if k not in DERIVED_KEYS}
    assert Plan.from_json(no_derived).to_json() == plan.to_json()  # written back where they belong


def test_reasons_stay_beside_each_decision(tmp_path):
    plan = Plan.from_json(default_plan_json(tmp_path))
    for key in ("modality", "labels", "loss", "split", "normalization", "augmentation", "early_stopping"):
        assert plan.reason(key), key
    assert "canonical orientation" in plan.reason("augmentation") and plan.reason("nope") is None


def test_every_top_level_key_has_a_check_and_a_place():
    assert set(SPEC) == set(JSON_ORDER)
    assert set(make_plan().to_json()) <= set(SPEC)
    with pytest.raises(MedplanError, match="unknown key 'batchsize'; did you mean 'batch_size'"):
        Plan.from_json({**make_plan().to_json(), "batchsize": 8})


# ----------------------------------------------------------------------------- one augmentation table
#: a value that switches each key on (with its probability at 1): the augmenter must react to each
ON = {
    "rotation_deg": 30.0, "p_rotation": 1.0, "scale": [0.7, 1.3], "p_scale": 1.0,
    "hflip": True, "vflip": True, "rot90": True,
    "brightness": 0.3, "contrast": 0.3, "p_intensity": 1.0,
    "saturation": 0.5, "hue": 0.1, "p_color": 1.0,
    "gamma": [0.6, 1.6], "p_gamma": 1.0, "noise_std": 0.05, "p_noise": 1.0,
    "blur_sigma": [1.5, 2.0], "p_blur": 1.0,
}


def test_the_augmentation_table_is_the_one_list_of_keys():
    keys = [f.name for f in Augmentation.table()]
    assert ["backend", *ON] == keys == list(AUGMENTATION_OFF) == list(Augmentation.off_json())
    assert set(SPEC["augmentation"].spec) == set(keys)  # validation
    aug, _ = choose_augmentation("ultrasound", rgb=True)
    assert list(aug) == keys  # the planner starts from the table's off values
    assert all(f.metadata["doc"] for f in Augmentation.table())


@pytest.mark.parametrize("key", list(ON))
def test_every_augmentation_key_has_a_check_and_an_off_value(key):
    off, on = AUGMENTATION_OFF[key], ON[key]
    assert Augmentation.from_json({key: off}) == Augmentation()  # the off value is the default
    assert getattr(Augmentation.from_json({key: on}), key) == (tuple(on) if isinstance(on, list) else on)
    with pytest.raises(MedplanError, match=f"'augmentation.{key}' must be"):
        Augmentation.from_json({key: "x"})


@pytest.mark.parametrize("key", list(ON))
def test_every_augmentation_key_is_consumed_by_the_augmenter(key):
    """With everything on, switching one key off changes what the augmenter does (same draws)."""
    x = torch.rand(8, 3, 24, 24, generator=torch.Generator().manual_seed(1)) * 255
    seg = torch.randint(0, 3, (8, 24, 24), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    everything = build_augmentation(Augmentation.from_json(ON))
    without = build_augmentation(Augmentation.from_json({**ON, key: AUGMENTATION_OFF[key]}))
    a, _ = everything(x, seg, torch.Generator().manual_seed(3))
    b, _ = without(x, seg, torch.Generator().manual_seed(3))
    assert not torch.equal(a, b), key
    assert torch.equal(build_augmentation(Augmentation())(x, seg, torch.Generator())[0], x)  # all off: identity
