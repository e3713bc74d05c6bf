"""medplan_demo runs every stage; it fails loudly when the model misses its target."""
import json

from medplan.cli.demo import main


def test_demo_runs_every_stage_and_checks_its_target(tmp_path, monkeypatch, capsys):
    for var in ("MEDPLAN_RAW", "MEDPLAN_PREPROCESSED", "MEDPLAN_RESULTS"):
        monkeypatch.setenv(var, str(tmp_path / "unused"))  # --root must win, and be restored by monkeypatch
    code = main(["--root", str(tmp_path / "demo"), "--patients", "7", "--epochs", "1", "--input-size", "32",
                 "--no-progress", "--device", "cpu"])
    out, err = capsys.readouterr()
    fold = tmp_path / "demo" / "results" / "DemoCAMUS" / "unet_small" / "fold_0"
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert set(summary["per_class"]) == {"LV", "LV wall", "LA"}
    assert (fold / "checkpoint_final.pt").is_file() and (fold / "progress.png").is_file()
    assert "[5/5]" in out and "mDSC" in out
    # one epoch at 32x32 cannot reach the target: the demo must say so and exit 1
    assert summary["mDSC"] < 0.8 and code == 1 and "below the demo's target" in err
