"""The default planner: protocol constants, data-driven choices, overrides, validation."""
import pytest

from medplan.errors import MedplanError
from medplan.planners import get_planner, list_planners
from medplan.planners.explain import explain_plan
from medplan.planners.overrides import apply_overrides, parse_set_args
from medplan.plan import REQUIRED_KEYS, Plan


def fingerprint(channels=1, rgb_is_gray=False, cone=0.0, groups=True, mean=(60.0,), std=(40.0,)):
    return {
        "dataset": "X", "num_cases": 40, "num_kept": 38, "channels": channels, "rgb_is_gray": rgb_is_gray,
        "sizes": {"median": [560, 640], "min": [500, 600], "max": [600, 700], "n_unique": 3},
        "intensity": {"mean": list(mean), "std": list(std)},
        "labels": {"pixel_share": {"background": 0.8, "fg": 0.2}},
        "groups": {"column": "group", "n_groups": 10 if groups else 40, "max_cases_per_group": 4 if groups else 1,
                   "has_groups": groups},
        "border_black_fraction": cone,
        "duplicates": {"hash": "phash", "hash_size": 8, "threshold": 6, "n_dropped": 2, "dropped": ["b", "a"]},
    }


def make(fp, labels, modality=None, tmp_path="."):
    ds = {"name": "X", "labels": labels, "modality": modality}
    return Plan.from_json(get_planner("default")(fp, ds, raw_dir=tmp_path))


ECHO_LABELS = {"background": 0, "LV": 1, "LV wall": 2, "LA": 3}


def test_plan_has_public_keys_and_protocol_values(tmp_path):
    plan = make(fingerprint(cone=0.7), ECHO_LABELS, "echocardiography", tmp_path)
    assert set(REQUIRED_KEYS) <= set(plan.to_json())
    assert plan.input_size == (512, 512) and plan.batch_size == 8
    assert plan.lr_grid == (1e-4, 5e-5, 1e-5)
    assert (plan.epochs.lr_search, plan.epochs.cv) == (100, 150)
    assert plan.optimizer.name == "AdamW" and plan.lr_schedule.name == "rex"
    assert plan.early_stopping.monitor == "val_mIoU"
    assert plan.excluded_cases == ("a", "b")
    assert set(plan.reasons) >= {"modality", "loss", "split", "augmentation", "normalization"}


def test_echo_binary_rgb_and_three_class_rgb_plans_differ_where_they_should(tmp_path):
    echo = make(fingerprint(cone=0.7), ECHO_LABELS, None, tmp_path)  # cone evidence, no hint
    skin = make(fingerprint(channels=3, groups=False, mean=(180, 120, 100), std=(30, 30, 30)),
                {"background": 0, "lesion": 1}, "dermoscopy", tmp_path)
    polyp = make(fingerprint(channels=3, groups=False, mean=(150, 80, 60), std=(50, 40, 40)),
                 {"background": 0, "non-neoplastic": 1, "neoplastic": 2}, "endoscopy", tmp_path)

    assert echo.image_modality == "ultrasound" and "sector" in echo.reason("image_modality")
    assert (echo.modality, echo.channels) == ("gray", 1)
    assert (skin.modality, skin.channels) == ("rgb", 3)
    # loss and outputs follow the task
    assert (echo.task, echo.loss, echo.num_outputs) == ("multiclass", "ce", 4)
    assert (skin.task, skin.loss, skin.num_outputs) == ("binary", "bce", 1)
    assert (polyp.task, polyp.loss, polyp.num_outputs) == ("multiclass", "ce", 3)
    # patients only where groups exist
    assert echo.split.strategy == "group_kfold"
    assert skin.split.strategy == polyp.split.strategy == "kfold"
    # an echo cone is never flipped or turned; dermoscopy / endoscopy are
    ea, sa = echo.augmentation, skin.augmentation
    assert not (ea.hflip or ea.vflip or ea.rot90) and ea.rotation_deg <= 15
    assert sa.hflip and sa.vflip and sa.rot90 and sa.rotation_deg == 180
    # colour jitter only on colour images
    assert ea.p_color == 0 and sa.p_color > 0 and polyp.augmentation.p_color > 0
    assert len(echo.normalization.mean) == 1 and len(skin.normalization.mean) == 3


def test_rgb_stored_gray_is_planned_as_gray(tmp_path):
    plan = make(fingerprint(channels=3, rgb_is_gray=True), {"background": 0, "x": 1}, None, tmp_path)
    assert plan.channels == 1 and plan.augmentation.p_color == 0
    assert "R = G = B" in plan.reason("modality")


def test_overrides_apply_record_and_rederive(tmp_path):
    plan = make(fingerprint(channels=3, groups=False, mean=(1, 2, 3), std=(1, 1, 1)), {"background": 0, "x": 1},
                "dermoscopy", tmp_path)
    sets = parse_set_args(["input_size=[256,256]", "augmentation.vflip=false", "loss=ce", "epochs.cv=7"])
    new = Plan.from_json(apply_overrides(plan.to_json(), sets))
    assert new.input_size == (256, 256) and new.augmentation.vflip is False
    assert new.loss == "ce" and new.num_outputs == 2  # derived again
    assert new.to_json()["num_outputs"] == 2  # and written so
    assert new.epochs.cv == 7 and "--set" in new.reason("epochs.cv")
    assert plan.input_size == (512, 512)  # the original is untouched


@pytest.mark.parametrize("item, message", [
    ("nosuchkey=1", "no key"),
    ("augmentation.nope=1", "no key"),
    ("batch_size=0", "batch_size"),
    ("input_size=[3,3]", "input_size"),
    ("loss=dice", "loss"),
    ("lr_grid=[]", "lr_grid"),
])
def test_impossible_overrides_are_one_line_errors(tmp_path, item, message):
    plan = make(fingerprint(cone=0.7), ECHO_LABELS, "echocardiography", tmp_path)
    with pytest.raises(MedplanError, match=message):
        Plan.from_json(apply_overrides(plan.to_json(), parse_set_args([item])))


def test_bce_on_multiclass_is_refused(tmp_path):
    plan = make(fingerprint(cone=0.7), ECHO_LABELS, "echocardiography", tmp_path)
    with pytest.raises(MedplanError, match="bce"):
        Plan.from_json(apply_overrides(plan.to_json(), {"loss": "bce"}))


def test_explain_names_every_decision(tmp_path):
    plan = make(fingerprint(cone=0.7), ECHO_LABELS, "echocardiography", tmp_path)
    text = explain_plan(plan)
    for key in ("modality", "loss", "split", "augmentation", "early_stopping", "excluded_cases"):
        assert key in text
    assert "canonical orientation" in text


def test_unknown_planner_is_an_error():
    assert "default" in list_planners()
    with pytest.raises(MedplanError, match="unknown planner"):
        get_planner("nope")
