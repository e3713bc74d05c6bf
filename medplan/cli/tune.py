"""medplan_tune DATASET ARCH: the LR search of the paper (each LR of the grid on fold 0).

Writes ARCH/lr_search.json; medplan_train then uses its best LR unless --lr is given.
Arguments and names are checked before torch and the library are imported.
"""
from __future__ import annotations

import argparse
import os
import sys

from medplan.catalog import check_architectures
from medplan.cli import entry_point
from medplan.cli.train import (add_run_arguments, check_budget, check_plan, check_run_arguments, launch,
                               parse_model_options, run_overrides, weight_options)
from medplan.errors import MedplanError
from medplan.names import check_name


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
    check_architectures([args.arch])  # an unknown name answered before torch is imported
    check_run_arguments(args)
    if args.fold < 0:
        raise MedplanError(f"--fold must be >= 0, got {args.fold}")
    if args.lrs and any(not lr > 0 for lr in args.lrs):
        raise MedplanError(f"learning rates must be positive, got {args.lrs}")
    check_plan(args.dataset)
    overrides = {k: v for k, v in run_overrides(args).items() if k != "force"}
    model_options = weight_options(args, args.arch, parse_model_options(args.model_opt))

    def budget(trainer) -> None:  # one estimate for the whole grid: every LR trains the same network
        check_budget(args, trainer, epochs=args.epochs or trainer.plan.epochs.lr_search,
                     runs=len(args.lrs or trainer.plan.lr_grid))

    code = launch(args, argv, "medplan.cli.tune", overrides, model_options, budget)
    if code is not None:
        return code
    # the trainers import torch: only after the arguments are checked
    from medplan.trainers import prepare, tune
    from medplan.trainers.distributed import cleanup  # likewise

    try:
        if not args.skip_memory_check:
            budget(prepare(args.dataset, args.arch, args.fold, overrides=overrides, model_options=model_options))
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
