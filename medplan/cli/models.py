"""``medplan_models``: the registered architectures, their sizes and (on request) their cost.

The model zoo (and torch) is imported once the arguments are checked, so ``--help`` answers at once.
"""
from __future__ import annotations

import argparse
import json
from typing import Any

from medplan.cli import entry_point
from medplan.errors import MedplanError
from medplan.names import check_names


def _fmt(value: Any, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[dict[str, Any]], flops: bool) -> str:
    """Plain-text table of :func:`describe_models` rows."""
    header = ["name", "params (M)", "trainable (M)", "paper (M)"] + (["GMACs"] if flops else []) + ["source", "description"]
    lines = []
    for r in rows:
        total = None if r["params_total"] is None else r["params_total"] / 1e6
        train = None if r["params_trainable"] is None else r["params_trainable"] / 1e6
        cells = [r["name"], _fmt(total, ".2f"), _fmt(train, ".2f"), _fmt(r["paper_params_m"], ".1f")]
        if flops:
            cells.append(_fmt(r["gmacs"], ".1f"))
        desc = r["description"] + (f"  [error: {r['error']}]" if r["error"] else "")
        lines.append(cells + [r["source"], desc])
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines)]
    numeric = {1, 2, 3} | ({4} if flops else set())

    def row(cells: list[str]) -> str:
        out = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(out[:-1] + [cells[-1]]).rstrip()  # last column unpadded

    return "\n".join([row(header), row(["-" * w for w in widths])] + [row(c) for c in lines])


@entry_point("medplan_models")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medplan_models", description="List the registered architectures.")
    parser.add_argument("names", nargs="*", help="architectures to describe (default: all)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.add_argument("--size", nargs=2, type=int, default=[512, 512], metavar=("H", "W"),
                        help="input size for --flops (default 512 512)")
    parser.add_argument("--in-channels", type=int, default=3, help="input channels (default 3)")
    parser.add_argument("--num-classes", type=int, default=2, help="output channels (default 2)")
    parser.add_argument("--flops", action="store_true", help="count GMACs of one forward at batch 1 (slower)")
    parser.add_argument("--measure", action="store_true",
                        help="time a short training and inference run per architecture on this device "
                             "(images/s, peak GPU memory) and save it to $MEDPLAN_RESULTS/efficiency.json")
    parser.add_argument("--steps", type=int, default=5, help="timed steps for --measure (default 5)")
    parser.add_argument("--batch-size", type=int, default=2, help="batch size for --measure (default 2)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto", help="device for --measure")
    args = parser.parse_args(argv)
    check_names(args.names, "architecture name")
    if min(args.size) < 1:
        raise MedplanError(f"--size must be positive, got {args.size[0]} {args.size[1]}")
    for flag in ("in_channels", "num_classes", "steps", "batch_size"):
        if getattr(args, flag) < 1:
            raise MedplanError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.measure:
        return _measure(args)
    # the model zoo imports torch: only after the arguments are checked
    from medplan.architectures import describe_models

    rows = describe_models(
        args.names or None,
        size=(args.size[0], args.size[1]),
        in_channels=args.in_channels,
        num_classes=args.num_classes,
        flops=args.flops,
    )
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows, args.flops))
        if args.flops:
            print(f"\nGMACs: one forward at batch 1, {args.size[0]}x{args.size[1]}, {args.in_channels} channels")
    return 0


def format_measurements(rows: list[dict[str, Any]]) -> str:
    header = ["name", "train img/s", "infer img/s", "peak GPU mem (MB)", "params (M)"]
    body = [[r["arch"], f"{r['train_images_per_s']:.1f}", f"{r['infer_images_per_s']:.1f}",
             _fmt(r["peak_memory_mb"], ".0f"), f"{r['params_total'] / 1e6:.2f}"] for r in rows]
    widths = [max(len(c) for c in col) for col in zip(header, *body)]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
             for cells in [header, ["-" * w for w in widths]] + body]
    return "\n".join(lines)


def _measure(args: argparse.Namespace) -> int:
    # the model zoo imports torch: only after the arguments are checked
    from medplan.architectures import list_models
    from medplan.architectures.measure import efficiency_path, measure_models  # likewise

    rows = measure_models(args.names or list_models(external=False), size=(args.size[0], args.size[1]),
                          in_channels=args.in_channels, num_classes=args.num_classes, batch_size=args.batch_size,
                          steps=args.steps, device=args.device)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_measurements(rows))
        print(f"\n{rows[0]['device'] if rows else ''}: batch {args.batch_size}, {args.size[0]}x{args.size[1]}, "
              f"{args.steps} timed steps; saved to {efficiency_path()}")
    return 0
