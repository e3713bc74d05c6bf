"""convert -> plan -> preprocess end to end through the commands, on synthetic downloads."""
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medplan import pipeline
from medplan.cli.convert import main as convert_main
from medplan.cli.plan import main as plan_main
from medplan.cli.preprocess import main as preprocess_main
from medplan.datasets import synthetic
from medplan.splits import check_splits


@pytest.fixture
def camus(medplan_env):
    src = synthetic.write_camus(medplan_env / "downloads", n_patients=7, size=(72, 56), seed=3)
    assert convert_main(["camus", str(src), "-d", "CAMUS", "--no-progress"]) == 0
    return src


def test_plan_and_preprocess_camus(camus, medplan_env, capsys):
    assert plan_main(["-d", "CAMUS", "--set", "input_size=[64,64]", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "group_kfold" in out and "canonical orientation" in out  # explained, not only written

    pre = medplan_env / "preprocessed" / "CAMUS"
    plan = json.loads((pre / "plans.json").read_text())
    assert plan["input_size"] == [64, 64] and plan["loss"] == "ce" and plan["channels"] == 1
    assert not plan["augmentation"]["vflip"]

    dropped = {d for _, d, _ in synthetic.planted_duplicates(camus)}
    assert set(plan["excluded_cases"]) == dropped
    cases = pd.read_csv(medplan_env / "raw" / "CAMUS" / "cases.csv", dtype=str)
    kept = cases[~cases.case_id.isin(dropped)]
    splits = json.loads((pre / "splits.json").read_text())
    check_splits(splits, kept.case_id.tolist(), dict(zip(kept.case_id, kept.group)))
    assert not dropped & set(sum((f["train"] + f["val"] for f in splits), []))

    assert preprocess_main(["-d", "CAMUS", "--no-progress"]) == 0
    data = pre / "data_64x64"
    done = sorted(p.stem for p in data.glob("*.json"))
    assert done == sorted(kept.case_id)
    img = np.load(data / f"{done[0]}.npy", mmap_mode="r")
    seg = np.load(data / f"{done[0]}_seg.npy")
    assert img.shape == (1, 64, 64) and img.dtype == np.uint8 and set(np.unique(seg)) <= {0, 1, 2, 3}

    # idempotent: a second run neither replans nor rewrites arrays
    stamps = {p.name: p.stat().st_mtime_ns for p in data.iterdir()}
    splits_before = (pre / "splits.json").read_bytes()
    assert preprocess_main(["-d", "CAMUS", "--no-progress"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in data.iterdir()} == stamps
    assert (pre / "splits.json").read_bytes() == splits_before
    # planning again keeps the splits (they only change when the kept cases do)
    assert plan_main(["-d", "CAMUS", "--set", "input_size=[64,64]", "--no-progress"]) == 0
    assert (pre / "splits.json").read_bytes() == splits_before


def test_preprocess_replans_when_the_raw_data_changed(camus, medplan_env):
    assert preprocess_main(["-d", "CAMUS", "--set", "input_size=[32,32]", "--no-progress"]) == 0
    raw = medplan_env / "raw" / "CAMUS"
    first = sorted(p.name for p in (raw / "images").iterdir())[0]
    img = np.asarray(Image.open(raw / "images" / first)).copy()
    img[:8] = 255  # the user edits an image
    Image.fromarray(img).save(raw / "images" / first)
    assert preprocess_main(["-d", "CAMUS", "--no-progress"]) == 0
    plan = json.loads((medplan_env / "preprocessed" / "CAMUS" / "plans.json").read_text())
    assert plan["input_size"] == [32, 32]  # the user's --set survives the replan


def test_official_download_in_raw_folder_is_imported_first(medplan_env, capsys):
    synthetic.write_isic2018(medplan_env / "raw" / "ISIC2018", n=12, size=(60, 80), seed=1)
    assert preprocess_main(["-d", "ISIC2018", "--set", "input_size=[32,32]", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "import" in out.lower()
    plan = json.loads((medplan_env / "preprocessed" / "ISIC2018" / "plans.json").read_text())
    assert (plan["task"], plan["loss"], plan["modality"], plan["split"]["strategy"]) == ("binary", "bce", "rgb", "kfold")
    assert plan["augmentation"]["vflip"] and plan["augmentation"]["p_color"] > 0


def test_unknown_dataset_is_a_one_line_error(medplan_env, capsys):
    assert plan_main(["-d", "Nope", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("medplan_plan: error:") and "Nope" in err and len(err.splitlines()) == 1


def test_corrupt_raw_image_fails_cleanly_and_keeps_the_earlier_plan(camus, medplan_env, capsys):
    assert plan_main(["-d", "CAMUS", "--set", "input_size=[32,32]", "--no-progress"]) == 0
    plans = (medplan_env / "preprocessed" / "CAMUS" / "plans.json").read_bytes()
    raw = medplan_env / "raw" / "CAMUS"
    victim = sorted((raw / "images").iterdir())[1]
    victim.write_bytes(victim.read_bytes()[:40])  # truncated PNG
    capsys.readouterr()
    assert plan_main(["-d", "CAMUS", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert victim.name in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert (medplan_env / "preprocessed" / "CAMUS" / "plans.json").read_bytes() == plans


def test_bad_set_is_refused_before_anything_is_written(camus, medplan_env, capsys):
    assert plan_main(["-d", "CAMUS", "--set", "batch_size=0", "--no-progress"]) == 2
    assert "batch_size" in capsys.readouterr().err
    assert not (medplan_env / "preprocessed" / "CAMUS" / "plans.json").exists()


def test_load_plan_without_planning_names_the_command(medplan_env):
    from medplan.errors import MedplanError

    with pytest.raises(MedplanError, match="medplan_preprocess -d X"):
        pipeline.load_plan("X")
