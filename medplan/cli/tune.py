"""medplan_tune DATASET ARCH: the LR search of the paper (each LR of the grid on fold 0).

Writes ARCH/lr_search.json; medplan_train then uses its best LR unless --lr is given.
"""
from __future__ import annotations

import argparse
import os
import sys

from medplan.cli import entry_point
from medplan.names import check_name
from medplan.cli.train import add_run_arguments, launch, parse_model_options, run_overrides, weight_options
from medplan.trainers import tune
from medplan.trainers.distributed import cleanup


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medplan_tune", description=__doc__.splitlines()[0])
    p.add_argument("dataset")
    p.add_argument("arch")
    p.add_argument("--lrs", type=float, nargs="+", help="learning rates to try (default: the plan's lr_grid)")
    p.add_argument("--epochs", type=int, help="epochs per LR (default: plan epochs.lr_search)")
    p.add_argument("--fold", type=int, default=0, help="fold to validate on (default 0)")
    add_run_arguments(p)
    return p


@entry_point("medplan_tune")
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    check_name(args.dataset, "dataset name")
    check_name(args.arch, "architecture name")
    overrides = {k: v for k, v in run_overrides(args).items() if k != "force"}
    model_options = weight_options(args, args.arch, parse_model_options(args.model_opt))

    code = launch(args, argv, "medplan.cli.tune", overrides, model_options)
    if code is not None:
        return code
    try:
        result = tune(args.dataset, args.arch, lrs=args.lrs, epochs=args.epochs, fold=args.fold,
                      overrides=overrides, model_options=model_options, force=args.force)
    finally:
        cleanup()
    if int(os.environ.get("RANK", "0")) == 0:
        for lr, miou in result["results"].items():
            print(f"lr {lr}: best val mIoU {miou:.4f}")
        print(f"best lr: {result['best_lr']:g} -> {args.dataset}/{args.arch}/lr_search.json")
    return 0


if __name__ == "__main__":
    main()
