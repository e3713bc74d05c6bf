"""Throughput and peak memory of convert -> fingerprint + plan -> preprocess (issue 2, item 10).

Not a test. Generates a synthetic download of N RGB images (default 1,000 of 560x640): the
ISIC 2018 layout from medplan.datasets.synthetic (JPEG images, PNG masks, planted duplicates),
or with ``--layout folder`` a plain images/ + masks/ folder (1% exact copies). Generation is
not timed. Then times each stage on ``--cores`` CPU cores (process affinity; workers = cores):

  convert     medplan.datasets.convert_dataset: download layout -> medplan raw format
  plan        medplan.pipeline.plan: fingerprint (one decoding pass that also writes the
              512x512 arrays) + duplicate filtering + planner + splits
  preprocess  medplan.pipeline.preprocess: checks the plan, finds the arrays already written

Two modes (``--mode``; ``both`` alternates them, each run in a fresh process):

  separate    medplan_convert, then medplan_plan: the fingerprint pass decodes every PNG written
  fused       the download lies in $MEDPLAN_RAW/NAME and medplan_plan imports it: the converter
              hands the pixels it decodes (JPEG) to the fingerprint records and the arrays, so
              each image is decoded once; "convert" is the import inside plan, "plan" the rest

"images/s if idle" = N x cores / CPU-seconds of the stage: what the stage would reach with
the cores to itself (the wall-clock figure suffers when other work shares the machine).

Peak memory: the largest sum of PSS (RSS with shared pages counted once) over this process
and all its children, sampled every 50 ms from /proc (Linux), per stage; plus ``ru_maxrss`` of this process and of its largest
child. Several sizes (``--n 250 1000``) run in fresh processes, to show that peak memory does
not grow with the number of images.

    python benchmarks/bench_preprocess.py --n 1000 --cores 2
    python benchmarks/bench_preprocess.py --n 250 1000 --cores 2
    python benchmarks/bench_preprocess.py --n 250 --mode both --repeat 2   # fused vs separate, head to head
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

NAME = "BENCH"
ANCHOR = {"tool": "nnU-Net v2.8.1", "images": 400, "seconds": 136.0, "images_per_s": 2.9, "peak_gb": 4.2}


# ----------------------------------------------------------------------------- memory

def tree_pids(root: int) -> list[int]:
    pids, stack = [], [root]
    while stack:
        pid = stack.pop()
        pids.append(pid)
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                stack.extend(int(c) for c in (task / "children").read_text().split())
            except OSError:
                pass
    return pids


def pss_bytes(pid: int) -> int:
    """Proportional set size (shared pages split between the processes sharing them), else RSS.

    Forked workers share the parent's pages; summing their RSS would count those pages once
    per worker, summing PSS counts them once.
    """
    for name, key in (("smaps_rollup", "Pss:"), ("status", "VmRSS:")):
        try:
            for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        except OSError:
            continue
    return 0


def _cpu_seconds() -> float:
    """User + system CPU of this process and its finished children (pool workers are joined)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class TreeRSS:
    """Samples the summed RSS of this process tree in a thread; ``peak`` since the last reset."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(pss_bytes(p) for p in tree_pids(os.getpid())))
            time.sleep(self.interval)

    def __enter__(self) -> "TreeRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def reset(self) -> int:
        peak, self.peak = self.peak, sum(pss_bytes(p) for p in tree_pids(os.getpid()))
        return peak


# ----------------------------------------------------------------------------- synthetic data

def _synthetic_pair(args: tuple[int, int, int, str]) -> None:
    """One dermoscopy/endoscopy-like RGB image (JPEG) and its binary mask (PNG)."""
    index, h, w, folder = args
    rng = np.random.default_rng(index)
    small = Image.new("RGB", (w // 4, h // 4), tuple(int(c) for c in rng.integers(120, 220, 3)))
    draw = ImageDraw.Draw(small)
    for _ in range(int(rng.integers(3, 7))):
        x, y = int(rng.integers(0, w // 4)), int(rng.integers(0, h // 4))
        r = int(rng.integers(5, 30))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(40, 255, 3)))
    mask_small = Image.new("L", small.size, 0)
    cx, cy, rx, ry = w // 8 + int(rng.integers(-20, 20)), h // 8 + int(rng.integers(-20, 20)), \
        int(rng.integers(10, 40)), int(rng.integers(10, 40))
    ImageDraw.Draw(mask_small).ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=tuple(int(c) for c in rng.integers(30, 120, 3)))
    image = small.filter(ImageFilter.GaussianBlur(2)).resize((w, h), Image.BILINEAR)
    noise = rng.integers(-12, 13, (h, w, 1), dtype=np.int16)
    pixels = np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(Path(folder) / "images" / f"img_{index:05d}.jpg", quality=90)
    mask_small.resize((w, h), Image.NEAREST).save(Path(folder) / "masks" / f"img_{index:05d}.png")


def make_source(folder: Path, n: int, h: int, w: int, workers: int) -> None:
    """A plain images/ + masks/ download with n pairs, 1% of them planted copies."""
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    n_copies = max(1, n // 100)
    import multiprocessing as mp

    with mp.get_context().Pool(workers) as pool:
        pool.map(_synthetic_pair, [(i, h, w, str(folder)) for i in range(n - n_copies)], chunksize=8)
    for k in range(n_copies):  # exact copies under a new name (identical bytes)
        src = n - n_copies - 1 - k
        for sub, ext in (("images", "jpg"), ("masks", "png")):
            shutil.copy(folder / sub / f"img_{src:05d}.{ext}", folder / sub / f"img_{n - 1 - k:05d}.{ext}")


# ----------------------------------------------------------------------------- stages

def make_download(layout: str, folder: Path, n: int, h: int, w: int, workers: int) -> Path:
    """A synthetic download in an official layout (not timed)."""
    if layout == "isic2018":
        from medplan.datasets import synthetic

        return synthetic.write_isic2018(folder, n=n, size=(h, w), duplicates=True)
    make_source(folder, n, h, w, workers)
    return folder


def timed_import() -> dict:
    """Wrap the auto-import that medplan.pipeline.plan runs (fused mode), to time it apart:
    ``{"wall": s, "cpu": s}`` filled in when it returns (its workers are joined by then)."""
    import medplan.datasets.raw as raw

    spent: dict = {}
    convert = raw.convert_dataset

    def wrapper(*args, **kwargs):
        t, c = time.perf_counter(), _cpu_seconds()
        try:
            return convert(*args, **kwargs)
        finally:
            spent.update(wall=time.perf_counter() - t, cpu=_cpu_seconds() - c)

    raw.convert_dataset = wrapper
    return spent


def stage_convert(layout: str, source: Path, workers: int) -> Path:
    from medplan.datasets import convert_dataset

    return convert_dataset(layout, source, NAME, progress=False, workers=workers)


def stage_plan(workers: int):
    from medplan import pipeline

    return pipeline.plan(NAME, num_workers=workers, progress=False)


def stage_preprocess(workers: int) -> Path:
    from medplan import pipeline

    return pipeline.preprocess(NAME, num_workers=workers, progress=False)


# ----------------------------------------------------------------------------- driver

def run_one(n: int, h: int, w: int, cores: int, layout: str, workdir: Path | None, keep: bool,
            mode: str = "separate") -> dict:
    if hasattr(os, "sched_setaffinity"):
        available = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, available[:cores])
    base = Path(tempfile.mkdtemp(prefix="medplan_bench_", dir=workdir))
    os.environ["MEDPLAN_RAW"] = str(base / "raw")
    os.environ["MEDPLAN_PREPROCESSED"] = str(base / "preprocessed")
    os.environ["MEDPLAN_RESULTS"] = str(base / "results")
    result: dict = {"n": n, "size": [h, w], "cores": cores, "workers": cores, "layout": layout, "mode": mode}
    try:
        t = time.perf_counter()
        # fused: the download lies where medplan_plan looks for the dataset, and is imported by it
        source = make_download(layout, base / ("raw" if mode == "fused" else "download") / NAME, n, h, w, cores)
        result["generate_s"] = round(time.perf_counter() - t, 2)
        stages = {}
        with TreeRSS() as mem:
            mem.reset()
            t0, c0 = time.perf_counter(), _cpu_seconds()
            if mode == "fused":
                spent = timed_import()
                plan = stage_plan(cores)
                t2, c2 = time.perf_counter(), _cpu_seconds()
                t1, c1 = t0 + spent["wall"], c0 + spent["cpu"]
                peak_convert = peak_plan = mem.reset()  # one stage here: the peak of both
            else:
                stage_convert(layout, source, cores)
                t1, c1 = time.perf_counter(), _cpu_seconds()
                peak_convert = mem.reset()
                plan = stage_plan(cores)
                t2, c2 = time.perf_counter(), _cpu_seconds()
                peak_plan = mem.reset()
            ddir = stage_preprocess(cores)
            t3, c3 = time.perf_counter(), _cpu_seconds()
            time.sleep(0.1)
            peak_pre = mem.reset()
        n = json.loads((base / "preprocessed" / NAME / "fingerprint.json").read_text())["num_cases"]
        result["n"] = n  # images actually converted (a synthetic layout may add planted copies)
        for name, seconds, cpu, peak in (
                ("convert", t1 - t0, c1 - c0, peak_convert), ("plan", t2 - t1, c2 - c1, peak_plan),
                ("preprocess", t3 - t2, c3 - c2, peak_pre),
                ("total", t3 - t0, c3 - c0, max(peak_convert, peak_plan, peak_pre))):
            stages[name] = {"seconds": round(seconds, 2), "images_per_s": round(n / seconds, 1),
                            "cpu_s": round(cpu, 2), "cpu_ms_per_image": round(cpu * 1000 / n, 1),
                            "images_per_s_if_idle": round(n * cores / max(cpu, 1e-9), 1),
                            "peak_tree_pss_mb": round(peak / 2**20)}
        result["stages"] = stages
        result["ru_maxrss_mb"] = {"parent": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                                  "largest_child": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)}
        result["arrays"] = len(list(ddir.glob("*.json")))
        result["excluded"] = len(plan.excluded_cases)
        result["speedup_vs_nnunet"] = round(stages["total"]["images_per_s"] / ANCHOR["images_per_s"], 1)
        result["loadavg_1min"] = round(os.getloadavg()[0], 2)
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
    return result


def head_to_head(results: list[dict]) -> list[str]:
    """Markdown rows: per-image CPU-ms of convert, plan and both, separate vs fused, per size
    (the median over the repeats; the ratio of those medians)."""
    rows = ["| images | mode | convert CPU-ms/image | plan CPU-ms/image | convert+plan CPU-ms/image | "
            "convert+plan wall s | peak PSS (tree) | load average |", "|---|---|---|---|---|---|---|---|"]
    for n in sorted({r["n"] for r in results}):
        median = {}
        for mode in ("separate", "fused"):
            runs = [r for r in results if r["n"] == n and r["mode"] == mode]
            if not runs:
                continue

            def med(key: str, stage: str) -> float:
                return float(np.median([r["stages"][stage][key] for r in runs]))

            both = float(np.median([r["stages"]["convert"]["cpu_ms_per_image"] + r["stages"]["plan"]["cpu_ms_per_image"]
                                    for r in runs]))
            wall = float(np.median([r["stages"]["convert"]["seconds"] + r["stages"]["plan"]["seconds"] for r in runs]))
            peak = max(max(r["stages"]["convert"]["peak_tree_pss_mb"], r["stages"]["plan"]["peak_tree_pss_mb"])
                       for r in runs)
            loads = ", ".join(f"{r['loadavg_1min']:.1f}" for r in runs)
            median[mode] = both
            rows.append(f"| {n} | {mode} ({len(runs)} run(s)) | {med('cpu_ms_per_image', 'convert'):.1f} | "
                        f"{med('cpu_ms_per_image', 'plan'):.1f} | {both:.1f} | {wall:.1f} | {peak} MB | {loads} |")
        if len(median) == 2:
            rows.append(f"| {n} | separate / fused | | | {median['separate'] / median['fused']:.2f}x | | | |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1000], help="number of images (several: one run each)")
    parser.add_argument("--size", type=int, nargs=2, default=[560, 640], metavar=("H", "W"))
    parser.add_argument("--layout", choices=["isic2018", "folder"], default="isic2018",
                        help="synthetic download: ISIC 2018 (medplan.datasets.synthetic, JPEG images) or a plain "
                             "images/ + masks/ folder")
    parser.add_argument("--mode", choices=["separate", "fused", "both"], default="separate",
                        help="separate: convert, then plan; fused: plan imports the download (one decode per "
                             "image); both: alternate the two, head to head")
    parser.add_argument("--repeat", type=int, default=1, help="runs per size and mode (alternating modes)")
    parser.add_argument("--cores", type=int, default=2, help="CPU cores to pin to; also the worker count")
    parser.add_argument("--workdir", type=Path, default=None, help="where temporary data goes (default: system tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the generated data")
    parser.add_argument("--json", action="store_true", help="print one JSON line per run only")
    args = parser.parse_args(argv)
    modes = ["separate", "fused"] if args.mode == "both" else [args.mode]
    runs = [(n, mode) for n in args.n for _ in range(args.repeat) for mode in modes]
    results = []
    if len(runs) == 1:
        results.append(run_one(args.n[0], *args.size, args.cores, args.layout, args.workdir, args.keep, modes[0]))
    else:  # fresh processes, so each run's peak memory (and its imports) are its own
        for n, mode in runs:
            cmd = [sys.executable, __file__, "--n", str(n), "--size", *map(str, args.size), "--cores", str(args.cores),
                   "--layout", args.layout, "--mode", mode, "--json"] + \
                (["--workdir", str(args.workdir)] if args.workdir else []) + (["--keep"] if args.keep else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
            if not args.json:
                print(f"done: n={n} {mode} (load average {results[-1]['loadavg_1min']})", flush=True)
    for r in results:
        if args.json:
            print(json.dumps(r))
            continue
        print(f"\n{r['n']} images {r['size'][0]}x{r['size'][1]} RGB ({r['layout']} layout, {r['mode']}), "
              f"{r['cores']} cores (load average {r['loadavg_1min']}), {r['excluded']} duplicates excluded, "
              f"{r['arrays']} arrays")
        print(f"{'stage':<11} {'seconds':>8} {'images/s':>9} {'CPU s':>7} {'CPU-ms/image':>13} "
              f"{'images/s if idle':>17} {'peak PSS (tree)':>16}")
        for name, s in r["stages"].items():
            print(f"{name:<11} {s['seconds']:>8.2f} {s['images_per_s']:>9.1f} {s['cpu_s']:>7.1f} "
                  f"{s['cpu_ms_per_image']:>13.1f} {s['images_per_s_if_idle']:>17.1f} {s['peak_tree_pss_mb']:>13d} MB")
        print(f"ru_maxrss: parent {r['ru_maxrss_mb']['parent']} MB, largest worker {r['ru_maxrss_mb']['largest_child']} MB")
        print(f"vs {ANCHOR['tool']}: {ANCHOR['images_per_s']} images/s, {ANCHOR['peak_gb']} GB -> "
              f"{r['speedup_vs_nnunet']}x")
    if not args.json and len(results) > 1:
        print()
        print("\n".join(head_to_head(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
