"""Swin-UMamba training step against U-Net: time and peak memory (issue 13, item 5).

Without mamba-ssm the selective scan runs in PyTorch (:mod:`medplan.architectures.selective_scan`);
this measures whether that makes ``swin_umamba`` usable: a training step (forward, cross-entropy,
backward, AdamW step) at batch 8, 1 input channel, 4 classes, for ``unet`` and ``swin_umamba``
built through the registry without pretrained weights. Target on CPU at 128x128 and 256x256:
within 3x of ``unet``'s step time and 4x of its peak memory.

Every (model, size) runs in a fresh subprocess so that memory peaks do not mix: one warm-up step,
then ``--steps`` timed steps (median reported), wall-clock and process CPU time (the steadier
figure on a shared machine). Peak memory on CPU is the process's peak RSS
(``getrusage``; the number in brackets is that peak minus the RSS after the model was built, i.e.
what training itself costs); on CUDA it is ``torch.cuda.max_memory_allocated`` with bf16 autocast.

Usage::

    python benchmarks/bench_swin_umamba.py                       # CPU, sizes 128 256, batch 8
    python benchmarks/bench_swin_umamba.py --sizes 128 --steps 2 --threads 1
    python benchmarks/bench_swin_umamba.py --device cuda         # GPU: bf16 autocast
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

MODELS = ("unet", "swin_umamba")


def _rss_mb() -> float:
    """Peak RSS of this process so far in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(model_name: str, size: int, batch: int, steps: int, device: str, threads: int | None) -> dict:
    """One (model, size) in this process: warm-up step, then timed steps; returns the figures."""
    import torch

    from medplan.architectures import build_model

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    model = build_model(model_name, 1, 4, pretrained=False).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 1, size, size, device=dev)
    y = torch.randint(0, 4, (batch, size, size), device=dev)
    cuda = dev.type == "cuda"
    rss_built = _rss_mb()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    cpu_times: list[float] = []

    def step() -> float:
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            out = model(x)
            loss = torch.nn.functional.cross_entropy(out.float(), y)
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        cpu_times.append(time.process_time() - c0)
        return time.perf_counter() - t0

    warm = step()
    times = [step() for _ in range(steps)] or [warm]  # --steps 0: the warm-up step alone
    res = {"model": model_name, "size": size, "batch": batch, "device": device, "warmup_s": warm,
           "step_s": statistics.median(times), "steps": times,
           "cpu_s": statistics.median(cpu_times[1:] or cpu_times),
           "threads": torch.get_num_threads()}
    if cuda:
        res["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        res["peak_mb"] = _rss_mb()
        res["step_mb"] = res["peak_mb"] - rss_built
    return res


def run_config(model_name: str, size: int, args: argparse.Namespace) -> dict:
    """The worker in a fresh interpreter, so each peak is its own."""
    cmd = [sys.executable, __file__, "--worker", model_name, "--sizes", str(size), "--batch", str(args.batch),
           "--steps", str(args.steps), "--device", args.device]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"model": model_name, "size": size, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step (0: time the warm-up step)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.sizes[0], args.batch, args.steps, args.device, args.threads)))
        return 0
    mem = "peak GPU MB (max_memory_allocated)" if args.device.startswith("cuda") else "peak RSS MB (step only)"
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    rows = []
    for size in args.sizes:
        res = {m: run_config(m, size, args) for m in args.models}
        for m, r in res.items():
            print(f"  {m} {size}: {json.dumps(r)}", file=sys.stderr, flush=True)
        rows.append((size, res))
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"\n{args.device}, batch {args.batch}, threads {args.threads or 'default'}, median of {args.steps} steps "
          "after one warm-up\n")
    print(f"| size | model | step s (wall) | step CPU-s | {mem} | time vs unet (wall / CPU) | memory vs unet |")
    print("|---|---|---|---|---|---|---|")
    for size, res in rows:
        base = res.get("unet", {})
        for m, r in res.items():
            if "error" in r:
                print(f"| {size} | {m} | failed: {r['error']} | | | | |")
                continue
            step_mb = f" ({r['step_mb']:.0f})" if "step_mb" in r else ""
            t_ratio = (f"{r['step_s'] / base['step_s']:.2f}x / {r['cpu_s'] / base['cpu_s']:.2f}x"
                       if "step_s" in base else "-")
            m_ratio = f"{r['peak_mb'] / base['peak_mb']:.2f}x" if "peak_mb" in base else "-"
            print(f"| {size} | {m} | {r['step_s']:.2f} | {r['cpu_s']:.2f} | {r['peak_mb']:.0f}{step_mb} | {t_ratio} "
                  f"| {m_ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
