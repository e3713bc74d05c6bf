"""Efficiency on the device at hand: a short timed training and inference run per architecture.

Figures (images/s for a training step and for inference, peak GPU memory) go to
``$MEDPLAN_RESULTS/efficiency.json`` keyed by architecture, so the study report can show
them and ``medplan_benchmark --dry-run`` can turn epoch budgets into GPU-hours. The numbers
are for one device and one input size; estimates scale them by pixel count.
"""
from __future__ import annotations

import datetime as _dt
import time
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F

from medplan import paths
from medplan.architectures.registry import build_model, count_parameters, get_entry
from medplan.errors import MedplanError
from medplan.io import atomic_write_json, read_json

EFFICIENCY_FILE = "efficiency.json"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({torch.get_num_threads()} threads)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_model(name: str, *, size: tuple[int, int] = (512, 512), in_channels: int = 3, num_classes: int = 2,
                  batch_size: int = 2, steps: int = 5, warmup: int = 1, device: str = "auto",
                  model_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Time ``steps`` AdamW training steps and ``steps`` inference batches (after ``warmup``)."""
    if steps < 1 or batch_size < 1 or min(size) < 1:
        raise MedplanError(f"measure needs steps, batch size and size >= 1, got {steps}, {batch_size}, {tuple(size)}")
    get_entry(name)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    options = dict(model_options or {})
    if get_entry(name).pretrained and "pretrained" not in options:
        options["pretrained"] = False  # timing needs no downloaded weights
    model = build_model(name, in_channels, num_classes, **options).to(dev)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randn(batch_size, in_channels, int(size[0]), int(size[1]), device=dev)
    y = torch.randint(0, num_classes, (batch_size, int(size[0]), int(size[1])), device=dev)
    amp = dev.type == "cuda"
    dtype = torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16

    def forward(inputs: torch.Tensor) -> torch.Tensor:
        with torch.autocast(dev.type, dtype=dtype, enabled=amp):
            out = model(inputs)
        out = out[0] if isinstance(out, (list, tuple)) else out
        return F.interpolate(out.float(), size=inputs.shape[-2:], mode="bilinear") if out.shape[-2:] != inputs.shape[-2:] else out.float()

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        logits = forward(x)
        if num_classes > 1:
            loss = F.cross_entropy(logits, y)
        else:
            loss = F.binary_cross_entropy_with_logits(logits[:, 0], y.float())
        loss.backward()
        opt.step()

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    model.train()
    for _ in range(warmup):
        train_step()
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step()
    _sync(dev)
    train_s = time.perf_counter() - t0
    peak_train = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
    model.eval()
    with torch.no_grad():
        for _ in range(warmup):
            forward(x)
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(steps):
            forward(x)
        _sync(dev)
        infer_s = time.perf_counter() - t0
    params = count_parameters(model)
    return {
        "arch": name, "device": device_name(dev), "device_type": dev.type, "size": [int(size[0]), int(size[1])],
        "in_channels": in_channels, "num_classes": num_classes, "batch_size": batch_size, "steps": steps,
        "amp": amp, "params_total": params["total"], "params_trainable": params["trainable"],
        "train_images_per_s": batch_size * steps / train_s, "infer_images_per_s": batch_size * steps / infer_s,
        "peak_memory_mb": peak_train, "model_options": options,
        "measured": _dt.datetime.now().isoformat(timespec="seconds"),
    }


def efficiency_path(results_root: str | Path | None = None) -> Path:
    return paths.results_root(results_root) / EFFICIENCY_FILE


def load_measurements(results_root: str | Path | None = None) -> dict[str, dict]:
    """``{arch: measurement}`` from efficiency.json (empty when nothing was measured yet)."""
    path = efficiency_path(results_root)
    return dict(read_json(path).get("models", {})) if path.is_file() else {}


def measure_models(names: Iterable[str], *, results_root: str | Path | None = None, save: bool = True,
                   **kwargs: Any) -> list[dict[str, Any]]:
    """Measure each architecture; with ``save`` merge the figures into efficiency.json."""
    rows = [measure_model(n, **kwargs) for n in names]
    if save:
        models = load_measurements(results_root)
        models.update({r["arch"]: r for r in rows})
        atomic_write_json(efficiency_path(results_root), {"format": "medplan-efficiency-1", "models": models})
    return rows


def estimate_seconds(measurement: dict[str, Any], size: Iterable[int], n_train: int, n_val: int,
                     epochs: int) -> float:
    """Upper bound for one run: ``epochs`` x (train + validation images), scaled by pixel count."""
    h, w = (int(s) for s in size)
    mh, mw = measurement["size"]
    scale = (h * w) / float(mh * mw)
    per_epoch = n_train / measurement["train_images_per_s"] + n_val / measurement["infer_images_per_s"]
    return epochs * per_epoch * scale
