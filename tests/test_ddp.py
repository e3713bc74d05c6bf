"""Distributed data parallel: two gloo processes on CPU, launched the way a user would
(``medplan_train ... --num-gpus 2``, which relaunches itself through torchrun)."""
import json
import os
import subprocess
import sys

from medplan.trainers.checkpoint import load_checkpoint
from medplan.trainers.distributed import shard_cases
from trainer_fixtures import make_dataset


def test_shards_are_disjoint_equal_and_cover_every_case():
    cases = [f"c{i}" for i in range(9)]
    for epoch in (1, 2):
        shards = [shard_cases(cases, r, 2, seed=5, epoch=epoch) for r in range(2)]
        assert len(shards[0]) == len(shards[1]) == 5
        assert set(shards[0]) | set(shards[1]) == set(cases)
        assert len(set(shards[0]) & set(shards[1])) <= 1  # only the one padding case repeats
    assert shard_cases(cases, 0, 2, seed=5, epoch=1) != shard_cases(cases, 0, 2, seed=5, epoch=2)
    assert shard_cases(cases, 0, 1, seed=5, epoch=1) == sorted(cases)


def test_two_process_gloo_run_writes_one_complete_folder(tmp_path):
    make_dataset(tmp_path, epochs={"lr_search": 1, "cv": 1})
    env = {**os.environ, "MEDPLAN_RAW": str(tmp_path / "raw"), "MEDPLAN_PREPROCESSED": str(tmp_path / "preprocessed"),
           "MEDPLAN_RESULTS": str(tmp_path / "results"), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "medplan.cli.train", "TOY", "unet", "0", "--num-gpus", "2", "--device", "cpu",
           "--num-workers", "0", "--model-opt", "base_channels=4", "--model-opt", "depth=2", "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "results" / "TOY" / "unet" / "fold_0"
    for name in ("checkpoint_latest.pt", "checkpoint_best.pt", "checkpoint_final.pt", "config.json",
                 "metrics.jsonl", "progress.png", "training.log", "validation/summary.json"):
        assert (out / name).is_file(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["batch_size"] == 4
    final = load_checkpoint(out / "checkpoint_final.pt")
    assert final["ddp"] == {"world_size": 2, "ranks_in_sync": True}
    latest = load_checkpoint(out / "checkpoint_latest.pt")
    assert len(latest["rng"]) == 2  # every rank's random state, for an exact resume
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # one writer, one line per epoch
    assert proc.stdout.count("epoch 1/1") == 1  # only rank 0 reports
