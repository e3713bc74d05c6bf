"""Training and validation loaders over preprocessed uint8 arrays (tiny synthetic cases)."""
from __future__ import annotations

import gc
import json
import os
import signal

import numpy as np
import pytest
import torch

from medplan.data import TrainLoader, iterate_validation
from medplan.errors import MedplanError
from medplan.plan import Plan, make_plan

SIZE = 32
N_CASES = 10


def aug_plan(**aug) -> Plan:
    """The loader tests' plan: 32x32 gray, z-score (100, 50), augmentation ``aug`` (the rest off)."""
    return make_plan(input_size=[SIZE, SIZE], normalization={"mean": [100.0], "std": [50.0]}, augmentation=aug)


AUGMENTED = dict(rotation_deg=15.0, p_rotation=0.5, scale=[0.85, 1.15], p_scale=0.5, hflip=True,
                 brightness=0.2, contrast=0.2, p_intensity=0.5, gamma=[0.8, 1.25], p_gamma=0.3,
                 noise_std=0.03, p_noise=0.3, blur_sigma=[0.5, 1.0], p_blur=0.3)


@pytest.fixture
def data(tmp_path):
    """10 cases, each image a constant grey value 10 * i (so a case is recognisable)."""
    ids = [f"case_{i:02d}" for i in range(N_CASES)]
    for i, case_id in enumerate(ids):
        image = np.full((1, SIZE, SIZE), 10 * i, dtype=np.uint8)
        image[0, :4, :4] = 255
        seg = np.zeros((SIZE, SIZE), dtype=np.uint8)
        seg[8:16, 8:16] = 1 + i % 2
        np.save(tmp_path / f"{case_id}.npy", image)
        np.save(tmp_path / f"{case_id}_seg.npy", seg)
        (tmp_path / f"{case_id}.json").write_text(json.dumps(
            {"case_id": case_id, "original_size": [SIZE, SIZE], "channels": 1, "plan_key": "test"}))
    return tmp_path, ids


def raw_image(case_id: str) -> torch.Tensor:
    i = int(case_id.split("_")[1])
    image = torch.full((1, SIZE, SIZE), 10.0 * i)
    image[0, :4, :4] = 255
    return image


def collect(loader) -> list[dict]:
    return [{"image": b["image"].clone(), "seg": b["seg"].clone(), "case_ids": b["case_ids"]} for b in loader]


def test_batches_have_the_right_shapes_types_and_normalization(data):
    ddir, ids = data
    with TrainLoader(ddir, ids, aug_plan(), batch_size=4, num_workers=0) as loader:
        assert len(loader) == N_CASES // 4
        batches = collect(loader)
    assert len(batches) == 2
    seen = [c for b in batches for c in b["case_ids"]]
    assert len(seen) == 8 and len(set(seen)) == 8 and set(seen) <= set(ids)
    for b in batches:
        assert b["image"].shape == (4, 1, SIZE, SIZE) and b["image"].dtype == torch.float32
        assert b["seg"].shape == (4, SIZE, SIZE) and b["seg"].dtype == torch.long
        expected = torch.stack([(raw_image(c) - 100.0) / 50.0 for c in b["case_ids"]])
        assert torch.allclose(b["image"], expected, atol=1e-6)
        assert set(b["seg"].unique().tolist()) <= {0, 1, 2}


def test_two_workers_give_exactly_the_batches_of_the_main_process(data):
    ddir, ids = data
    plan = aug_plan(**AUGMENTED)
    with TrainLoader(ddir, ids, plan, batch_size=2, num_workers=0, seed=3) as loader:
        loader.set_epoch(2)
        inline = collect(loader)
    loader = TrainLoader(ddir, ids, plan, batch_size=2, num_workers=2, seed=3)
    try:
        loader.set_epoch(2)
        workers = collect(loader)
        processes = list(loader._pool.processes)
        assert processes and all(p.is_alive() for p in processes)
    finally:
        loader.close()
    assert all(not p.is_alive() for p in processes)  # a clean close stops every worker
    assert len(inline) == len(workers) == 5
    for a, b in zip(inline, workers):
        assert a["case_ids"] == b["case_ids"] and torch.equal(a["seg"], b["seg"])
        assert a["image"].dtype == b["image"].dtype == torch.float32
        assert torch.allclose(a["image"], b["image"], rtol=0, atol=1e-5)  # float32 through the slots
    # the augmentation did act (not an identity plan)
    plain = torch.stack([(raw_image(c) - 100.0) / 50.0 for b in inline for c in b["case_ids"]])
    assert not torch.allclose(torch.cat([b["image"] for b in inline]), plain, atol=1e-2)


def test_set_epoch_reproduces_an_epoch_and_epochs_differ(data):
    ddir, ids = data
    plan = aug_plan(**AUGMENTED)
    with TrainLoader(ddir, ids, plan, batch_size=2, num_workers=2, seed=5) as loader:
        first = collect(loader)        # epoch 0
        second = collect(loader)       # advances to epoch 1 by itself; workers ran ahead
        loader.set_epoch(0)
        again = collect(loader)        # jumping back restarts the workers
    with TrainLoader(ddir, ids, plan, batch_size=2, num_workers=0, seed=5) as resumed:
        resumed.set_epoch(1)           # a run resumed at epoch 1
        resumed_second = collect(resumed)
    order = lambda bs: [c for b in bs for c in b["case_ids"]]  # noqa: E731
    assert order(first) == order(again) and order(first) != order(second)
    assert order(second) == order(resumed_second)
    for a, b in zip(first, again):
        assert torch.equal(a["image"], b["image"])
    for a, b in zip(second, resumed_second):
        assert torch.equal(a["image"], b["image"])
    assert sorted(order(first)) == sorted(set(order(first)))  # no case twice within an epoch


def test_leaving_an_epoch_early_then_continuing_restarts_cleanly(data):
    ddir, ids = data
    with TrainLoader(ddir, ids, aug_plan(**AUGMENTED), batch_size=2, num_workers=2, seed=1) as loader:
        for _ in loader:
            break                      # half-read epoch 0
        loader.set_epoch(1)
        partial_then_full = collect(loader)
    with TrainLoader(ddir, ids, aug_plan(**AUGMENTED), batch_size=2, num_workers=0, seed=1) as ref:
        ref.set_epoch(1)
        expected = collect(ref)
    assert [b["case_ids"] for b in partial_then_full] == [b["case_ids"] for b in expected]


def test_fewer_cases_than_a_batch_still_fill_one_batch(data):
    ddir, ids = data
    with TrainLoader(ddir, ids[:3], aug_plan(), batch_size=4, num_workers=0) as loader:
        assert len(loader) == 1
        (batch,) = collect(loader)
    assert batch["image"].shape[0] == 4 and set(batch["case_ids"]) == set(ids[:3])
    with TrainLoader(ddir, ids, aug_plan(), batch_size=4, num_workers=0, drop_last=False) as loader:
        assert len(loader) == 3
        sizes = [b["image"].shape[0] for b in loader]
    assert sizes == [4, 4, 2]


def test_missing_case_is_an_error_at_construction(data):
    ddir, ids = data
    with pytest.raises(MedplanError, match="case_99"):
        TrainLoader(ddir, ids + ["case_99"], aug_plan(), batch_size=2, num_workers=0)
    with pytest.raises(MedplanError, match="plan expects"):
        TrainLoader(ddir, ids, aug_plan().updated(input_size=[16, 16]), batch_size=2, num_workers=0)


def test_an_error_in_a_worker_is_raised_in_the_main_process(data):
    ddir, ids = data
    loader = TrainLoader(ddir, ids, aug_plan(), batch_size=2, num_workers=2)
    (ddir / f"{ids[3]}.npy").write_bytes(b"not a numpy file")  # corrupted after the checks
    with pytest.raises(MedplanError, match=ids[3]):
        for _ in range(3):
            collect(loader)
    assert loader._pool is None  # the workers were stopped
    loader.close()


def test_validation_covers_every_case_once_in_order_without_augmentation(data):
    ddir, ids = data
    plan = aug_plan(**AUGMENTED, vflip=True)
    batches = list(iterate_validation(ddir, ids, plan, batch_size=4, device="cpu"))
    assert [b["image"].shape[0] for b in batches] == [4, 4, 2]
    assert [c for b in batches for c in b["case_ids"]] == ids
    images = torch.cat([b["image"] for b in batches])
    expected = torch.stack([(raw_image(c) - 100.0) / 50.0 for c in ids])
    assert torch.allclose(images, expected, atol=1e-6) and images.dtype == torch.float32
    segs = torch.cat([b["seg"] for b in batches])
    assert segs.dtype == torch.long and int(segs[1, 10, 10]) == 2 and int(segs[0, 10, 10]) == 1


def test_augmenting_on_the_device_matches_augmenting_in_the_workers(data):
    """Same function, same per-batch generator: uint8 slots + augmenting after them = float32 slots."""
    ddir, ids = data
    plan = aug_plan(**AUGMENTED)
    with TrainLoader(ddir, ids, plan, batch_size=2, num_workers=2, seed=9, augment_on="device") as loader:
        on_device = collect(loader)
    with TrainLoader(ddir, ids, plan, batch_size=2, num_workers=0, seed=9, augment_on="workers") as loader:
        in_workers = collect(loader)
    for a, b in zip(on_device, in_workers):
        assert a["case_ids"] == b["case_ids"] and torch.equal(a["seg"], b["seg"])
        assert torch.allclose(a["image"], b["image"], rtol=0, atol=1e-5)


def rgb_data(ddir, n: int = 6) -> list[str]:
    """RGB cases with a 3-class label whose pixels are the only values a label may take."""
    rng = np.random.default_rng(0)
    ids = []
    for i in range(n):
        case_id = f"rgb_{i:02d}"
        np.save(ddir / f"{case_id}.npy", rng.integers(0, 256, (3, SIZE, SIZE), dtype=np.uint8))
        seg = np.zeros((SIZE, SIZE), dtype=np.uint8)
        seg[4:20, 6:26] = 1
        seg[10:14, :] = 2
        np.save(ddir / f"{case_id}_seg.npy", seg)
        (ddir / f"{case_id}.json").write_text(json.dumps(
            {"case_id": case_id, "original_size": [SIZE, SIZE], "channels": 3, "plan_key": "test"}))
        ids.append(case_id)
    return ids


def test_rgb_workers_match_in_process_with_exact_labels_and_a_short_last_batch(tmp_path):
    ids = rgb_data(tmp_path)
    plan = make_plan(channels=3, input_size=[SIZE, SIZE], normalization={"mean": [120.0] * 3, "std": [60.0] * 3},
                     augmentation={**AUGMENTED, "rotation_deg": 180.0, "p_rotation": 1.0, "vflip": True,
                                   "rot90": True, "saturation": 0.2, "hue": 0.05, "p_color": 1.0})
    runs = {}
    for workers in (0, 2):
        with TrainLoader(tmp_path, ids, plan, batch_size=4, num_workers=workers, seed=7, drop_last=False) as loader:
            runs[workers] = collect(loader) + collect(loader)  # two epochs; the second runs ahead
    assert [b["image"].shape[0] for b in runs[2]] == [4, 2, 4, 2]
    for a, b in zip(runs[0], runs[2]):
        assert a["case_ids"] == b["case_ids"] and torch.equal(a["seg"], b["seg"])
        assert torch.allclose(a["image"], b["image"], rtol=0, atol=1e-5)
    segs = torch.cat([b["seg"] for b in runs[2]])
    assert set(segs.unique().tolist()) == {0, 1, 2}  # nearest neighbour: no label is ever interpolated
    assert not torch.equal(segs[0], segs[1])  # and the geometry did act on the labels


def loader_mappings(pids: list[int]) -> tuple[int, int]:
    """(anonymous shared mappings of the main process, mappings of /dev/shm files in any of ``pids``)."""
    with open("/proc/self/maps") as f:
        anonymous = sum("/dev/zero (deleted)" in line for line in f)
    in_dev_shm = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                in_dev_shm += sum("/dev/shm/" in line for line in f)
        except FileNotFoundError:
            pass
    return anonymous, in_dev_shm


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_shared_memory_is_released_on_close_after_iteration_and_on_a_worker_crash(data):
    ddir, ids = data
    before = loader_mappings([])[0]
    main_shm = loader_mappings([os.getpid()])[1]  # other tests' semaphores of this process (multiprocessing)

    # 1. close(): workers gone, slots unmapped; nothing of ours was ever under /dev/shm
    loader = TrainLoader(ddir, ids, aug_plan(**AUGMENTED), batch_size=2, num_workers=2)
    it = iter(loader)
    next(it)
    procs = list(loader._pool.processes)
    # forked workers inherit those mappings and add none of their own
    assert loader_mappings([os.getpid()] + [p.pid for p in procs]) == (before + 1, main_shm * (1 + len(procs)))
    loader.close()
    assert loader_mappings([])[0] == before and not any(p.is_alive() for p in procs)

    # 2. a loader dropped after a full pass (``for batch in TrainLoader(...)``) frees everything
    seen = []
    for batch in TrainLoader(ddir, ids, aug_plan(), batch_size=2, num_workers=2):
        seen.append(batch["case_ids"])
    del batch
    gc.collect()
    assert len(seen) == N_CASES // 2 and loader_mappings([])[0] == before

    # 3. a worker killed (out of memory, say): a one-line error, the other worker stopped, slots unmapped
    loader = TrainLoader(ddir, ids, aug_plan(), batch_size=2, num_workers=2)
    it = iter(loader)
    next(it)
    procs = list(loader._pool.processes)
    os.kill(procs[1].pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match="worker 1 .*died .*SIGKILL") as err:
        for _ in range(3):  # worker 1 owns every other batch: this epoch or the next needs it
            collect(loader)
    assert "\n" not in str(err.value) and loader._pool is None
    assert loader_mappings([])[0] == before and not any(p.is_alive() for p in procs)


def test_a_bug_in_a_worker_is_one_line_with_the_worker_traceback_attached(data):
    ddir, ids = data
    loader = TrainLoader(ddir, ids, aug_plan(), batch_size=2, num_workers=2)
    np.save(ddir / f"{ids[5]}_seg.npy", np.zeros((SIZE, SIZE + 1), dtype=np.uint8))  # wrong shape after the checks
    with pytest.raises(RuntimeError, match=r"training loader worker \d failed on batch \(0, \d\): ValueError") as err:
        collect(loader)
    assert "\n" not in str(err.value) and loader._pool is None
    notes = getattr(err.value, "__notes__", None)
    assert notes is None or "Traceback" in notes[0]
