"""Fast answers (issue 13): every console script answers ``--help``, an unknown flag and a bad
name without importing torch or the other heavy libraries (timm, SimpleITK, pandas, matplotlib,
scipy): each case runs in a fresh interpreter that reports ``sys.modules`` afterwards. No
timing is asserted; ``sys.modules`` is the proof."""
from __future__ import annotations

import json
import os
import subprocess
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "timm", "SimpleITK", "pandas", "matplotlib", "scipy", "nnunetv2")

#: a bad name (or the first error the script meets) for each script
BAD_NAME = {
    "medplan_convert": ["auto", "/nonexistent/source", "-d", "../x"],
    "medplan_plan": ["-d", "../x"],
    "medplan_preprocess": ["-d", "../x"],
    "medplan_train": ["../x", "unet", "0"],
    "medplan_tune": ["TOY", "../x"],
    "medplan_models": ["../x"],
    "medplan_demo": ["--arch", "../x"],
    "medplan_predict": ["-d", "TOY", "-a", "../x", "-i", "in", "-o", "out"],
    "medplan_evaluate": ["-d", "../x", "-a", "unet"],
    "medplan_explain": ["-d", "TOY", "-a", "../x", "--worst", "1"],
    "medplan_benchmark": ["-d", "TOY", "-a", "../x"],
    "medplan_export": ["nnunet", "-d", "../x", "--id", "5"],
}

#: a well-formed but unknown architecture name (a typo), for the scripts that train one
UNKNOWN_ARCH = {
    "medplan_train": ["TOY", "unet_smal", "0"],
    "medplan_tune": ["TOY", "unet_smal"],
    "medplan_demo": ["--arch", "unet_smal"],
    "medplan_benchmark": ["-d", "TOY", "-a", "unet", "unet_smal"],
}

#: a bad number that only the script's own checks catch (argparse accepts it)
BAD_NUMBER = {
    "medplan_train": ["TOY", "unet", "0", "--batch-size", "0"],
    "medplan_tune": ["TOY", "unet", "--epochs", "0"],
    "medplan_models": ["--steps", "0", "--measure"],
    "medplan_demo": ["--epochs", "0"],
    "medplan_predict": ["-d", "TOY", "-a", "unet", "-i", "in", "-o", "out", "--batch-size", "0"],
    "medplan_evaluate": ["-d", "TOY", "--worst", "0", "-a", "unet"],
    "medplan_explain": ["-d", "TOY", "-a", "unet", "--worst", "0"],
    "medplan_benchmark": ["-d", "TOY", "-a", "unet", "--epochs", "0"],
}

PROBE = """
import json, sys
sys.argv = [{prog!r}, *{argv!r}]
from {module} import {func}
code = None
try:
    code = {func}()
except SystemExit as exc:
    code = exc.code
print("@@" + json.dumps({{"code": code, "heavy": [m for m in {heavy!r} if m in sys.modules]}}), file=sys.stderr)
"""


def console_scripts() -> dict[str, str]:
    """``[project.scripts]`` of pyproject.toml (read with a pattern: tomllib needs Python 3.11)."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    scripts = dict(re.findall(r'^(medplan_\w+)\s*=\s*"([\w.:]+)"', section, flags=re.M))
    scripts.setdefault("medplan_export", "medplan.cli.export:main")
    return scripts


def run_script(prog: str, argv: list[str], tmp_path: Path) -> tuple[int, str, list[str]]:
    module, func = console_scripts()[prog].split(":")
    env = {**os.environ, "MEDPLAN_RAW": str(tmp_path / "raw"), "MEDPLAN_PREPROCESSED": str(tmp_path / "pre"),
           "MEDPLAN_RESULTS": str(tmp_path / "results"), "MEDPLAN_WEIGHTS": str(tmp_path / "weights"),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", PROBE.format(prog=prog, argv=argv, module=module, func=func,
                                                              heavy=HEAVY)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    report = [line for line in proc.stderr.splitlines() if line.startswith("@@")]
    assert report, proc.stderr[-2000:]
    found = json.loads(report[-1][2:])
    err = "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("@@"))
    return found["code"], proc.stdout + err, found["heavy"]


def test_every_console_script_is_covered():
    assert set(BAD_NAME) == set(console_scripts())


@pytest.mark.parametrize("prog", sorted(BAD_NAME))
def test_help_imports_nothing_heavy(prog, tmp_path):
    code, out, heavy = run_script(prog, ["--help"], tmp_path)
    assert code == 0 and "usage:" in out
    assert heavy == [], f"{prog} --help imported {heavy}"


@pytest.mark.parametrize("prog", sorted(BAD_NAME))
def test_argument_errors_import_nothing_heavy(prog, tmp_path):
    code, out, heavy = run_script(prog, ["--no-such-flag"], tmp_path)
    assert code == 2 and f"{prog}: error: " in out, out  # argparse: the flag, or the required arguments first
    assert heavy == [], f"{prog} with a bad flag imported {heavy}"


@pytest.mark.parametrize("prog", sorted(BAD_NAME))
def test_bad_names_are_refused_before_anything_heavy(prog, tmp_path):
    code, out, heavy = run_script(prog, BAD_NAME[prog], tmp_path)
    assert code == 2, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error:"), out
    assert heavy == [], f"{prog} {' '.join(BAD_NAME[prog])} imported {heavy}"


@pytest.mark.parametrize("prog", sorted(UNKNOWN_ARCH))
def test_unknown_architectures_are_refused_before_anything_heavy(prog, tmp_path):
    code, out, heavy = run_script(prog, UNKNOWN_ARCH[prog], tmp_path)
    lines = [line for line in out.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, out
    assert lines[0].startswith(f"{prog}: error: unknown architecture 'unet_smal' (did you mean unet_small"), out
    assert heavy == [], f"{prog} {' '.join(UNKNOWN_ARCH[prog])} imported {heavy}"


@pytest.mark.parametrize("prog", ["medplan_train", "medplan_tune"])
def test_a_dataset_never_planned_is_answered_before_anything_heavy(prog, tmp_path):
    code, out, heavy = run_script(prog, ["TOY", "unet", *(["0"] if prog == "medplan_train" else [])], tmp_path)
    lines = [line for line in out.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "no plan for dataset 'TOY'; run medplan_plan -d TOY" in lines[0], out
    assert heavy == [], f"{prog} imported {heavy}"


@pytest.mark.parametrize("prog", sorted(BAD_NUMBER))
def test_bad_numbers_are_refused_before_anything_heavy(prog, tmp_path):
    code, out, heavy = run_script(prog, BAD_NUMBER[prog], tmp_path)
    assert code == 2 and out.strip().startswith(f"{prog}: error:") and "must be >= 1" in out, out
    assert heavy == [], f"{prog} {' '.join(BAD_NUMBER[prog])} imported {heavy}"


def test_new_training_flags_become_overrides():
    from medplan.cli.train import build_parser, run_overrides
    from medplan.cli.tune import build_parser as tune_parser

    args = build_parser().parse_args(["D", "unet", "0", "--compile", "--no-tensorboard", "--skip-memory-check"])
    overrides = run_overrides(args)
    assert overrides["compile"] is True and overrides["tensorboard"] is False and args.skip_memory_check
    plain = run_overrides(build_parser().parse_args(["D", "unet", "0"]))
    assert plain["compile"] is None and plain["tensorboard"] is None  # unset: TrainSettings' defaults
    tuned = run_overrides(tune_parser().parse_args(["D", "unet", "--compile", "--no-tensorboard"]))
    assert tuned["compile"] is True and tuned["tensorboard"] is False


def test_benchmark_compile_goes_into_the_study(tmp_path, monkeypatch):
    from medplan.cli.benchmark import build_parser, make_study

    monkeypatch.setenv("MEDPLAN_RESULTS", str(tmp_path / "results"))
    study = make_study(build_parser().parse_args(["-d", "TOY", "-a", "unet", "--compile"]))
    assert study.overrides == {"compile": True}
    assert make_study(build_parser().parse_args(["-d", "TOY", "-a", "unet"])).overrides == {}
