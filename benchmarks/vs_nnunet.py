"""Head to head with nnU-Net v2 on the same files (issue 13, item 1).

One synthetic dataset of N RGB PNGs (~560x640, 2 classes) is written in nnU-Net v2's raw
layout (``DatasetXXX_Name/imagesTr/CASE_0000.png`` holding RGB, ``labelsTr/CASE.png``,
``dataset.json`` with channel_names R/G/B and file_ending ``.png``). medplan's ``folder``
importer reads the very same files through symbolic links (``images/CASE.png`` ->
``imagesTr/CASE_0000.png``, ``masks/CASE.png`` -> ``labelsTr/CASE.png``); generation is not timed.

Measured steps, each in its own subprocess (the parent samples the summed PSS of that
process tree in a thread and takes the CPU time of the tree from ``getrusage(RUSAGE_CHILDREN)``,
cross-checked with per-process samples of /proc/PID/stat, the larger is kept):

- nnU-Net: ``nnUNetv2_plan_and_preprocess -d ID -c 2d -np K -npfp K --verify_dataset_integrity``;
- medplan: ``medplan_convert folder`` + ``medplan_plan`` + ``medplan_preprocess`` (K workers);
- loaders, 512x512 patch, batch 8, K workers, after 2 warm-up batches, ``--batches`` batches:
  nnU-Net's ``nnUNetDataLoader`` with ``nnUNetTrainer.get_training_transforms`` (its defaults:
  rotation, scaling, noise, blur, brightness, contrast, low resolution, gamma, mirroring,
  deep-supervision targets) in a ``NonDetMultiThreadedAugmenter``, built as
  ``nnUNetTrainer.get_dataloaders`` builds the training loader (plans' 2d patch set to 512x512
  and batch to 8); medplan's ``TrainLoader`` (CPU mode, augmentation in the workers) with the
  plan medplan made for these files (dermoscopy, RGB, input 512x512) and with the echo (gray)
  plan of ``bench_loader.py`` on synthetic 1-channel arrays (no nnU-Net counterpart: its ratio
  is against nnU-Net's RGB loader). Loader CPU time is the CPU time (/proc/PID/stat) of the loader's
  process tree (main process + live workers) over the measured window only.

The two systems alternate (nnU-Net first in odd rounds, medplan first in even rounds) and
each figure is the median over ``--rounds`` (range in brackets). Both sides run with
OMP_NUM_THREADS=1 / one torch thread per process. The machine's load average is printed
before and after: on a shared machine read the CPU-second rates and the ratios, not the
wall-clock seconds.

Usage: ``python benchmarks/vs_nnunet.py --n 200 --rounds 3 --workers 2 --batches 20``
(needs ``pip install medplan[bench]``, i.e. nnunetv2). ``--preprocess-only`` skips the loaders;
``--profile`` then runs medplan's three steps once more in one process under cProfile and prints
the CPU milliseconds per image of each operation (decode, histograms, hash, resize, writes, ...).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_preprocess import pss_bytes, tree_pids  # noqa: E402  (the same process-tree sampler)

HERE = Path(__file__).resolve().parent
DATASET_ID = 987
NNUNET_NAME = f"Dataset{DATASET_ID:03d}_VsMedplan"
MEDPLAN_NAME = "VSNNUNET"
PATCH = 512
BATCH = 8
WARMUP = 2
MARK = "VS_NNUNET_RESULT "


# ----------------------------------------------------------------------------- process tree

TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_cpu(pid: int) -> float | None:
    """User + system CPU seconds of one live process (not its reaped children), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14, 15)
    except (OSError, IndexError, ValueError):
        return None


def tree_cpu(root: int) -> float:
    """CPU seconds of the live processes of a tree."""
    return sum(c for c in map(proc_cpu, tree_pids(root)) if c is not None)


class TreeSampler:
    """Peak summed PSS of a process tree, and the last CPU time seen per process (/proc)."""

    def __init__(self, root: int, interval: float = 0.1):
        self.root, self.interval, self.peak = root, interval, 0
        self.cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = tree_pids(self.root)
            self.peak = max(self.peak, sum(pss_bytes(p) for p in pids))
            for pid in pids:
                c = proc_cpu(pid)
                if c is not None:
                    self.cpu[pid] = max(self.cpu.get(pid, 0.0), c)
            self._stop.wait(self.interval)

    def __enter__(self) -> "TreeSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def measured(cmd: list[str], env: dict[str, str], log: Path) -> dict:
    """Run one step in a subprocess: wall s, CPU s of the whole tree, peak PSS, its JSON result."""
    c0, t0 = children_cpu(), time.perf_counter()
    with open(log, "ab") as fh:
        fh.write(("\n$ " + " ".join(cmd) + "\n").encode())
        fh.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=fh)
        with TreeSampler(proc.pid) as sampler:
            out, _ = proc.communicate()
    wall, cpu = time.perf_counter() - t0, children_cpu() - c0
    if proc.returncode != 0:
        raise SystemExit(f"step failed (exit {proc.returncode}): {' '.join(cmd)}; see {log}")
    result = {}
    lines = [x for x in out.decode(errors="replace").splitlines() if x.startswith(MARK)]
    if lines:
        result = json.loads(lines[-1][len(MARK):])
    return {"wall": wall, "cpu": max(cpu, sum(sampler.cpu.values())), "peak": sampler.peak, "result": result}


# ----------------------------------------------------------------------------- synthetic data

def write_case(args: tuple[int, Path, Path, int, int]) -> None:
    """A dermoscopy-like RGB image (smooth skin, a darker lesion, texture) and its 0/1 mask."""
    from PIL import Image
    i, images, labels, h, w = args
    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    low = rng.uniform(120, 220, (3, 6, 6)).astype(np.float32)
    base = np.stack([np.kron(c, np.ones((h // 6 + 1, w // 6 + 1), np.float32))[:h, :w] for c in low])
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    ry, rx = rng.uniform(0.12, 0.3) * h, rng.uniform(0.12, 0.3) * w
    lesion = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    base[:, lesion] *= rng.uniform(0.35, 0.65, (3, 1)).astype(np.float32)
    image = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    case = f"case_{i:04d}"
    Image.fromarray(image, "RGB").save(images / f"{case}_0000.png")
    Image.fromarray(lesion.astype(np.uint8), "L").save(labels / f"{case}.png")


def make_dataset(base: Path, n: int, workers: int) -> tuple[Path, Path]:
    """nnU-Net v2 raw layout, plus a folder of links for medplan's ``folder`` importer."""
    from multiprocessing import Pool
    raw = base / "nnUNet_raw" / NNUNET_NAME
    images, labels = raw / "imagesTr", raw / "labelsTr"
    images.mkdir(parents=True)
    labels.mkdir()
    rng = np.random.default_rng(1)
    jobs = [(i, images, labels, int(rng.integers(540, 581)), int(rng.integers(620, 661))) for i in range(n)]
    with Pool(workers) as pool:
        pool.map(write_case, jobs, chunksize=4)
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "R", "1": "G", "2": "B"}, "labels": {"background": 0, "lesion": 1},
        "numTraining": n, "file_ending": ".png", "name": NNUNET_NAME}, indent=2))
    links = base / "medplan_source"
    (links / "images").mkdir(parents=True)
    (links / "masks").mkdir()
    for i in range(n):
        case = f"case_{i:04d}"
        (links / "images" / f"{case}.png").symlink_to(images / f"{case}_0000.png")
        (links / "masks" / f"{case}.png").symlink_to(labels / f"{case}.png")
    return raw, links


# ----------------------------------------------------------------------------- loader steps (subprocess)

def _loop(next_batch, batches: int, root: int) -> dict:
    for _ in range(WARMUP):
        next_batch()
    c0, t0, n = tree_cpu(root), time.perf_counter(), 0
    for _ in range(batches):
        n += next_batch()
    wall, cpu = time.perf_counter() - t0, tree_cpu(root) - c0
    return {"samples": n, "wall": wall, "cpu": cpu}


def step_nnunet_loader(prep: Path, workers: int, batches: int) -> dict:
    import torch
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    torch.set_num_threads(1)
    plans = json.loads((prep / "nnUNetPlans.json").read_text())
    plans["configurations"]["2d"]["patch_size"] = [PATCH, PATCH]
    plans["configurations"]["2d"]["batch_size"] = BATCH
    plans["continue_training"] = False  # as nnunetv2.run.run_training.get_trainer_from_args sets it
    dataset_json = json.loads((prep / "dataset.json").read_text())
    tr = nnUNetTrainer(plans, "2d", 0, dataset_json, device=torch.device("cpu"))
    tr._set_batch_size_and_oversample()  # what tr.initialize() does for the batch size (not DDP)
    # the training half of nnUNetTrainer.get_dataloaders (the validation loader would add a worker)
    patch = tr.configuration_manager.patch_size
    rotation, dummy_2d, initial_patch, mirror_axes = tr.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    transforms = tr.get_training_transforms(
        patch, rotation, tr._get_deep_supervision_scales(), mirror_axes, dummy_2d,
        use_mask_for_norm=tr.configuration_manager.use_mask_for_norm, is_cascaded=tr.is_cascaded,
        foreground_labels=tr.label_manager.foreground_labels,
        regions=tr.label_manager.foreground_regions if tr.label_manager.has_regions else None,
        ignore_label=tr.label_manager.ignore_label)
    dataset_tr, _ = tr.get_tr_and_val_datasets()
    dl = nnUNetDataLoader(dataset_tr, tr.batch_size, initial_patch, patch, tr.label_manager,
                          oversample_foreground_percent=tr.oversample_foreground_percent,
                          sampling_probabilities=None, pad_sides=None, transforms=transforms,
                          probabilistic_oversampling=tr.probabilistic_oversampling)
    gen = NonDetMultiThreadedAugmenter(data_loader=dl, transform=None, num_processes=workers,
                                       num_cached=max(6, workers // 2), seeds=None, pin_memory=False,
                                       wait_time=0.002)

    def next_batch() -> int:
        b = next(gen)
        assert tuple(b["data"].shape[-2:]) == (PATCH, PATCH), b["data"].shape
        return int(b["data"].shape[0])

    out = _loop(next_batch, batches, os.getpid())
    out["channels"] = int(next(gen)["data"].shape[1])
    gen._finish()
    return out


def step_medplan_loader(kind: str, workers: int, batches: int, n: int) -> dict:
    import torch
    from medplan.data import TrainLoader
    torch.set_num_threads(1)
    if kind == "rgb":
        from medplan import pipeline
        plan = pipeline.load_plan(MEDPLAN_NAME)
        data = pipeline.preprocess(MEDPLAN_NAME, num_workers=1, progress=False)  # only checks: arrays exist
        ids = sorted(p.name[:-len("_seg.npy")] for p in data.glob("*_seg.npy"))
        tmp = None
    else:
        from bench_loader import plans, write_cases
        plan = plans(PATCH)["echo (gray)"]
        tmp = tempfile.TemporaryDirectory()
        data = Path(tmp.name)
        ids = write_cases(data, min(n, 64), 1, PATCH)
    loader = TrainLoader(data, ids, plan, batch_size=BATCH, num_workers=workers, device="cpu", seed=0)
    state = {"it": iter(loader)}

    def next_batch() -> int:
        while True:
            try:
                b = next(state["it"])
                break
            except StopIteration:
                state["it"] = iter(loader)
        assert tuple(b["image"].shape[-2:]) == (PATCH, PATCH), b["image"].shape
        return int(b["image"].shape[0])

    out = _loop(next_batch, batches, os.getpid())
    out["channels"] = int(plan.channels)
    loader.close()
    if tmp is not None:
        tmp.cleanup()
    return out


# ----------------------------------------------------------------------------- where medplan's time goes

#: (step, operation, (file suffix, function)) for the per-image breakdown of ``--profile``: the
#: cumulative time of that function in a cProfile of the step run in-process with one worker
PROFILED = [
    ("convert", "find cases, read every mask once (binary or class indices?)", ("datasets/folder.py", "collect")),
    ("convert", "8-bit check of every image header (intensity window)", ("datasets/writer.py", "intensity_window")),
    ("convert", "image: PNG header check + byte copy (or decode + encode)", ("datasets/writer.py", "_write_image")),
    ("convert", "label: PNG header check + byte copy (or decode + encode)", ("datasets/writer.py", "_write_label")),
    ("plan", "read image file + decode it (the one decode)", ("medplan/io.py", "decode_image")),
    ("plan", "decode label", ("medplan/io.py", "read_label")),
    ("plan", "histograms, colour share, corners", ("medplan/casescan.py", "_intensity_evidence")),
    ("plan", "perceptual hash (imagehash phash)", ("medplan/duplicates.py", "perceptual_hash")),
    ("plan", "file digest (SHA-256)", ("medplan/duplicates.py", "bytes_digest")),
    ("plan", "resize image to the input size", ("medplan/preprocessing.py", "prepare_image")),
    ("plan", "resize label", ("medplan/preprocessing.py", "prepare_label")),
    ("plan", "write the two .npy arrays", ("medplan/io.py", "atomic_save_npy")),
    ("plan", "write the case marker .json (and fingerprint/plan files)", ("medplan/io.py", "atomic_write_json")),
    ("plan", "duplicate decisions (incl. pixel digests of shared keys)", ("medplan/duplicates.py", "duplicate_decisions")),
    ("plan", "splits (nearly all of it the sklearn import, which the profiler inflates)",
     ("medplan/splits.py", "make_splits")),
    ("preprocess", "check every case is done (arrays written by plan)", ("medplan/preprocessing.py",
                                                                        "preprocess_dataset")),
]


def step_profile(links: Path, n: int) -> dict:
    """convert + plan + preprocess in this process (one worker) under cProfile: per-image ms of
    each operation of :data:`PROFILED`, and of each step in all (with its imports)."""
    import cProfile
    import pstats
    out: dict = {"ops": [], "steps": {}}
    for step in ("convert", "plan", "preprocess"):
        prof = cProfile.Profile(time.process_time)  # CPU time: wall time on a loaded machine means little
        c0 = time.process_time()
        prof.enable()
        if step == "convert":
            from medplan.datasets import convert_dataset
            convert_dataset("folder", links, MEDPLAN_NAME, workers=1, progress=False, modality="dermoscopy",
                            label_names="background,lesion")
        elif step == "plan":
            from medplan import pipeline
            pipeline.plan(MEDPLAN_NAME, overrides={"input_size": [PATCH, PATCH]}, num_workers=1, progress=False)
        else:
            pipeline.preprocess(MEDPLAN_NAME, num_workers=1, progress=False)
        prof.disable()
        out["steps"][step] = (time.process_time() - c0) * 1000 / n
        stats = pstats.Stats(prof).stats  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}
        for s, what, (suffix, name) in PROFILED:
            if s == step:
                cum = sum(v[3] for k, v in stats.items() if k[2] == name and k[0].endswith(suffix))
                out["ops"].append([step, what, cum * 1000 / n])
    return out


# ----------------------------------------------------------------------------- driver

def env_for(base: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "nnUNet_raw": str(base / "nnUNet_raw"), "nnUNet_preprocessed": str(base / "nnUNet_preprocessed"),
        "nnUNet_results": str(base / "nnUNet_results"), "MEDPLAN_RAW": str(base / "medplan_raw"),
        "MEDPLAN_PREPROCESSED": str(base / "medplan_preprocessed"),
        "MEDPLAN_RESULTS": str(base / "medplan_results"), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1"})
    return env


def bin_of(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def run_nnunet_preprocess(base: Path, env: dict, k: int, log: Path) -> dict:
    shutil.rmtree(base / "nnUNet_preprocessed", ignore_errors=True)
    (base / "nnUNet_preprocessed").mkdir()
    return measured([bin_of("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "2d", "-np", str(k),
                     "-npfp", str(k), "--verify_dataset_integrity"], env, log)


def run_medplan_preprocess(base: Path, links: Path, env: dict, k: int, log: Path) -> dict:
    for d in ("medplan_raw", "medplan_preprocessed"):
        shutil.rmtree(base / d, ignore_errors=True)
    steps = {
        "convert": [bin_of("medplan_convert"), "folder", str(links), "-d", MEDPLAN_NAME, "--modality", "dermoscopy",
                    "--labels", "background,lesion", "--workers", str(k), "--no-progress"],
        "plan": [bin_of("medplan_plan"), "-d", MEDPLAN_NAME, "--set", f"input_size=[{PATCH},{PATCH}]", "-j", str(k),
                 "--no-progress"],
        "preprocess": [bin_of("medplan_preprocess"), "-d", MEDPLAN_NAME, "-j", str(k), "--no-progress"]}
    parts = {name: measured(cmd, env, log) for name, cmd in steps.items()}
    return {"wall": sum(p["wall"] for p in parts.values()), "cpu": sum(p["cpu"] for p in parts.values()),
            "peak": max(p["peak"] for p in parts.values()), "parts": parts}


def run_loader(system: str, base: Path, env: dict, args: argparse.Namespace, log: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "_step", system, "--workers", str(args.workers),
           "--batches", str(args.batches), "--n", str(args.n), "--prep",
           str(base / "nnUNet_preprocessed" / NNUNET_NAME)]
    r = measured(cmd, env, log)
    res = r["result"]
    return {"rate_wall": res["samples"] / res["wall"], "rate_cpu": res["samples"] / max(res["cpu"], 1e-9),
            "peak": r["peak"], "cpu_total": r["cpu"], "wall_total": r["wall"]}


def run_profile(base: Path, links: Path, env: dict, n: int, log: Path) -> dict:
    for d in ("medplan_raw", "medplan_preprocessed"):
        shutil.rmtree(base / d, ignore_errors=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "_step", "profile", "--n", str(n), "--prep", str(links)]
    return measured(cmd, env, log)["result"]


def print_profile(profile: dict, n: int) -> None:
    print()
    print(f"Where medplan's time goes: each step once more in one process (1 worker) under cProfile, "
          f"CPU ms per image ('all': the whole step with its imports / {n} images; the profiler inflates "
          f"Python-heavy work such as imports several times, use the timed runs for totals); "
          f"load average now {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print()
    print("| step | operation | CPU ms per image |")
    print("|---|---|---|")
    for step, what, ms in profile["ops"]:
        print(f"| {step} | {what} | {ms:.2f} |")
    for step, ms in profile["steps"].items():
        print(f"| {step} | all | {ms:.2f} |")


def med(values: list[float], fmt: str) -> str:
    m = statistics.median(values)
    if len(values) == 1:
        return format(m, fmt)
    return f"{format(m, fmt)} [{format(min(values), fmt)}–{format(max(values), fmt)}]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="images (default 200)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2, help="K: processes for both systems (default 2)")
    ap.add_argument("--batches", type=int, default=20, help="measured loader batches of 8 (after 2 warm-up)")
    ap.add_argument("--workdir", type=Path, default=None, help="where the temporary folder goes")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (and its log)")
    ap.add_argument("--preprocess-only", action="store_true", help="skip the loaders")
    ap.add_argument("--profile", action="store_true",
                    help="then medplan's steps once more in one process under cProfile: per-image ms per operation")
    ap.add_argument("--profile-only", action="store_true", help="only the --profile table (no nnU-Net, no rounds)")
    args = ap.parse_args(argv)
    try:
        import nnunetv2  # noqa: F401
        from importlib.metadata import version
        nnunet_version = version("nnunetv2")
    except ImportError:
        print("nnunetv2 is not installed: pip install 'medplan[bench]'", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="vs_nnunet_", dir=args.workdir))
    log = base / "steps.log"
    env = env_for(base)
    load_before = os.getloadavg()
    loads: list[float] = []
    stop_loads = threading.Event()

    def sample_load() -> None:  # the 1-minute load average every 10 s, for "during the run"
        while not stop_loads.wait(10):
            loads.append(os.getloadavg()[0])

    threading.Thread(target=sample_load, daemon=True).start()
    print(f"# {args.n} images ~560x640 RGB PNG, K={args.workers}, {args.rounds} rounds, "
          f"{os.cpu_count()} CPUs, nnunetv2 {nnunet_version}; workdir {base}", flush=True)
    try:
        t = time.perf_counter()
        _, links = make_dataset(base, args.n, args.workers)
        print(f"# dataset written in {time.perf_counter() - t:.1f} s (not timed below)", flush=True)
        if args.profile_only:
            print_profile(run_profile(base, links, env, args.n, log), args.n)
            return 0
        R: dict[str, list[dict]] = {k: [] for k in ("nn_pre", "mp_pre", "nn_load", "mp_rgb", "mp_gray")}
        for r in range(args.rounds):
            first_nn = r % 2 == 0
            order = ("nn", "mp") if first_nn else ("mp", "nn")
            for s in order:
                if s == "nn":
                    R["nn_pre"].append(run_nnunet_preprocess(base, env, args.workers, log))
                else:
                    R["mp_pre"].append(run_medplan_preprocess(base, links, env, args.workers, log))
                x = R["nn_pre" if s == "nn" else "mp_pre"][-1]
                print(f"# round {r + 1}: {s} preprocess {x['wall']:.1f} s wall, {x['cpu']:.1f} CPU-s, "
                      f"{x['peak'] / 2**20:.0f} MB", flush=True)
            for s in order if not args.preprocess_only else ():
                keys = [("nn_load", "nnunet")] if s == "nn" else [("mp_rgb", "medplan-rgb"), ("mp_gray", "medplan-gray")]
                for key, system in keys:
                    R[key].append(run_loader(system, base, env, args, log))
                    x = R[key][-1]
                    print(f"# round {r + 1}: {system} loader {x['rate_wall']:.1f} samples/s wall, "
                          f"{x['rate_cpu']:.1f} per CPU-s, {x['peak'] / 2**20:.0f} MB", flush=True)
        load_after = os.getloadavg()
        profile = run_profile(base, links, env, args.n, log) if args.profile else None
        n = args.n
        rows = []

        def row(what: str, a: list[float], b: list[float], fmt: str, higher_better: bool, unit: str = "") -> None:
            ratio = [(y / x) if higher_better else (x / y) for x, y in zip(a, b)] if a else []
            rows.append(f"| {what} | {med(a, fmt) + unit if a else '—'} | {med(b, fmt)}{unit} | "
                        f"{med(ratio, '.2f') + 'x' if ratio else '—'} |")

        nnp, mpp = R["nn_pre"], R["mp_pre"]
        row(f"plan + preprocess, wall s ({n} images)", [x["wall"] for x in nnp], [x["wall"] for x in mpp], ".1f", False)
        row("plan + preprocess, images/s (wall)", [n / x["wall"] for x in nnp], [n / x["wall"] for x in mpp], ".2f", True)
        row("plan + preprocess, CPU-s (process tree)", [x["cpu"] for x in nnp], [x["cpu"] for x in mpp], ".1f", False)
        row("plan + preprocess, images per CPU-s", [n / x["cpu"] for x in nnp], [n / x["cpu"] for x in mpp], ".2f", True)
        row("plan + preprocess, peak PSS of the tree (MB)", [x["peak"] / 2**20 for x in nnp],
            [x["peak"] / 2**20 for x in mpp], ".0f", False)
        steps = ("convert", "plan", "preprocess")
        parts = " / ".join(f"{k} {statistics.median(p['parts'][k]['cpu'] for p in mpp):.1f}" for k in steps)
        rows.append(f"| medplan CPU-s by step (convert / plan / preprocess) | | {parts} | |")
        walls = " / ".join(f"{k} {statistics.median(p['parts'][k]['wall'] for p in mpp):.1f}" for k in steps)
        rows.append(f"| medplan wall s by step (convert / plan / preprocess) | | {walls} | |")
        per_image = " / ".join(f"{1000 * statistics.median(p['parts'][k]['cpu'] for p in mpp) / n:.1f}" for k in steps)
        rows.append(f"| CPU ms per image by step (convert / plan / preprocess; incl. start-up) | "
                    f"{1000 * statistics.median(x['cpu'] for x in nnp) / n:.1f} | {per_image} | |")
        nl, rgb, gray = R["nn_load"], R["mp_rgb"], R["mp_gray"]
        for label, mine in (("RGB (dermoscopy plan)", rgb), ("gray (echo plan; nnU-Net column: its RGB loader)", gray)):
            if not mine:
                continue
            row(f"loader {label}, samples/s (wall)", [x["rate_wall"] for x in nl], [x["rate_wall"] for x in mine],
                ".1f", True)
            row(f"loader {label}, samples per CPU-s", [x["rate_cpu"] for x in nl], [x["rate_cpu"] for x in mine],
                ".1f", True)
            row(f"loader {label}, peak PSS of the tree (MB)", [x["peak"] / 2**20 for x in nl],
                [x["peak"] / 2**20 for x in mine], ".0f", False)
        print()
        print(f"{n} images ~560x640 RGB PNG, 2 classes; K={args.workers} processes each; loaders {PATCH}x{PATCH}, "
              f"batch {BATCH}, {args.batches} batches after {WARMUP} warm-up; median [range] of {args.rounds} "
              f"rounds; ratio > 1 means medplan is better")
        stop_loads.set()
        during = (f"during: mean {statistics.mean(loads):.2f}, max {max(loads):.2f} (1-min, every 10 s); "
                  if loads else "")
        print(f"load average (1/5/15 min) before {' '.join(f'{x:.2f}' for x in load_before)}, "
              f"after {' '.join(f'{x:.2f}' for x in load_after)}; {during}{os.cpu_count()} CPUs")
        print()
        print(f"| what | nnU-Net v{nnunet_version} | medplan | ratio |")
        print("|---|---|---|---|")
        print("\n".join(rows))
        if profile is not None:
            print_profile(profile, n)
    finally:
        if args.keep:
            print(f"# kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    return 0


def step_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("system", choices=("nnunet", "medplan-rgb", "medplan-gray", "profile"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--prep", type=Path)
    a = ap.parse_args(argv)
    if a.system == "profile":
        out = step_profile(a.prep, a.n)
    elif a.system == "nnunet":
        os.environ["nnUNet_n_proc_DA"] = str(a.workers)
        out = step_nnunet_loader(a.prep, a.workers, a.batches)
    else:
        out = step_medplan_loader(a.system.split("-")[1], a.workers, a.batches, a.n)
    print(MARK + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_step":
        sys.exit(step_main(sys.argv[2:]))
    sys.exit(main())
