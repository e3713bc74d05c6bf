"""medplan_demo: synthetic CAMUS-layout data through convert -> plan -> preprocess -> train -> evaluate."""
from __future__ import annotations

import argparse
import sys

from medplan.catalog import check_architectures
from medplan.cli import entry_point
from medplan.errors import MedplanError

TARGET_MDSC = 0.80


@entry_point("medplan_demo")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medplan_demo", description=__doc__)
    parser.add_argument("--root", help="put downloads, raw, preprocessed and results under this folder "
                                       "(default: the MEDPLAN_* folders, ~/medplan_data when unset)")
    parser.add_argument("--patients", type=int, default=24, help="synthetic patients (4 images each; default 24)")
    parser.add_argument("--epochs", type=int, default=25, help="training epochs (default 25)")
    parser.add_argument("--arch", default="unet_small", help="architecture (default unet_small)")
    parser.add_argument("--input-size", type=int, default=128, help="planned input size (default 128)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    check_architectures([args.arch])  # an unknown name answered before torch is imported
    for flag in ("patients", "epochs", "input_size"):
        if getattr(args, flag) < 1:
            raise MedplanError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    # the demo trains (torch): imported only after the arguments are checked
    from medplan.demo import run_demo

    summary = run_demo(args.root, n_patients=args.patients, epochs=args.epochs, arch=args.arch,
                       input_size=args.input_size, device=args.device, progress=not args.no_progress)
    if summary["mDSC"] < TARGET_MDSC:
        print(f"medplan_demo: validation mDSC {summary['mDSC']:.3f} is below the demo's target {TARGET_MDSC}",
              file=sys.stderr)
        return 1
    print(f"medplan_demo: OK (validation mDSC {summary['mDSC']:.3f} >= {TARGET_MDSC})")
    return 0
