"""augmentation.backend=nnunet: nnU-Net v2's 2D augmentation (batchgeneratorsv2) in the loader."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from medplan.data import TrainLoader
from medplan.data.nnunet_aug import NnunetAugmenter, nnunet_2d_transforms, rotation_range
from medplan.errors import MedplanError
from medplan.plan import Augmentation, Plan, check_overrides, make_plan
from medplan.planners.overrides import apply_overrides

pytest.importorskip("batchgeneratorsv2")

SIZE = 32
N_CASES = 10
CLASSES = {0, 1, 2}


def nnunet_plan(**extra) -> Plan:
    return make_plan(num_classes=3, input_size=[SIZE, SIZE], normalization={"mean": [100.0], "std": [50.0]},
                     augmentation={"backend": "nnunet", **extra})


@pytest.fixture
def data(tmp_path):
    """10 cases: grey value 10 * i with a bright square labelled 1 or 2 (off centre, so mirrors move it)."""
    ids = [f"case_{i:02d}" for i in range(N_CASES)]
    for i, case_id in enumerate(ids):
        image = np.full((1, SIZE, SIZE), 10 * i, dtype=np.uint8)
        image[0, 4:12, 6:16] = 250
        seg = np.zeros((SIZE, SIZE), dtype=np.uint8)
        seg[4:12, 6:16] = 1 + i % 2
        np.save(tmp_path / f"{case_id}.npy", image)
        np.save(tmp_path / f"{case_id}_seg.npy", seg)
        (tmp_path / f"{case_id}.json").write_text(json.dumps(
            {"case_id": case_id, "original_size": [SIZE, SIZE], "channels": 1, "plan_key": "test"}))
    return tmp_path, ids


def collect(loader) -> list[dict]:
    return [{"image": b["image"].clone(), "seg": b["seg"].clone(), "case_ids": b["case_ids"]} for b in loader]


# ------------------------------------------------------------------ the plan field
def test_backend_defaults_to_medplan_round_trips_and_old_plans_read_unchanged():
    assert make_plan().augmentation.backend == "medplan"
    assert Augmentation.off_json()["backend"] == "medplan"  # in new plans, so --set can reach it
    plan = nnunet_plan()
    assert plan.augmentation.backend == "nnunet"
    again = Plan.from_json(plan.to_json())
    assert again == plan and again.to_json()["augmentation"]["backend"] == "nnunet"
    old = make_plan().to_json()
    del old["augmentation"]["backend"]  # a plans.json written before the key existed
    read = Plan.from_json(old)
    assert read.augmentation.backend == "medplan" and "backend" not in read.to_json()["augmentation"]


def test_set_augmentation_backend_reaches_the_plan_and_is_recorded():
    planned = make_plan().to_json()  # as a planner writes it: every augmentation key present
    plan = Plan.from_json(apply_overrides(planned, {"augmentation.backend": "nnunet"}), source="--set")
    assert plan.augmentation.backend == "nnunet"
    assert "augmentation.backend" in plan.reasons and plan.overrides["augmentation.backend"] == "nnunet"


@pytest.mark.parametrize("value, hint", [("nnUNet", "did you mean 'nnunet'?"), ("medpla", "did you mean 'medplan'?"),
                                         ("albumentations", "got 'albumentations'"), (3, "got 3")])
def test_unknown_backends_are_refused_at_plan_time_with_a_suggestion(value, hint):
    with pytest.raises(MedplanError, match="'augmentation.backend' must be one of medplan, nnunet") as err:
        Augmentation.from_json({"backend": value})
    assert hint in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(MedplanError, match=r"^--set augmentation\.backend: 'augmentation\.backend' must be one of"):
        check_overrides({"augmentation.backend": value})


# ------------------------------------------------------------------ the pipeline
def test_the_pipeline_is_nnunetv2s_own_2d_pipeline():
    pytest.importorskip("nnunetv2")
    from medplan.data.nnunet_aug import nnunet_pipeline_differences

    assert nnunet_pipeline_differences((SIZE, SIZE)) == []
    assert nnunet_pipeline_differences((64, 32)) == []  # elongated: +-15 degrees
    assert rotation_range((64, 32))[1] == pytest.approx(np.pi / 12)
    assert rotation_range((SIZE, SIZE))[1] == pytest.approx(np.pi)


def test_labels_stay_in_the_class_set_and_move_with_the_image():
    aug = NnunetAugmenter(num_classes=3)
    seg = torch.zeros(16, SIZE, SIZE, dtype=torch.uint8)
    seg[:, 4:14, 5:18] = 1
    seg[:, 20:28, 18:30] = 2
    x = (seg.float() * 2.0)[:, None]  # normalized image: 0, 2, 4 by label
    moved = 0
    for seed in range(3):
        out, out_seg = aug(x, seg, torch.Generator().manual_seed(seed))
        assert out.shape == x.shape and out.dtype == torch.float32 and out_seg.dtype == torch.uint8
        assert set(out_seg.unique().tolist()) <= CLASSES
        moved += int((out_seg != seg).flatten(1).any(1).sum())
        for i in range(16):  # brighter where the label is higher: geometry moved both together
            means = [out[i, 0][out_seg[i] == k].mean() for k in (0, 1, 2) if (out_seg[i] == k).sum() > 20]
            assert all(a < b for a, b in zip(means, means[1:])), (seed, i, means)
    assert moved > 8  # mirrors alone move 3 of 4 samples
    assert torch.equal(x, (seg.float() * 2.0)[:, None])  # the input is untouched


def test_a_label_outside_the_class_set_is_caught():
    seg = torch.full((1, SIZE, SIZE), 2, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="outside the 2 classes"):
        NnunetAugmenter(num_classes=2)(torch.zeros(1, 1, SIZE, SIZE), seg, torch.Generator().manual_seed(0))


def test_the_callers_random_state_is_left_alone():
    x, seg = torch.randn(4, 1, SIZE, SIZE), torch.zeros(4, SIZE, SIZE, dtype=torch.uint8)
    np.random.seed(5)
    torch.manual_seed(5)
    np_before, torch_before = np.random.get_state()[1].copy(), torch.get_rng_state()
    NnunetAugmenter(3)(x, seg, torch.Generator().manual_seed(1))
    assert np.array_equal(np.random.get_state()[1], np_before) and torch.equal(torch.get_rng_state(), torch_before)


# ------------------------------------------------------------------ in the loader
def test_loader_batches_are_augmented_exact_and_deterministic(data):
    ddir, ids = data
    plan = nnunet_plan()
    with TrainLoader(ddir, ids, plan, batch_size=2, num_workers=0, seed=7) as loader:
        first = collect(loader)
    with TrainLoader(ddir, ids, plan, batch_size=2, num_workers=0, seed=7) as loader:
        second = collect(loader)
    plain = make_plan(num_classes=3, input_size=[SIZE, SIZE], normalization={"mean": [100.0], "std": [50.0]})
    with TrainLoader(ddir, ids, plain, batch_size=2, num_workers=0, seed=7) as loader:
        unaugmented = collect(loader)
    assert len(first) == len(unaugmented) == N_CASES // 2
    changed = 0
    for a, b, u in zip(first, second, unaugmented):
        assert a["image"].shape == (2, 1, SIZE, SIZE) and a["image"].dtype == torch.float32
        assert a["seg"].shape == (2, SIZE, SIZE) and a["seg"].dtype == torch.long
        assert set(a["seg"].unique().tolist()) <= CLASSES
        assert a["case_ids"] == b["case_ids"] == u["case_ids"]  # the same case order as medplan's backend
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["seg"], b["seg"])  # fixed seed: same batches
        changed += int(not torch.equal(a["seg"], u["seg"]))
    assert changed >= 2  # augmentation happened
    with TrainLoader(ddir, ids, plan, batch_size=2, num_workers=0, seed=8) as loader:
        other = collect(loader)
    assert any(not torch.equal(a["image"], o["image"]) for a, o in zip(first, other))


def test_workers_give_exactly_the_batches_of_the_main_process(data):
    ddir, ids = data
    plan = nnunet_plan()
    with TrainLoader(ddir, ids, plan, batch_size=4, num_workers=0, seed=3, drop_last=False) as loader:
        loader.set_epoch(1)
        inline = collect(loader)
    with TrainLoader(ddir, ids, plan, batch_size=4, num_workers=2, seed=3, drop_last=False) as loader:
        loader.set_epoch(1)
        workers = collect(loader)
    assert len(inline) == len(workers) == 3 and len(inline[-1]["case_ids"]) == 2  # a short last batch too
    for a, b in zip(inline, workers):
        assert a["case_ids"] == b["case_ids"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["seg"], b["seg"])


def test_it_is_cpu_side_only(data):
    ddir, ids = data
    with pytest.raises(MedplanError, match="augmentation.backend=nnunet .* CPU only"):
        TrainLoader(ddir, ids, nnunet_plan(), batch_size=2, num_workers=0, augment_on="device")
    # on CUDA "auto" would augment on the GPU; for this backend it falls back to the CPU workers
    loader = TrainLoader(ddir, ids, nnunet_plan(), batch_size=2, num_workers=0, device="cuda")
    assert loader.augment_on == "workers" and loader.augmenter is None
    loader.close()


def test_without_batchgeneratorsv2_one_line_names_the_extra(data, monkeypatch):
    ddir, ids = data
    monkeypatch.setitem(sys.modules, "batchgeneratorsv2", None)  # import fails as if not installed
    with pytest.raises(MedplanError, match=r"pip install 'medplan\[nnunet\]'") as err:
        TrainLoader(ddir, ids, nnunet_plan(), batch_size=2, num_workers=0)
    assert "\n" not in str(err.value)
    with pytest.raises(MedplanError, match="batchgeneratorsv2"):
        nnunet_2d_transforms((SIZE, SIZE))
    TrainLoader(ddir, ids, make_plan(input_size=[SIZE, SIZE]), batch_size=2, num_workers=0).close()  # medplan's: fine
