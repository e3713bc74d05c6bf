"""The built-in demo: a synthetic CAMUS download through every stage, on a laptop CPU.

It writes a small CAMUS-layout dataset (2019 challenge release, echo-like cones with LV
cavity, wall and atrium under speckle, planted duplicates), then runs exactly what a user
runs on the real data — convert, plan, preprocess, train, evaluate — with a reduced input
size and a small U-Net so it finishes in minutes on two cores.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

from medplan import pipeline
from medplan.datasets import convert_dataset, synthetic
from medplan.io import read_json
from medplan.paths import raw_root
from medplan.planners.explain import explain_plan
from medplan.trainers import train

DEMO_NAME = "DemoCAMUS"


def run_demo(root: str | Path | None = None, *, n_patients: int = 24, image_size: tuple[int, int] = (160, 128),
             input_size: int = 128, arch: str = "unet_small", epochs: int = 25, lr: float = 1e-3,
             fold: int = 0, device: str = "auto", num_workers: int | None = 0, progress: bool = True,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole pipeline on synthetic data; return the fold's validation summary.

    ``root`` puts downloads, raw, preprocessed and results under one folder (for a throw-away
    run); when None the configured MEDPLAN_* folders are used and the download goes beside them.
    """
    if root is not None:
        root = Path(root).expanduser().resolve()
        for var, sub in (("MEDPLAN_RAW", "raw"), ("MEDPLAN_PREPROCESSED", "preprocessed"),
                         ("MEDPLAN_RESULTS", "results")):
            os.environ[var] = str(root / sub)
    downloads = (root if root is not None else raw_root().parent) / "downloads"
    t0 = time.perf_counter()

    log(f"[1/5] writing a synthetic CAMUS download ({n_patients} patients, 2019 layout) under {downloads}")
    source = synthetic.write_camus(downloads, n_patients=n_patients, layout="2019", size=image_size, seed=0)

    log(f"[2/5] medplan_convert camus {source} -d {DEMO_NAME}")
    raw = convert_dataset("camus", source, DEMO_NAME, progress=progress, force=True)

    log(f"[3/5] medplan_plan -d {DEMO_NAME} --set input_size=[{input_size},{input_size}] "
        f"--set lr={lr:g} --set epochs.cv={epochs}")
    overrides = {"input_size": [input_size, input_size], "lr": lr, "epochs.cv": epochs}
    plan = pipeline.plan(DEMO_NAME, overrides=overrides, progress=progress, refingerprint=True, log=log)
    log(explain_plan(plan))

    log(f"[4/5] medplan_preprocess -d {DEMO_NAME}")
    pipeline.preprocess(DEMO_NAME, progress=progress, log=log)

    log(f"[5/5] medplan_train {DEMO_NAME} {arch} {fold} (then evaluate its validation fold)")
    fold_dir = train(DEMO_NAME, arch, fold, overrides={"device": device, "num_workers": num_workers,
                                                      "force": True, "progress": progress})
    summary = read_json(fold_dir / "validation" / "summary.json")
    per_class = ", ".join(f"{name} {v['dice']:.3f}" for name, v in summary["per_class"].items()
                          if v.get("dice") is not None)
    log(f"validation fold {fold}: mDSC {summary['mDSC']:.3f}  mIoU {summary['mIoU']:.3f}  "
        f"mRec {summary['mRec']:.3f}  mPrec {summary['mPrec']:.3f}  ({summary['n_cases']} cases; {per_class})")
    log(f"results in {fold_dir}  ({time.perf_counter() - t0:.0f} s in all; raw data in {raw})")
    return summary
