"""A tiny synthetic dataset written straight to the file contracts (docs/formats.md), so the
trainer tests need neither the importers nor the planner: raw labels at original size,
plans.json, splits.json and preprocessed arrays at 32x32.

Each image is dark noise with a bright square (class 1) and, for three classes, a mid-gray
disc (class 2); original sizes vary so predictions must be resized back per case.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from medplan.io import atomic_write_json, atomic_write_png
from medplan.names import is_valid_name
from medplan.plan import Plan, make_plan
from medplan.preprocessing import write_case

TINY_MODEL = {"base_channels": 4, "depth": 2}
FAST = {"device": "cpu", "num_workers": 0, "progress": False}


def _case(rng: np.random.Generator, shape: tuple[int, int], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    h, w = shape
    image = rng.normal(40, 10, size=(h, w)).clip(0, 255)
    label = np.zeros((h, w), np.uint8)
    side = int(rng.integers(h // 4, h // 2))
    y, x = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
    image[y:y + side, x:x + side] = rng.normal(200, 10, size=(side, side)).clip(0, 255)
    label[y:y + side, x:x + side] = 1
    if num_classes > 2:
        r = max(3, h // 8)
        cy, cx = int(rng.integers(r, h - r)), int(rng.integers(r, w - r))
        yy, xx = np.ogrid[:h, :w]
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (label == 0)
        image[disc] = 120
        label[disc] = 2
    return image.astype(np.uint8), label


def make_dataset(root: Path, name: str = "TOY", *, n_cases: int = 12, n_folds: int = 3, num_classes: int = 2,
                 input_size: int = 32, batch_size: int = 4, epochs: dict | None = None, lr: float = 3e-3,
                 lr_grid: list[float] | None = None, patience: int = 30, seed: int = 0) -> Plan | None:
    """Write raw/NAME, preprocessed/NAME (plans, splits, arrays) under ``root``; return the plan
    (None for a ``name`` no plan may hold: tests of refused names write one all the same).

    Point MEDPLAN_RAW / MEDPLAN_PREPROCESSED / MEDPLAN_RESULTS at ``root/{raw,preprocessed,results}``.
    """
    rng = np.random.default_rng(seed)
    raw = root / "raw" / name
    pre = root / "preprocessed" / name
    labels = {"background": 0, "square": 1, "disc": 2}
    labels = dict(list(labels.items())[:num_classes])
    ddir = pre / f"data_{input_size}x{input_size}"
    cases = [f"case_{i:03d}" for i in range(n_cases)]
    pixels = []
    for i, case_id in enumerate(cases):
        shape = (40, 48) if i % 2 else (36, 36)
        image, label = _case(rng, shape, num_classes)
        atomic_write_png(raw / "images" / f"{case_id}.png", image)
        atomic_write_png(raw / "labels" / f"{case_id}.png", label)
        write_case(ddir, case_id, image, label, [input_size, input_size], 1)
        pixels.append(image.ravel())
    atomic_write_json(raw / "dataset.json", {"name": name, "format": "medplan-raw-1", "channels": 1,
                                              "labels": labels, "modality": "unknown", "num_cases": n_cases})
    (raw / "cases.csv").write_text("case_id,group\n" + "".join(f"{c},{c}\n" for c in cases))
    allpix = np.concatenate(pixels).astype(np.float64)
    plan = make_plan(labels=labels, split={"n_folds": n_folds}, input_size=[input_size, input_size],
                     batch_size=batch_size, normalization={"mean": [float(allpix.mean())], "std": [float(allpix.std())]},
                     lr_grid=lr_grid or [3e-3, 1e-4], lr=lr, epochs=epochs or {"lr_search": 2, "cv": 3},
                     early_stopping={"patience": patience}, duplicates={"n_dropped": 0},
                     raw_dir=str(raw.resolve())).to_json()
    plan["dataset"] = name
    atomic_write_json(pre / "plans.json", plan)
    folds = [cases[k::n_folds] for k in range(n_folds)]
    splits = [{"train": sorted(c for c in cases if c not in folds[k]), "val": sorted(folds[k])} for k in range(n_folds)]
    atomic_write_json(pre / "splits.json", splits)
    return Plan.from_json(plan) if is_valid_name(name) else None


def use_roots(monkeypatch, root: Path) -> None:
    for sub, var in (("raw", "MEDPLAN_RAW"), ("preprocessed", "MEDPLAN_PREPROCESSED"), ("results", "MEDPLAN_RESULTS")):
        monkeypatch.setenv(var, str(root / sub))


def limit_threads() -> None:
    """The test machine's cores are shared: one intra-op thread keeps runs steady."""
    import torch

    torch.set_num_threads(1)
