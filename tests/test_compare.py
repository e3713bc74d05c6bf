"""Paired comparison (Wilcoxon + bootstrap CI) and the worst cases per fold."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medplan.errors import MedplanError
from medplan.evaluation.compare import bootstrap_ci, paired_comparison, worst_cases
from medplan.io import atomic_write_json


def write_model(root: Path, arch: str, per_fold: list[np.ndarray], dataset: str = "D") -> None:
    for k, values in enumerate(per_fold):
        per_case = {f"f{k}_c{i:03d}": {"mDSC": float(v), "mIoU": float(v) * 0.9, "mRec": None, "mPrec": float(v),
                                       "dice": {"fg": float(v)}} for i, v in enumerate(values)}
        atomic_write_json(root / dataset / arch / f"fold_{k}" / "validation" / "summary.json",
                          {"mDSC": float(np.mean(values)), "per_case": per_case})


def test_clearly_better_model_small_p_and_ci_excluding_zero(tmp_path):
    rng = np.random.default_rng(0)
    base = [rng.uniform(0.6, 0.9, 40) for _ in range(3)]
    write_model(tmp_path, "weak", base)
    write_model(tmp_path, "strong", [b + rng.uniform(0.01, 0.05, b.size) for b in base])
    r = paired_comparison("D", "strong", "weak", n_boot=2000, results_root=tmp_path)
    assert r["n_cases"] == 120 and r["folds"] == ["0", "1", "2"]
    assert r["wilcoxon_p"] < 1e-6
    assert 0 < r["ci95"][0] < r["mean_difference"] < r["ci95"][1]
    assert r["n_a_better"] == 120 and "strong is better" in r["conclusion"]


def test_equal_models_large_p_and_ci_containing_zero(tmp_path):
    rng = np.random.default_rng(1)
    base = [rng.uniform(0.6, 0.9, 50) for _ in range(2)]
    write_model(tmp_path, "a", base)
    write_model(tmp_path, "same", base)
    r = paired_comparison("D", "a", "same", n_boot=500, results_root=tmp_path)
    assert r["wilcoxon_p"] == 1.0 and r["ci95"] == [0.0, 0.0] and r["n_ties"] == 100
    # equal in distribution: symmetric noise around the same cases
    write_model(tmp_path, "noisy", [b + rng.normal(0, 0.02, b.size) for b in base])
    r = paired_comparison("D", "noisy", "a", n_boot=2000, results_root=tmp_path)
    assert r["wilcoxon_p"] > 0.05 and r["ci95"][0] < 0 < r["ci95"][1]
    assert "no evidence" in r["conclusion"]


def test_bootstrap_is_seeded_and_vectorised():
    d = np.random.default_rng(2).normal(0.01, 0.05, 300)
    a = bootstrap_ci(d, n_boot=3000, seed=7, chunk=700)
    assert a == bootstrap_ci(d, n_boot=3000, seed=7, chunk=700)
    se = d.std(ddof=1) / np.sqrt(d.size)
    assert a[0] == pytest.approx(d.mean() - 1.96 * se, abs=0.3 * se)
    assert a[1] == pytest.approx(d.mean() + 1.96 * se, abs=0.3 * se)


def test_unpaired_and_bad_requests(tmp_path):
    rng = np.random.default_rng(3)
    write_model(tmp_path, "a", [rng.uniform(0.5, 1, 10), rng.uniform(0.5, 1, 10)])
    write_model(tmp_path, "b", [rng.uniform(0.5, 1, 10)])  # only fold 0
    r = paired_comparison("D", "a", "b", n_boot=100, results_root=tmp_path)
    assert r["n_cases"] == 10 and r["n_only_a"] == 10 and r["n_only_b"] == 0
    with pytest.raises(MedplanError, match="two different"):
        paired_comparison("D", "a", "a", results_root=tmp_path)
    with pytest.raises(MedplanError, match="not a trained model folder"):
        paired_comparison("D", "a", "nothing", results_root=tmp_path)


def test_worst_cases_per_fold_and_cli(tmp_path, monkeypatch, capsys):
    from medplan.cli.evaluate import main

    values = [np.linspace(0.1, 0.9, 9), np.linspace(0.95, 0.5, 10)]
    write_model(tmp_path, "net", values)
    write_model(tmp_path, "other", [v * 0.5 for v in values])
    paths = worst_cases("D", "net", 3, results_root=tmp_path)
    assert [p.parent.name for p in paths] == ["fold_0", "fold_1"]
    w0 = pd.read_csv(paths[0])
    assert w0["case_id"].tolist() == ["f0_c000", "f0_c001", "f0_c002"] and w0["rank"].tolist() == [1, 2, 3]
    assert pd.read_csv(paths[1])["mDSC"].tolist() == pytest.approx([0.5, 0.55, 0.6])
    monkeypatch.setenv("MEDPLAN_RESULTS", str(tmp_path))
    assert main(["-d", "D", "--compare", "net", "other", "--n-boot", "200", "--worst", "2"]) == 0
    out = capsys.readouterr().out
    assert "Wilcoxon" in out and "net is better" in out
    saved = json.loads((tmp_path / "D" / "compare_net_vs_other.json").read_text())
    assert saved["n_cases"] == 19 and len(pd.read_csv(tmp_path / "D" / "compare_net_vs_other_cases.csv")) == 19
    assert len(pd.read_csv(tmp_path / "D" / "other" / "fold_1" / "worst_cases.csv")) == 2
    assert main(["-d", "D", "--worst", "0", "-a", "net"]) == 2
