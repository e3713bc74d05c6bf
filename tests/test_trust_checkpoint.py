"""Checkpoints hold data, not code: a planted pickle never runs under predict, explain or
--continue; new checkpoints load with weights_only=True; old-format files still resume exactly."""
from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import pytest
import torch

from medplan.trainers import Trainer, train
from medplan.trainers.checkpoint import (CHECKPOINT_FORMAT, LEGACY_FORMAT, load_checkpoint, plain, restore_rng_state,
                                         save_checkpoint)
from trainer_fixtures import FAST, TINY_MODEL, limit_threads, make_dataset, use_roots

limit_threads()


class Evil:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class Killed(Exception):
    pass


@pytest.fixture
def trained(tmp_path, monkeypatch):
    """A tiny finished run of TOY/unet fold 0 (2 epochs)."""
    use_roots(monkeypatch, tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    make_dataset(tmp_path, epochs={"lr_search": 1, "cv": 2}, lr=1e-2)
    fold = train("TOY", "unet", 0, overrides=FAST, model_options=TINY_MODEL)
    return fold


def _plant(path, marker, fmt=CHECKPOINT_FORMAT):
    torch.save({"format": fmt, "model": {}, "x": Evil(marker)}, path)


def _one_line(err, path):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert str(path) in lines[0] and "not a medplan checkpoint or not safe to load" in lines[0]


def test_every_new_checkpoint_loads_with_weights_only(trained):
    for name in ("checkpoint_best.pt", "checkpoint_final.pt", "checkpoint_latest.pt"):
        state = torch.load(trained / name, map_location="cpu", weights_only=True)  # no allowlist needed
        assert state["format"] == CHECKPOINT_FORMAT
    rng = torch.load(trained / "checkpoint_latest.pt", weights_only=True)["rng"][0]
    assert isinstance(rng["numpy"]["key"], torch.Tensor) and isinstance(rng["python"], list)


def test_plain_converts_numpy_and_refuses_objects(tmp_path):
    from pathlib import Path

    state = {"a": np.float32(0.5), "b": np.arange(3), "c": (np.int64(2), Path("/x")), "d": {1: [np.bool_(True)]}}
    save_checkpoint(tmp_path / "c.pt", state)
    back = torch.load(tmp_path / "c.pt", weights_only=True)
    assert back["a"] == 0.5 and type(back["a"]) is float and torch.equal(back["b"], torch.arange(3))
    assert back["c"] == (2, "/x") and back["d"] == {1: [True]}
    with pytest.raises(TypeError, match="data only"):
        plain({"x": Evil(tmp_path / "m")})


@pytest.mark.parametrize("fmt", [CHECKPOINT_FORMAT, LEGACY_FORMAT])
def test_malicious_checkpoint_never_runs_under_predict(trained, tmp_path, capsys, fmt):
    from PIL import Image

    from medplan.cli.predict import main

    marker = tmp_path / "PWNED"
    bad = trained / "checkpoint_best.pt"
    _plant(bad, marker, fmt)
    images = tmp_path / "in"
    images.mkdir()
    Image.fromarray(np.full((20, 20), 90, np.uint8)).save(images / "a.png")
    capsys.readouterr()
    code = main(["-m", str(trained.parent), "-i", str(images), "-o", str(tmp_path / "out"), "--device", "cpu",
                 "--no-progress"])
    assert code != 0 and not marker.exists()
    _one_line(capsys.readouterr().err, bad)


def test_malicious_checkpoint_never_runs_under_explain(trained, tmp_path, capsys):
    from medplan.cli.explain import main

    marker = tmp_path / "PWNED"
    bad = trained / "checkpoint_best.pt"
    _plant(bad, marker)
    capsys.readouterr()
    code = main(["-d", "TOY", "-a", "unet", "-f", "0", "--worst", "1", "--device", "cpu", "--no-progress"])
    assert code != 0 and not marker.exists()
    _one_line(capsys.readouterr().err, bad)


def test_malicious_checkpoint_never_runs_under_continue(trained, tmp_path, capsys):
    from medplan.cli.train import main

    marker = tmp_path / "PWNED"
    (trained / "checkpoint_final.pt").unlink()  # an interrupted run: --continue loads checkpoint_latest.pt
    shutil.rmtree(trained / "validation")
    bad = trained / "checkpoint_latest.pt"
    _plant(bad, marker)
    capsys.readouterr()
    code = main(["TOY", "unet", "0", "--continue", "--device", "cpu", "--num-workers", "0", "--no-progress",
                 "--model-opt", "base_channels=4", "--model-opt", "depth=2"])
    assert code != 0 and not marker.exists()
    _one_line(capsys.readouterr().err, bad)
    assert bad.is_file()  # the evidence is left where it was


def test_malicious_pickle_with_numpy_arrays_is_refused_even_in_the_old_format(tmp_path):
    from medplan.errors import MedplanError

    marker = tmp_path / "PWNED"
    path = tmp_path / "c.pt"
    torch.save({"format": LEGACY_FORMAT, "numpy": np.random.get_state(), "x": Evil(marker)}, path)
    with pytest.raises(MedplanError, match="posix.system|nt.system"):
        load_checkpoint(path)
    # numpy content alone is allowed only under the old format tag
    torch.save({"format": CHECKPOINT_FORMAT, "numpy": np.random.get_state()}, path)
    with pytest.raises(MedplanError, match="not safe to load"):
        load_checkpoint(path)
    assert not marker.exists()


def _as_legacy(path):
    """Rewrite a checkpoint as medplan-checkpoint-1 wrote it: RNG states as random.getstate()
    and np.random.get_state() tuples (an ndarray inside), which weights_only alone refuses."""
    state = torch.load(path, weights_only=True)
    for rng in state["rng"]:
        py, npst = rng["python"], rng["numpy"]
        rng["python"] = (py[0], tuple(py[1]), py[2])
        rng["numpy"] = (npst["bit_generator"], npst["key"].numpy().astype(np.uint32), npst["pos"],
                        npst["has_gauss"], npst["gauss"])
    state["format"] = LEGACY_FORMAT
    torch.save(state, path)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path)  # really needs numpy


def test_old_format_checkpoint_resumes_like_an_uninterrupted_run(tmp_path, monkeypatch):
    use_roots(monkeypatch, tmp_path)
    make_dataset(tmp_path, epochs={"lr_search": 1, "cv": 3}, lr=1e-2)

    def run(out, **kw):
        return train("TOY", "unet", 0, overrides=FAST, model_options=TINY_MODEL, output_dir=out, **kw)

    reference = run(tmp_path / "reference")

    def die_at_epoch_2(self, epoch):
        if epoch == 2:
            raise Killed

    out = tmp_path / "interrupted"
    monkeypatch.setattr(Trainer, "on_epoch_start", die_at_epoch_2)
    with pytest.raises(Killed):
        run(out)
    monkeypatch.undo()
    use_roots(monkeypatch, tmp_path)
    _as_legacy(out / "checkpoint_latest.pt")
    assert load_checkpoint(out / "checkpoint_latest.pt")["format"] == LEGACY_FORMAT
    run(out, continue_training=True)

    def metrics(d):
        return [{k: v for k, v in json.loads(ln).items() if k not in ("epoch_time", "timestamp")}
                for ln in (d / "metrics.jsonl").read_text().splitlines()]

    assert metrics(out) == metrics(reference)
    wa, wb = (load_checkpoint(d / "checkpoint_final.pt")["model"] for d in (reference, out))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)


def test_rng_state_round_trips_in_both_formats():
    from medplan.trainers.checkpoint import capture_rng_state

    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    np.random.normal()  # a cached gaussian in numpy's state
    state = capture_rng_state()
    expected = (random.random(), np.random.normal(), torch.rand(1).item())
    restore_rng_state(state)
    assert (random.random(), np.random.normal(), torch.rand(1).item()) == expected
    legacy = {"python": (state["python"][0], tuple(state["python"][1]), state["python"][2]),
              "numpy": np.random.get_state(), "torch": state["torch"]}
    restore_rng_state(state)
    legacy["numpy"] = np.random.get_state()
    restore_rng_state(legacy)
    assert (random.random(), np.random.normal(), torch.rand(1).item()) == expected


def test_malicious_pretrained_weights_never_run(tmp_path):
    from medplan.architectures.pretrained import read_state_dict
    from medplan.errors import MedplanError

    marker = tmp_path / "PWNED"
    path = tmp_path / "weights.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "meta": Evil(marker)}, path)
    with pytest.raises(MedplanError, match="not a weights file or not safe to load") as info:
        read_state_dict(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()
