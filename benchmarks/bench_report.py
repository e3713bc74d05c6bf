"""Web-report generation time (issue 14): 3 datasets x 14 architectures x 5 folds of synthetic results.

The tree (``medplan.report.synthetic``) has everything the report reads: per-fold summaries
with per-case values, metrics.jsonl, validation label maps and raw images (worst-case strips),
an LR search, fingerprint/duplicates, a Grad-CAM output and efficiency rows. Target: a full
build under 30 s on 2 cores. Then two rebuilds, head to head in the same run:

- ``no change``: every figure, picture and paired comparison is reused (only the page is rewritten);
- ``one fold changed``: one fold's summary.json of one model is edited; only the figures and
  comparisons whose data changed are redone.

Each line gives wall time and the CPU time of this process and its workers (``getrusage``),
which stays meaningful on a machine shared with other jobs; the 1-minute load average is printed.

Usage: ``python benchmarks/bench_report.py [--archs 14] [--datasets 3] [--workers N]
[--screenshot docs/report.png]``
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from medplan.io import atomic_write_json, read_json
from medplan.report import build_report
from medplan.report.synthetic import make_results_tree

#: registered names, so the screenshot reads like a real study (the numbers are synthetic)
ARCHS = ("unet", "nnunet_2d", "segformer_b3", "segnext_l", "internimage_t", "transnext_t", "vwformer_mit_b3",
         "hiformer_b", "missformer", "ukan_l", "swin_umamba", "syncsam", "llm4seg", "nnunetv2")
DATASETS = (("CAMUS", ("LV", "LV wall", "LA")), ("ISIC2018", ("lesion",)), ("NeoPolyp", ("neoplastic", "non-neoplastic")))


def cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(label: str, fn) -> dict:
    c0, t0 = cpu_seconds(), time.perf_counter()
    fn()
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    print(f"{label:<28} {wall:7.2f} s wall  {cpu:7.2f} s CPU", flush=True)
    return {"wall": wall, "cpu": cpu}


def screenshot(index: Path, out: Path) -> None:
    """A PNG of the page's top (headless chromium, if installed)."""
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if browser is None:
        print("no chromium: no screenshot")
        return
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                        "--hide-scrollbars", f"--screenshot={out.resolve()}", "--window-size=1280,1500",
                        index.as_uri()], check=True, capture_output=True, timeout=120)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", type=int, default=len(ARCHS), help="architectures (default: %(default)s)")
    ap.add_argument("--datasets", type=int, default=len(DATASETS), help="datasets (default: %(default)s)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--cases", type=int, default=8, help="validation cases per fold (default: %(default)s)")
    ap.add_argument("--epochs", type=int, default=60, help="epochs in each metrics.jsonl (default: %(default)s)")
    ap.add_argument("--workers", type=int, default=None, help="figure processes (default: one per CPU)")
    ap.add_argument("--screenshot", type=Path, help="also save a screenshot of the report here (e.g. docs/report.png)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for sub, var in (("raw", "MEDPLAN_RAW"), ("pre", "MEDPLAN_PREPROCESSED"), ("results", "MEDPLAN_RESULTS")):
            os.environ[var] = str(tmp / sub)
        datasets, archs = DATASETS[:args.datasets], ARCHS[:args.archs]
        t0 = time.perf_counter()
        make_results_tree(tmp / "results", raw=tmp / "raw", preprocessed=tmp / "pre", datasets=datasets, archs=archs,
                          n_folds=args.folds, cases_per_fold=args.cases, epochs=args.epochs, size=64,
                          missing=[(datasets[0][0], archs[-1], 3)], absent=[(datasets[0][0], archs[0], 2, "LA")])
        print(f"synthetic tree: {len(datasets)} datasets x {len(archs)} architectures x {args.folds} folds "
              f"({time.perf_counter() - t0:.1f} s); {os.cpu_count()} CPUs, load average "
              f"{os.getloadavg()[0]:.2f}", flush=True)
        root = tmp / "results"
        full = timed("full build", lambda: build_report(root, incremental=False, num_workers=args.workers))
        same = timed("rebuild, no change", lambda: build_report(root, num_workers=args.workers))
        path = root / datasets[0][0] / archs[0] / "fold_0" / "validation" / "summary.json"
        summary = read_json(path)
        summary["mDSC"] -= 0.01
        first = next(iter(summary["per_case"]))
        summary["per_case"][first]["mDSC"] -= 0.05
        atomic_write_json(path, summary)
        one = timed("rebuild, one fold changed", lambda: build_report(root, num_workers=args.workers))
        last = read_json(root / "report" / "cache.json")["last_build"]
        n_fig = len(read_json(root / "report" / "figures" / "manifest.json"))
        print(f"  redrew {len(last['figures_drawn'])} of {n_fig} figures ({', '.join(last['figures_drawn'])}), "
              f"recomputed {last['comparisons_computed']} paired comparisons")
        print(f"rebuild / full: no change {same['wall'] / full['wall']:.2f}x, one fold {one['wall'] / full['wall']:.2f}x"
              f" (wall); load average now {os.getloadavg()[0]:.2f}")
        if args.screenshot:
            screenshot(root / "report" / "index.html", args.screenshot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
