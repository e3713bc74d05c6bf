"""medplan_evaluate wires the web report: ``--all-folds`` writes it, ``--html`` rebuilds it alone."""
from __future__ import annotations

from medplan.cli.evaluate import main
from medplan.io import atomic_write_json


def _results(root):
    for arch, base in (("net", 0.80), ("other", 0.70)):
        for k in range(2):
            v = base + 0.01 * k
            atomic_write_json(root / "D" / arch / f"fold_{k}" / "validation" / "summary.json",
                              {"mDSC": v, "mIoU": v, "mRec": v, "mPrec": v, "n_cases": 3,
                               "per_class": {"fg": {"dice": v}}})


def test_all_folds_writes_the_web_report_and_html_rebuilds_it(tmp_path, monkeypatch, capsys):
    root = tmp_path / "results"
    for var, path in (("MEDPLAN_RAW", tmp_path / "raw"), ("MEDPLAN_PREPROCESSED", tmp_path / "pre"),
                      ("MEDPLAN_RESULTS", root)):
        monkeypatch.setenv(var, str(path))
    _results(root)
    assert main(["--all-folds", "--no-progress", "--no-plots"]) == 0
    index = root / "report" / "index.html"
    assert f"wrote {index}" in capsys.readouterr().out
    html = index.read_text()
    assert "80.5±0.7" in html and "70.5±0.7" in html  # mean ± sample SD of the two folds, in percent
    index.unlink()
    assert main(["--html"]) == 0
    assert index.is_file() and not (root / "summary_at_input_size.csv").exists()
    assert main(["--all-folds", "--no-html", "--no-progress", "--no-plots"]) == 0
