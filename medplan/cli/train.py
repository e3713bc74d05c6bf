"""medplan_train DATASET ARCH FOLD: train one fold of one architecture (the paper's protocol).

Command-line flags override the plan for this run only; the run's exact settings go to
config.json in the fold folder. One process trains a fold at a time (``fold_K/.lock``, see
medplan.locks): a second one is refused at once, ``--force`` included. An interrupted run is
resumed with ``--continue`` or started over with ``--force``, never deleted otherwise.

Before a run folder is written, a short probe estimates the run's peak memory and time per
epoch (medplan.trainers.budget) and refuses a run that will not fit (``--skip-memory-check``).

Arguments and names are checked before torch and the library are imported (the library's
imports are function-local for that reason), so ``--help`` and a typo answer at once.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable

from medplan.catalog import check_architectures
from medplan.cli import entry_point
from medplan.errors import MedplanError
from medplan.names import check_fold, check_name


def parse_model_options(items: list[str] | None) -> dict:
    """``key=value`` pairs; values are read as JSON where they parse (numbers, true, null, lists)."""
    options: dict = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MedplanError(f"--model-opt expects key=value, got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by medplan_train and medplan_tune."""
    parser.add_argument("--batch-size", type=int, help="global batch size (default: plan)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto")
    parser.add_argument("--no-amp", action="store_true", help="no mixed precision on GPU")
    parser.add_argument("--seed", type=int, help="random seed (default 12345)")
    parser.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower)")
    parser.add_argument("--num-workers", type=int, help="data loading workers")
    parser.add_argument("--num-gpus", type=int, default=1,
                        help="data-parallel processes (relaunches through torchrun; with --device cpu: gloo)")
    parser.add_argument("--checkpoint-every", type=int, help="write checkpoint_latest.pt every N epochs (default 1)")
    parser.add_argument("--model-opt", action="append", metavar="KEY=VALUE", help="option for the model builder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar, even on a terminal")
    parser.add_argument("--force", action="store_true",
                        help="start over a finished or interrupted run (deletes its results; never a running one: "
                             "the fold's lock refuses a second run)")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", metavar="PATH",
                         help="ImageNet weights file for the encoder (default for models with pretrained weights: "
                              "the documented file in $MEDPLAN_WEIGHTS)")
    weights.add_argument("--no-pretrained", action="store_true", help="train from scratch (random initialisation)")
    parser.add_argument("--allow-partial", action="store_true",
                        help="accept a weights file that covers only part of the encoder (the report lists the rest)")
    parser.add_argument("--compile", action="store_true", help="wrap the training forward in torch.compile")
    parser.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard event files")
    parser.add_argument("--skip-memory-check", action="store_true",
                        help="start without the probe that estimates peak memory and time and refuses a run "
                             "that will not fit")


def run_overrides(args: argparse.Namespace) -> dict:
    return {"batch_size": args.batch_size, "device": args.device, "amp": False if args.no_amp else None,
            "seed": args.seed, "deterministic": args.deterministic or None, "num_workers": args.num_workers,
            "checkpoint_every": args.checkpoint_every, "progress": False if args.no_progress else None,
            "force": args.force or None, "compile": True if args.compile else None,
            "tensorboard": False if args.no_tensorboard else None}


def check_run_arguments(args: argparse.Namespace) -> None:
    """The numbers of the shared flags, checked before anything heavy is imported."""
    for flag, low in (("batch_size", 1), ("epochs", 1), ("checkpoint_every", 1), ("num_workers", 0),
                      ("num_gpus", 1)):
        value = getattr(args, flag, None)
        if value is not None and value < low:
            raise MedplanError(f"--{flag.replace('_', '-')} must be >= {low}, got {value}")
    lr = getattr(args, "lr", None)
    if lr is not None and not lr > 0:
        raise MedplanError(f"--lr must be a positive number, got {lr:g}")


def check_plan(dataset: str) -> None:
    """A dataset never planned (or a broken plans.json) answered before torch is imported; the
    trainer reads the plan again when it starts."""
    from medplan.stagefiles import load_plan  # numpy and JSON, not torch: after the arguments are checked

    load_plan(dataset)


def weight_options(args: argparse.Namespace, arch: str, model_options: dict) -> dict:
    """The run's ``pretrained``/``allow_partial`` model options from ``--pretrained PATH``,
    ``--no-pretrained`` and ``--allow-partial``."""
    options = dict(model_options)
    flag = (os.path.abspath(os.path.expanduser(args.pretrained)) if args.pretrained is not None
            else (False if args.no_pretrained else None))  # an absolute path in config.json
    if flag is not None and "pretrained" in options and options["pretrained"] != flag:
        raise MedplanError("--model-opt pretrained=... contradicts --pretrained/--no-pretrained; give one of them")
    # the model registry imports torch: only after the arguments are checked
    from medplan.architectures import get_entry, is_model

    has_weights = is_model(arch) and get_entry(arch).pretrained  # an unknown name fails later, listing the known
    if flag is not None:
        options["pretrained"] = flag  # unset: medplan.trainers.prepare defaults to the ImageNet weights
    if args.allow_partial:
        if is_model(arch) and not has_weights:
            raise MedplanError(f"--allow-partial: architecture {arch!r} loads no pretrained weights")
        options["allow_partial"] = True
    return options


def strip_num_gpus(argv: list[str]) -> list[str]:
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        if item == "--num-gpus":
            skip = True
            continue
        if item.startswith("--num-gpus="):
            continue
        out.append(item)
    return out


def maybe_relaunch(args: argparse.Namespace, argv: list[str], module: str, check=None) -> int | None:
    """Relaunch through torchrun when ``--num-gpus N > 1`` and not already under torchrun.

    ``check()`` runs first, so bad input is one error from this process, not one per rank."""
    if args.num_gpus < 1:
        raise MedplanError(f"--num-gpus must be >= 1, got {args.num_gpus}")
    if args.num_gpus == 1 or "WORLD_SIZE" in os.environ:
        return None
    import torch  # noqa: PLC0415 -- torch only once the arguments are checked

    # the distributed helpers import torch: only after the arguments are checked
    from medplan.trainers.distributed import relaunch_with_torchrun

    if args.device != "cpu":
        available = torch.cuda.device_count()
        if available < args.num_gpus:
            raise MedplanError(f"--num-gpus {args.num_gpus}: only {available} CUDA device(s) visible "
                               "(use --device cpu for a CPU test run)")
    if check is not None:
        check()
    return relaunch_with_torchrun(args.num_gpus, module, strip_num_gpus(argv))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medplan_train", description=__doc__.splitlines()[0])
    p.add_argument("dataset", help="dataset name (preprocessed with medplan_preprocess)")
    p.add_argument("arch", help="architecture name (see medplan_models)")
    p.add_argument("fold", help="fold 0..n-1, or 'all' (train on every case, no validation)")
    p.add_argument("--continue", dest="continue_training", action="store_true",
                   help="resume from checkpoint_latest.pt (a finished run is left as it is; a run killed before "
                        "its first checkpoint restarts with the settings its config.json recorded)")
    p.add_argument("--lr", type=float, help="learning rate (default: lr_search.json, else the plan)")
    p.add_argument("--epochs", type=int, help="epoch budget (default: the plan's, per stage)")
    p.add_argument("--stage", choices=("cv", "lr_search"), default="cv",
                   help="cv: ARCH/fold_K; lr_search: ARCH/lr_search/lr_X/fold_K with the LR-search budget")
    add_run_arguments(p)
    return p


def check_budget(args: argparse.Namespace, trainer, *, epochs: int | None = None, runs: int = 1,
                 continue_training: bool = False) -> None:
    """The memory and time estimate before a run (medplan.trainers.budget), unless
    ``--skip-memory-check``; under torchrun the launching process has made it already."""
    if args.skip_memory_check or "WORLD_SIZE" in os.environ:
        return
    # the probe imports torch: only after the arguments are checked
    from medplan.trainers.budget import check_run_budget

    check_run_budget(trainer, processes=args.num_gpus, epochs=epochs, runs=runs,
                     continue_training=continue_training)


def launch(args: argparse.Namespace, argv: list[str], module: str, overrides: dict, model_options: dict,
           budget: Callable[[Any], None] | None = None) -> int | None:
    """Check the run (one clean error instead of one per process) and, with ``budget(trainer)``,
    its memory, then relaunch under torchrun for ``--num-gpus N``; returns the exit code if
    relaunched, None to run here."""
    # the trainers import torch: only after the arguments are checked
    from medplan.trainers import prepare

    def check() -> None:
        trainer = prepare(args.dataset, args.arch, args.fold, overrides=overrides, model_options=model_options)
        if budget is not None:
            budget(trainer)

    return maybe_relaunch(args, argv, module, check)


@entry_point("medplan_train")
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    check_name(args.dataset, "dataset name")
    check_architectures([args.arch])  # an unknown name answered before torch is imported
    check_fold(args.fold)
    check_run_arguments(args)
    check_plan(args.dataset)
    overrides = {**run_overrides(args), "lr": args.lr, "epochs": args.epochs, "stage": args.stage}
    model_options = weight_options(args, args.arch, parse_model_options(args.model_opt))

    def budget(trainer) -> None:
        check_budget(args, trainer, continue_training=args.continue_training)

    code = launch(args, argv, "medplan.cli.train", overrides, model_options, budget)
    if code is not None:
        return code
    # the trainers import torch: only after the arguments are checked
    from medplan.trainers import prepare
    from medplan.trainers.distributed import cleanup  # likewise

    try:
        trainer = prepare(args.dataset, args.arch, args.fold, overrides=overrides, model_options=model_options)
        budget(trainer)
        trainer.run(args.continue_training)
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    main()
