"""Training throughput per architecture, eager against ``torch.compile`` (issue 13, item 4).

Each architecture is set up exactly as a run sets it up (its trainer's ``setup_model``: the
default (paper) network without downloaded weights, channels_last where the trainer chooses it,
fused AdamW on CUDA / foreach elsewhere, the trainer's loss and ``forward_batch``), then
``--warmup`` training steps (the first one includes compilation, reported on its own as
``first step s``) and ``--steps`` timed steps on one random batch already on the device.

Figures per architecture and mode: images/s, the ratio compiled/eager, peak GPU memory
(``torch.cuda.max_memory_allocated`` over set-up, warm-up and timed steps), GMACs of one
forward pass of one image (``FlopCounterMode``, a multiply-add = 1 MAC) and the achieved
TFLOP/s under the usual convention that a training step costs 3 forward passes
(forward + backward for activations and weights) = 6 FLOPs per MAC per image. Frozen parts
(syncsam's SAM encoder) need no weight gradients, so their real cost is lower than 6 x MACs.

Each architecture runs in a child process with a timeout (``--arch-timeout``) inside a total
budget (``--budget``): one that fails, runs out of memory, hangs or crashes prints its error
line and the rest go on; an architecture past the budget is listed as skipped.

Usage::

    python benchmarks/bench_train.py                        # CPU: 128x128, batch 2, both modes
    python benchmarks/bench_train.py --arch unet segformer_b3 --size 96 --json cpu.json
    python benchmarks/bench_train.py --device cuda --json gpu.json   # 512x512, batch 8, bf16

``--device cuda`` defaults: 512x512, batch 8, bf16 autocast, 3 warm-up + 5 timed steps,
at most 120 s per architecture and 330 s in all (``--budget 0``: no limit).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch._dynamo

from medplan.architectures import count_flops, get_entry, list_models
from medplan.io import atomic_write_json
from medplan.plan import make_plan
from medplan.trainers import TrainSettings, get_trainer
from medplan.trainers.schedule import build_scheduler
from medplan.trainers.settings import optimizer_kernel_name

ROW = "ROW "
MODE_FLAGS = {("eager", "compiled"): "--both", ("compiled",): "--compile", ("eager",): "--no-compile"}
DEFAULTS = {  # device type -> size, batch, warmup, steps, arch timeout s, budget s
    "cpu": dict(size=128, batch=2, warmup=2, steps=3, arch_timeout=900.0, budget=0.0),
    "cuda": dict(size=512, batch=8, warmup=3, steps=5, arch_timeout=120.0, budget=330.0),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def trainer_for(arch: str, args: argparse.Namespace, compile_choice: bool | str):
    """The architecture's trainer, set up for training steps (no data, no folder)."""
    plan = make_plan(channels=args.channels, num_classes=args.classes, input_size=[args.size, args.size],
                     batch_size=args.batch)
    settings = TrainSettings(device=args.device, amp=args.amp, compile=compile_choice,
                             channels_last={"auto": None, "on": True, "off": False}[args.channels_last])
    options = {"pretrained": False} if get_entry(arch).pretrained else {}
    trainer = get_trainer(arch)("BENCH", arch, 0, plan=plan, splits=None, output_dir=Path("bench"),
                                settings=settings, model_options=options, lr=1e-4, lr_source="benchmark")
    trainer.setup_model()
    trainer.scheduler = build_scheduler(trainer.optimizer, plan.lr_schedule.name, args.warmup + args.steps)
    return trainer


def random_batch(args: argparse.Namespace, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    image = torch.randn(args.batch, args.channels, args.size, args.size, generator=g)
    seg = torch.randint(0, args.classes, (args.batch, args.size, args.size), generator=g)
    return {"image": image.to(device), "seg": seg.to(device), "case_ids": [f"b{i}" for i in range(args.batch)]}


def measure(arch: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """One architecture in one mode (``eager`` or ``compiled``)."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    trainer = trainer_for(arch, args, args.backend if mode == "compiled" else False)
    row: dict[str, Any] = {"arch": arch, "mode": mode, "channels_last": trainer.channels_last,
                           "optimizer_kernel": optimizer_kernel_name(trainer.optimizer),
                           "amp": None if trainer.amp_dtype is None else str(trainer.amp_dtype).replace("torch.", ""),
                           "params_m": round(sum(p.numel() for p in trainer.model.parameters()) / 1e6, 2)}
    if mode == "eager":  # a property of the network: counted once, on the eager pass
        try:
            row["gmacs"] = round(count_flops(trainer.model, args.channels, (args.size, args.size), device) / 2e9, 3)
        except Exception as exc:  # noqa: BLE001 - a model the counter cannot follow still gets timed
            row["gmacs"] = None
            row["gmacs_error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    batch = random_batch(args, device)
    trainer.model.train()
    t0 = time.perf_counter()
    loss = trainer.train_step(batch)
    _sync(device)
    row["first_step_s"] = round(time.perf_counter() - t0, 3)
    for _ in range(args.warmup - 1):
        trainer.train_step(batch)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = trainer.train_step(batch)
    _sync(device)
    seconds = time.perf_counter() - t0
    row.update(step_ms=round(1000 * seconds / args.steps, 2), images_per_s=round(args.batch * args.steps / seconds, 3),
               loss_finite=bool(torch.isfinite(loss).item()))
    if device.type == "cuda":
        row["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    del trainer, batch, loss
    gc.collect()
    return row


def measure_modes(arch: str, args: argparse.Namespace, emit=None) -> list[dict]:
    """``arch`` in each requested mode; a failing mode is a row with its error, not the end."""
    rows = []
    for mode in args.modes:
        try:
            row = measure(arch, mode, args)
        except Exception as exc:  # noqa: BLE001 - one failing mode is a row, not the end
            row = {"arch": arch, "mode": mode, "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
        rows.append(row)
        if emit is not None:
            emit(row)
        torch._dynamo.reset()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def child(arch: str, args: argparse.Namespace) -> None:
    """Measure ``arch``: one ``ROW {json}`` line per mode as soon as it is done."""
    if args.threads:
        torch.set_num_threads(args.threads)
    measure_modes(arch, args, emit=lambda row: print(ROW + json.dumps(row), flush=True))


def run_isolated(arch: str, argv: list[str], timeout: float) -> list[dict]:
    """``arch`` in a child process of its own (own process group, killed whole on timeout)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", arch, *argv]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    timed_out = False
    try:
        out, err = proc.communicate(timeout=timeout if timeout > 0 else None)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)  # the child and its compile workers
        out, err = proc.communicate()
    rows = [json.loads(line[len(ROW):]) for line in out.splitlines() if line.startswith(ROW)]
    if timed_out:
        rows.append({"arch": arch, "error": f"timed out after {timeout:.0f} s (rows above finished in time)"})
    elif proc.returncode != 0 and not rows:
        last = next((ln for ln in reversed(err.splitlines()) if ln.strip()), "no output")
        rows.append({"arch": arch, "error": f"child exited {proc.returncode}: {last[:300]}"})
    return rows


def print_row_error(row: dict) -> None:
    print(f"  {row['arch']} {row.get('mode', '')}: ERROR {row['error']}", flush=True)


def table(rows: list[dict], modes: list[str], device_type: str) -> str:
    """One line per architecture: eager and compiled side by side, ratio compiled/eager."""
    by = {(r["arch"], r.get("mode")): r for r in rows if "error" not in r}
    archs = list(dict.fromkeys(r["arch"] for r in rows))
    gpu = device_type == "cuda"
    head = ["arch", "params M", "GMACs/img"]
    for m in modes:
        head += [f"{m} img/s", f"{m} first step s"] + ([f"{m} peak GB", f"{m} TFLOP/s"] if gpu else [])
    if len(modes) == 2:
        head.append("compiled/eager")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arch in archs:
        base = by.get((arch, "eager")) or by.get((arch, modes[0])) or {}
        gmacs = base.get("gmacs")
        cells = [arch, _fmt(base.get("params_m")), _fmt(gmacs)]
        for m in modes:
            r = by.get((arch, m))
            if r is None:
                err = next((x["error"] for x in rows if x["arch"] == arch and x.get("mode") in (m, None)
                            and "error" in x), "missing")
                cells += [f"error: {err[:60]}", ""] + (["", ""] if gpu else [])
                continue
            cells += [_fmt(r["images_per_s"]), _fmt(r["first_step_s"])]
            if gpu:
                tflops = 6 * gmacs * r["images_per_s"] / 1e3 if gmacs else None
                cells += [_fmt(r.get("peak_memory_gb")), _fmt(tflops)]
        if len(modes) == 2:
            e, c = by.get((arch, "eager")), by.get((arch, "compiled"))
            cells.append(f"{c['images_per_s'] / e['images_per_s']:.2f}x" if e and c else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    return f"{v:.3g}" if isinstance(v, float) and abs(v) < 100 else (f"{v:.0f}" if isinstance(v, float) else str(v))


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=None, help="architectures (default: every registered one)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--size", type=int, help="input side (cpu 128, cuda 512)")
    p.add_argument("--batch", type=int, help="batch size (cpu 2, cuda 8)")
    p.add_argument("--warmup", type=int, help="untimed steps, the first one compiles (cpu 2, cuda 3)")
    p.add_argument("--steps", type=int, help="timed steps (cpu 3, cuda 5)")
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--classes", type=int, default=2, help="2: binary (BCE), more: cross-entropy")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on CUDA")
    p.add_argument("--channels-last", default="auto", choices=("auto", "on", "off"),
                   help="auto: the trainer's rule (CUDA and convolutions >= 80%% of FLOPs)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled mode")
    modes = p.add_mutually_exclusive_group()
    modes.add_argument("--both", dest="modes", action="store_const", const=["eager", "compiled"])
    modes.add_argument("--compile", dest="modes", action="store_const", const=["compiled"])
    modes.add_argument("--no-compile", dest="modes", action="store_const", const=["eager"])
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--arch-timeout", type=float, help="seconds per architecture (cpu 900, cuda 120)")
    p.add_argument("--budget", type=float, help="seconds in all, 0 = none (cpu 0, cuda 330)")
    p.add_argument("--json", type=Path, help="write every row and the run's facts here")
    p.add_argument("--in-process", action="store_true", help="no child processes (debugging)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.modes = args.modes or ["eager", "compiled"]
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.size, args.batch, args.warmup, args.steps) < 1:
        p.error("--size, --batch, --warmup and --steps must be >= 1")
    names = list_models(external=False)  # nnunetv2: nnU-Net builds its network, not medplan
    unknown = [a for a in args.arch or [] if a not in names]
    if unknown:
        p.error(f"unknown architecture(s) {', '.join(unknown)} (available: {', '.join(names)})")
    forwarded = ["--device", args.device, "--size", str(args.size), "--batch", str(args.batch),
                 "--warmup", str(args.warmup), "--steps", str(args.steps), "--channels", str(args.channels),
                 "--classes", str(args.classes), "--amp" if args.amp else "--no-amp",
                 "--channels-last", args.channels_last, "--backend", args.backend, "--threads", str(args.threads),
                 MODE_FLAGS[tuple(args.modes)]]
    return args, forwarded


def main(argv: list[str] | None = None) -> int:
    args, forwarded = parse(argv)
    if args.child:
        child(args.child, args)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    archs = args.arch or list_models(external=False)
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or platform.machine()
    facts = {"device": name,
             "torch": torch.__version__, "size": args.size, "batch": args.batch, "warmup": args.warmup,
             "steps": args.steps, "amp": args.amp and args.device == "cuda", "backend": args.backend,
             "channels_last": args.channels_last, "threads": args.threads or torch.get_num_threads(),
             "cpus": os.cpu_count(), "load_before": os.getloadavg()}
    print(f"bench_train: {facts}", flush=True)
    rows: list[dict] = []
    start = time.monotonic()
    for arch in archs:
        left = args.budget - (time.monotonic() - start) if args.budget > 0 else float("inf")
        if left <= 0:
            rows.append({"arch": arch, "error": "skipped: --budget spent"})
            print_row_error(rows[-1])
            continue
        t0 = time.monotonic()
        if args.in_process:
            child_rows = measure_modes(arch, args)
        else:
            child_rows = run_isolated(arch, forwarded, min(args.arch_timeout, left))
        for r in child_rows:
            if "error" in r:
                print_row_error(r)
            else:
                print(f"  {arch} {r['mode']}: {r['images_per_s']:.3g} img/s, first step {r['first_step_s']:.1f} s"
                      + (f", peak {r['peak_memory_gb']:.2f} GB" if "peak_memory_gb" in r else ""), flush=True)
        print(f"  ({arch}: {time.monotonic() - t0:.0f} s)", flush=True)
        rows += child_rows
    facts["load_after"] = os.getloadavg()
    facts["wall_s"] = round(time.monotonic() - start, 1)
    print(f"\nload average before {facts['load_before']}, after {facts['load_after']}; {facts['wall_s']} s in all")
    print(table(rows, args.modes, args.device))
    if args.json:
        atomic_write_json(args.json, {"format": "medplan-bench-train-1", "facts": facts, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
