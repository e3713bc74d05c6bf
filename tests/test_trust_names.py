"""One name rule, everywhere (issue 11, item 2).

Dataset names, architecture names, fold names and case ids reach paths from the command line
and from files other people made. Each entry point refuses a name that could leave its root
(``../../elsewhere/E``, an absolute path, a newline, a hidden name) with one line and a
non-zero exit, and nothing is written anywhere: the whole temporary tree, a folder outside the
roots included, is the same before and after.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from medplan import paths, pipeline
from medplan.cli.convert import main as convert_main
from medplan.cli.evaluate import main as evaluate_main
from medplan.cli.explain import main as explain_main
from medplan.cli.models import main as models_main
from medplan.cli.plan import main as plan_main
from medplan.cli.predict import main as predict_main
from medplan.cli.preprocess import main as preprocess_main
from medplan.cli.train import main as train_main
from medplan.cli.tune import main as tune_main
from medplan.errors import MedplanError
from trainer_fixtures import FAST, TINY_MODEL, limit_threads, make_dataset, use_roots

MAINS = {"medplan_plan": plan_main, "medplan_preprocess": preprocess_main, "medplan_train": train_main,
         "medplan_tune": tune_main, "medplan_evaluate": evaluate_main, "medplan_predict": predict_main,
         "medplan_explain": explain_main, "medplan_models": models_main, "medplan_convert": convert_main}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """``roots/{raw,preprocessed,results}`` with a trained TOY/unet fold 0, and beside the roots
    ``outside/E``: a copy of all of TOY (raw, preprocessed and results merged), which is what
    ``-d ../../outside/E`` reaches from every root."""
    from medplan.trainers import train

    base = tmp_path_factory.mktemp("trust_names")
    roots = base / "roots"
    limit_threads()
    with pytest.MonkeyPatch.context() as mp:
        use_roots(mp, roots)
        make_dataset(roots, epochs={"lr_search": 1, "cv": 1}, lr_grid=[1e-2])
        train("TOY", "unet", 0, overrides=FAST, model_options=TINY_MODEL)
    outside = base / "outside" / "E"
    for sub in ("raw", "preprocessed", "results"):
        shutil.copytree(roots / sub / "TOY", outside, dirs_exist_ok=True)
    plan = json.loads((outside / "plans.json").read_text())
    (outside / "plans.json").write_text(json.dumps({**plan, "raw_dir": str(outside)}))
    inputs = base / "inputs"
    inputs.mkdir()
    shutil.copy(roots / "raw" / "TOY" / "images" / "case_000.png", inputs / "new.png")
    return base


def snapshot(base: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(base)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else (-1, 0)
            for p in sorted(base.rglob("*"))}


def refused(world, monkeypatch, capsys, prog, argv, *fragments):
    use_roots(monkeypatch, world / "roots")
    before = snapshot(world)
    capsys.readouterr()
    code = MAINS[prog](argv)
    err = capsys.readouterr().err.strip()
    assert code != 0, f"{prog} {argv} succeeded"
    assert len(err.splitlines()) == 1 and "Traceback" not in err and err.startswith(f"{prog}: error:"), err
    for fragment in fragments:
        assert fragment in err, err
    assert snapshot(world) == before  # nothing written, inside the roots or outside them
    return err


TRAIN = ["--device", "cpu", "--no-progress", "--no-pretrained"]
MODEL = ["--model-opt", "base_channels=4", "--model-opt", "depth=2"]


def dataset_entry_points(name: str, world: Path) -> list[tuple[str, list[str]]]:
    inputs, out = str(world / "inputs"), str(world / "roots" / "predictions")
    return [
        ("medplan_plan", ["-d", name, "--no-progress"]),
        ("medplan_preprocess", ["-d", name, "--no-progress"]),
        ("medplan_train", [name, "unet", "0", *TRAIN, *MODEL]),
        ("medplan_tune", [name, "unet", *TRAIN, *MODEL]),
        ("medplan_evaluate", ["-d", name, "-a", "unet", "--worst", "1", "--no-progress"]),
        ("medplan_evaluate", ["--model-from", name, "-a", "unet", "--on", "TOY", "--device", "cpu", "--no-progress"]),
        ("medplan_evaluate", ["--model-from", "TOY", "-a", "unet", "--on", name, "--device", "cpu", "--no-progress"]),
        ("medplan_predict", ["-d", name, "-a", "unet", "-i", inputs, "-o", out, "--device", "cpu", "--no-progress"]),
        ("medplan_explain", ["-d", name, "-a", "unet", "-f", "0", "--worst", "1", "--device", "cpu", "--no-progress"]),
    ]


@pytest.mark.parametrize("kind", ["relative", "absolute", "newline", "hidden"])
@pytest.mark.parametrize("index", range(9))
def test_a_dataset_name_never_leaves_the_roots(world, monkeypatch, capsys, kind, index):
    name = {"relative": "../../outside/E", "absolute": str(world / "outside" / "E"), "newline": "TOY\nx",
            "hidden": ".."}[kind]
    prog, argv = dataset_entry_points(name, world)[index]
    refused(world, monkeypatch, capsys, prog, argv, "invalid dataset name")


def test_the_trained_copy_outside_is_usable_when_named_properly(world, monkeypatch):
    """Control: the refusals above are about the name, not about a broken dataset."""
    use_roots(monkeypatch, world / "roots")
    assert pipeline.load_splits("TOY") and (world / "outside" / "E" / "unet" / "fold_0" / "checkpoint_best.pt").is_file()


@pytest.mark.parametrize("prog, argv, message", [
    ("medplan_train", ["TOY", "../../../outside/x", "0", *TRAIN], "invalid architecture name"),
    ("medplan_train", ["TOY", "unet", "../x", *TRAIN], "fold"),
    ("medplan_tune", ["TOY", "../../../outside/x", *TRAIN], "invalid architecture name"),
    ("medplan_evaluate", ["-d", "TOY", "-a", "../../../outside/E/unet", "--worst", "1", "--no-progress"],
     "invalid architecture name"),
    ("medplan_evaluate", ["-d", "TOY", "-a", "unet", "-f", "../../x", "--worst", "1", "--no-progress"], "invalid fold"),
    ("medplan_evaluate", ["-d", "TOY", "--compare", "unet", "../../../outside/E/unet", "--no-progress"],
     "invalid architecture name"),
    ("medplan_evaluate", ["-d", "TOY", "-a", "../unet", "--no-progress"], "invalid architecture name"),
    ("medplan_predict", ["-d", "TOY", "-a", "../TOY/unet", "-i", "INPUTS", "-o", "OUT", "--device", "cpu"],
     "invalid architecture name"),
    ("medplan_predict", ["-d", "TOY", "-a", "unet", "-f", "0/../../unet/fold_0", "-i", "INPUTS", "-o", "OUT",
                         "--device", "cpu"], "invalid fold"),
    ("medplan_explain", ["-d", "TOY", "-a", "../TOY/unet", "-f", "0", "--worst", "1", "--device", "cpu"],
     "invalid architecture name"),
    ("medplan_explain", ["-d", "TOY", "-a", "unet", "-f", "../x", "--worst", "1", "--device", "cpu"], "invalid fold"),
    ("medplan_explain", ["-d", "TOY", "-a", "unet", "--case", "../../../../outside/E/raw", "--device", "cpu"],
     "invalid case id"),
    ("medplan_models", ["../x"], "invalid architecture name"),
])
def test_architecture_fold_and_case_names_are_checked(world, monkeypatch, capsys, prog, argv, message):
    argv = [str(world / "inputs") if a == "INPUTS" else str(world / "roots" / "predictions") if a == "OUT" else a
            for a in argv]
    refused(world, monkeypatch, capsys, prog, argv, message)


def test_convert_refuses_a_traversal_name(world, monkeypatch, capsys):
    refused(world, monkeypatch, capsys, "medplan_convert", ["folder", str(world / "inputs"), "-d", "../../outside/F"],
            "invalid dataset name")


# ----------------------------------------------------------------------------- names read from files
@pytest.fixture
def toy(tmp_path, monkeypatch):
    roots = tmp_path / "roots"
    (tmp_path / "outside").mkdir()
    use_roots(monkeypatch, roots)
    make_dataset(roots, epochs={"lr_search": 1, "cv": 1})
    return tmp_path


def test_a_traversal_validation_id_in_splits_json_writes_nothing(toy, capsys):
    pre = toy / "roots" / "preprocessed" / "TOY"
    splits = json.loads((pre / "splits.json").read_text())
    splits[0]["val"].append("../../../../../outside/x")
    (pre / "splits.json").write_text(json.dumps(splits))
    capsys.readouterr()
    assert train_main(["TOY", "unet", "0", *TRAIN, *MODEL]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "splits.json" in err and "invalid case id" in err
    assert not (toy / "roots" / "results").exists() and list((toy / "outside").iterdir()) == []


def test_a_traversal_case_id_in_cases_csv_is_refused(toy, capsys):
    raw = toy / "roots" / "raw" / "TOY"
    text = (raw / "cases.csv").read_text().replace("case_003,", "../../../outside/case_003,")
    (raw / "cases.csv").write_text(text)
    capsys.readouterr()
    assert plan_main(["-d", "TOY", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cases.csv" in err and "invalid case id" in err
    assert list((toy / "outside").iterdir()) == []
    with pytest.raises(MedplanError, match="cases.csv.*invalid case id"):
        pipeline.load_splits("TOY")  # the trainer's read of cases.csv checks the ids too


def test_a_traversal_name_in_dataset_json_is_refused(toy, capsys):
    raw = toy / "roots" / "raw" / "TOY"
    info = json.loads((raw / "dataset.json").read_text())
    (raw / "dataset.json").write_text(json.dumps({**info, "name": "../../outside/E"}))
    plans = (toy / "roots" / "preprocessed" / "TOY" / "plans.json").read_bytes()
    capsys.readouterr()
    assert plan_main(["-d", "TOY", "--set", "input_size=[32,32]", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "dataset.json" in err and "invalid dataset name" in err and len(err.splitlines()) == 1
    assert (toy / "roots" / "preprocessed" / "TOY" / "plans.json").read_bytes() == plans
    assert list((toy / "outside").iterdir()) == []


def test_a_traversal_id_in_a_fold_config_is_refused_by_evaluate(toy):
    from medplan.evaluation.evaluate import evaluate_fold

    fold = toy / "roots" / "results" / "TOY" / "unet" / "fold_0"
    (fold / "validation").mkdir(parents=True)
    plan = json.loads((toy / "roots" / "preprocessed" / "TOY" / "plans.json").read_text())
    (fold / "config.json").write_text(json.dumps({"plan": plan, "val_cases": ["../../../../../../outside/x"]}))
    with pytest.raises(MedplanError, match="config.json.*invalid case id"):
        evaluate_fold(fold)


# ----------------------------------------------------------------------------- library entry points
@pytest.mark.parametrize("call", [
    lambda: paths.raw_dir("../x"),
    lambda: paths.preprocessed_dir("/etc"),
    lambda: paths.results_dir("TOY", "../x"),
    lambda: paths.results_dir("TOY", "unet", "../x"),
    lambda: paths.results_dir("a\nb"),
    lambda: pipeline.plan("../x", progress=False),
    lambda: pipeline.preprocess("../x", progress=False),
    lambda: pipeline.load_plan("../x"),
    lambda: pipeline.load_splits("../x"),
])
def test_library_entry_points_check_names(toy, call):
    with pytest.raises(MedplanError, match="invalid"):
        call()
    assert list((toy / "outside").iterdir()) == []


def test_library_entry_points_of_training_and_evaluation_check_names(toy):
    from medplan.datasets import convert_dataset, resolve_raw_dataset
    from medplan.evaluation.aggregate import model_table
    from medplan.evaluation.compare import per_case_table
    from medplan.explain import ExplainRequest, _safe, explain
    from medplan.inference import resolve_fold_dirs
    from medplan.trainers import prepare, run_dir

    model = toy / "roots" / "results" / "TOY" / "unet"
    (model / "fold_0").mkdir(parents=True)
    calls = [
        lambda: prepare("TOY", "../x", 0),
        lambda: prepare("../x", "unet", 0),
        lambda: run_dir("TOY", "unet", "../x"),
        lambda: run_dir("TOY", "unet", 0, stage="lr_search", lr=1e-4) and run_dir("TOY", "../u", 0),
        lambda: model_table("../x", "unet"),
        lambda: model_table("TOY", "../unet"),
        lambda: per_case_table("TOY", "unet", folds=["../x"]),
        lambda: resolve_fold_dirs(model, ["../x"]),
        lambda: resolve_raw_dataset("../x"),
        lambda: convert_dataset("folder", toy, "../x"),
        lambda: explain(ExplainRequest(dataset="TOY", archs=["../unet"], worst=1)),
        lambda: explain(ExplainRequest(dataset="TOY", archs=["unet"], cases=["../x"])),
    ]
    for call in calls:
        with pytest.raises(MedplanError, match="invalid"):
            call()
    assert _safe("..") == "_.." and _safe("") == "_" and _safe("a/b") == "a_b"
    assert list((toy / "outside").iterdir()) == []
