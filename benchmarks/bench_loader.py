"""Training-loader throughput: augmented 512x512 samples per second per CPU core (issue 3, item 14).

Synthetic uint8 arrays in the preprocessed layout; the augmentation of the default planner for
an RGB dermoscopy dataset (flips, quarter turns, free rotation, scaling, brightness/contrast,
gamma, colour jitter, blur) and for a gray echocardiography one (small rotation, scaling,
intensity, gamma, noise, blur). Anchor: nnU-Net's 2D loader, about 37 samples/s per core at
512x512; target: >= 75.

Figures, per plan:
- ``augment``: the BatchAugmenter alone on one torch thread (augmentation cost only);
- ``in-process``: TrainLoader(num_workers=0) on one thread: load + augment + normalize;
- ``N workers``: TrainLoader(num_workers=N) wall-clock throughput, and per core (divided by N);
- ``per CPU-s``: samples per CPU-second used by the workers and the main process together
  (``getrusage`` for the main process, /proc for the live workers over the measured window),
  which stays meaningful on a machine shared with other jobs; the CPU
  milliseconds per sample are also split into the main process (copying each batch out of its
  shared-memory slot, labels to long) and the workers (loading, augmenting, normalizing into
  the slot);
- a per-op table: each op alone at p = 1 (CPU ms per sample beyond the uint8 -> float copy),
  times the share of samples that pay for it under the plan.

Usage: ``python benchmarks/bench_loader.py [--size 512] [--seconds 8] [--workers 1 2] [--device cuda]``
(with ``--device cuda`` the loader rows are the GPU mode: workers load uint8 batches into their
slots, the main process copies them through pinned memory and augments on the GPU).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_preprocess import tree_pids  # noqa: E402  (the same process-tree walk)
from medplan.data import TrainLoader, build_augmentation
from medplan.plan import Augmentation, Plan, make_plan
from medplan.planners.default import choose_augmentation

TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
ANCHOR = 37.0  # nnU-Net 2D loader, samples/s per core at 512x512
TARGET = 75.0


def plans(size: int) -> dict[str, Plan]:
    out = {}
    for name, modality, rgb in (("dermoscopy (RGB)", "dermoscopy", True), ("echo (gray)", "echocardiography", False)):
        aug, _ = choose_augmentation(modality, rgb)
        c = 3 if rgb else 1
        out[name] = make_plan(channels=c, input_size=[size, size], augmentation=aug,
                              normalization={"mean": [120.0] * c, "std": [60.0] * c})
    return out


def write_cases(ddir: Path, n: int, channels: int, size: int) -> list[str]:
    """Smooth random images with a disc label: realistic memory traffic, nothing to compress."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    ids = []
    for i in range(n):
        low = rng.uniform(0, 255, (channels, 8, 8))
        image = np.kron(low, np.ones((size // 8, size // 8)))[:, :size, :size]
        image = np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)
        cy, cx, r = rng.uniform(size * 0.3, size * 0.7, 2).tolist() + [size * 0.2]
        seg = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).astype(np.uint8)
        case_id = f"c{channels}_{i:03d}"
        np.save(ddir / f"{case_id}.npy", image)
        np.save(ddir / f"{case_id}_seg.npy", seg)
        (ddir / f"{case_id}.json").write_text(json.dumps({"case_id": case_id, "original_size": [size, size],
                                                         "channels": channels, "plan_key": "bench"}))
        ids.append(case_id)
    return ids


def cpu_seconds() -> tuple[float, float]:
    """(this process, its finished children) CPU seconds, user + system."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime


def bench_augment(plan: Plan, batch: int, seconds: float) -> tuple[float, float]:
    """(samples/s wall-clock, samples per CPU-second) of the BatchAugmenter alone, one thread."""
    aug = build_augmentation(plan.augmentation)
    c, (h, w) = plan.channels, plan.input_size
    x = torch.randint(0, 256, (batch, c, h, w), dtype=torch.uint8)
    seg = torch.randint(0, 2, (batch, h, w), dtype=torch.uint8)
    aug(x, seg, torch.Generator().manual_seed(0))
    n, t0, c0 = 0, time.perf_counter(), time.thread_time()
    while time.perf_counter() - t0 < seconds:
        aug(x, seg, torch.Generator().manual_seed(n))  # a new draw of which ops apply each batch
        n += batch
    return n / (time.perf_counter() - t0), n / (time.thread_time() - c0)


def live_cpu_seconds(pids: list[int]) -> float | None:
    """User + system CPU seconds of live processes (/proc); None where /proc is missing."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        total += (int(fields[11]) + int(fields[12])) / TICKS
    return total


def bench_loader(ddir: Path, ids: list[str], plan: Plan, batch: int, workers: int,
                 seconds: float, device: str = "cpu") -> tuple[float, float, float]:
    """(samples/s wall-clock, main-process CPU ms per sample, workers' CPU ms per sample).

    The workers' CPU time is read from /proc over the measured window only (the batches they
    make ahead before and after it are not counted); without /proc it is their whole life
    (``getrusage`` after the join), which counts those batches too.
    """
    loader = TrainLoader(ddir, ids, plan, batch_size=batch, num_workers=workers, device=device, seed=0)
    it = iter(loader)
    for _ in range(2):  # workers started and warm
        next(it)
    pids = tree_pids(os.getpid())[1:] if os.path.exists("/proc/self/stat") else []
    (main0, kids0), t0, n = cpu_seconds(), time.perf_counter(), 0
    live0 = live_cpu_seconds(pids)
    while time.perf_counter() - t0 < seconds:
        try:
            b = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        n += b["image"].shape[0]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    live1 = live_cpu_seconds(pids)
    main1 = cpu_seconds()[0]
    loader.close()  # joins the workers: their CPU time is now in RUSAGE_CHILDREN
    kids = live1 - live0 if live0 is not None and live1 is not None else cpu_seconds()[1] - kids0
    return n / wall, 1000 * (main1 - main0) / n, 1000 * kids / n


OPS = {
    "geometry (rotation/scale: grid_sample)": ({"rotation_deg": 180.0, "p_rotation": 1.0}, "p_rot|p_scale"),
    "flips / quarter turns (exact)": ({"hflip": True, "vflip": True, "rot90": True}, "flips"),
    "brightness + contrast": ({"brightness": 0.2, "contrast": 0.2, "p_intensity": 1.0}, "p_intensity"),
    "gamma": ({"gamma": [0.8, 1.25], "p_gamma": 1.0}, "p_gamma"),
    "saturation + hue": ({"saturation": 0.1, "hue": 0.02, "p_color": 1.0}, "p_color"),
    "noise": ({"noise_std": 0.03, "p_noise": 1.0}, "p_noise"),
    "blur (sigma 0.5-1)": ({"blur_sigma": [0.5, 1.0], "p_blur": 1.0}, "p_blur"),
}


def op_share(aug: Augmentation, key: str, channels: int) -> float:
    """Fraction of samples that pay for the op under the plan."""
    if key == "p_rot|p_scale":
        p_rot = aug.p_rotation if aug.rotation_deg > 0 else 0.0
        p_scale = aug.p_scale if aug.scale != (1.0, 1.0) else 0.0
        return 1 - (1 - p_rot) * (1 - p_scale)
    if key == "flips":  # exact path: some flip/turn drawn (p = 0.5 each) and no interpolation
        any_flip = 1 - 0.5 ** sum(bool(getattr(aug, k)) for k in ("hflip", "vflip", "rot90"))
        return any_flip * (1 - op_share(aug, "p_rot|p_scale", channels))
    if key == "p_intensity":
        return 1 - (1 - aug.p_intensity) ** 2
    if key == "p_color" and channels == 1:
        return 0.0
    return getattr(aug, key)


def per_op_table(name: str, plan: Plan, batch: int, seconds: float) -> list[str]:
    rows = [f"| {name}: op (alone, p=1) | CPU ms/sample | share of samples in the plan | expected ms/sample |",
            "|---|---|---|---|"]
    base = plan.updated(augmentation=Augmentation.off_json())
    ident = 1000 / bench_augment(base, batch, seconds)[1]
    rows.append(f"| uint8 -> float32 (always) | {ident:.2f} | 1.00 | {ident:.2f} |")
    for label, (settings, key) in OPS.items():
        cost = 1000 / bench_augment(plan.updated(augmentation={**Augmentation.off_json(), **settings}), batch,
                                    seconds)[1]
        share = op_share(plan.augmentation, key, plan.channels)
        extra = max(cost - ident, 0.0)
        rows.append(f"| {label} | {extra:.2f} | {share:.2f} | {share * extra:.2f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--cases", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--no-ops", action="store_true", help="skip the per-op table")
    ap.add_argument("--device", default="cpu",
                    help="cuda: the GPU mode (workers only load uint8, the main process augments on the GPU)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [f"size {args.size}x{args.size}, batch {args.batch}, device {args.device}, torch {torch.__version__}, "
             f"{os.cpu_count()} CPUs, load average {load:.1f} at start; "
             f"anchor nnU-Net {ANCHOR:.0f}/s per core, target {TARGET:.0f}/s per core",
             "",
             "| plan | mode | samples/s (wall) | per core (wall / workers) | per CPU-s (all processes) "
             "| main CPU ms/sample | workers CPU ms/sample |", "|---|---|---|---|---|---|---|"]
    tables: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        ddir = Path(tmp)
        for name, plan in plans(args.size).items():
            ids = write_cases(ddir, args.cases, plan.channels, args.size)
            rate, per_cpu = bench_augment(plan, args.batch, args.seconds)
            lines.append(f"| {name} | augment only, 1 thread | {rate:.1f} | {rate:.1f} | {per_cpu:.1f} "
                         f"| {1000 / per_cpu:.2f} | |")
            wall, main_ms, _ = bench_loader(ddir, ids, plan, args.batch, 0, args.seconds, args.device)
            lines.append(f"| {name} | in-process (num_workers=0) | {wall:.1f} | {wall:.1f} | {1000 / main_ms:.1f} "
                         f"| {main_ms:.2f} | |")
            for w in args.workers:
                wall, main_ms, kids_ms = bench_loader(ddir, ids, plan, args.batch, w, args.seconds, args.device)
                lines.append(f"| {name} | {w} worker(s) | {wall:.1f} | {wall / w:.1f} | "
                             f"{1000 / (main_ms + kids_ms):.1f} | {main_ms:.2f} | {kids_ms:.2f} "
                             f"({1000 / kids_ms:.0f}/s per worker core) |")
            print("\n".join(lines[-2 - len(args.workers):]), flush=True)
            if not args.no_ops:
                tables += ["", *per_op_table(name, plan, args.batch, max(1.0, args.seconds / 4))]
    print("\n" + "\n".join(lines + tables))


if __name__ == "__main__":
    main()
