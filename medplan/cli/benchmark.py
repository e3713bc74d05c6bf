"""``medplan_benchmark``: the whole study (LR search -> 5-fold CV -> report) as one command.

    medplan_benchmark -d CAMUS ISIC2018 -a unet segformer_b3          # local executor
    medplan_benchmark -d CAMUS -a unet --executor slurm --partition gpu --gpus-per-job 1
    medplan_benchmark --status                                         # the study of $MEDPLAN_RESULTS
    medplan_benchmark --dry-run                                        # jobs + GPU-hour estimate

The first call writes ``$MEDPLAN_RESULTS/study.json``; later calls need no arguments and
rerunning finishes the study without redoing finished work.

A fold trained with other settings than the study's (plan, LR, epochs, batch size or model
options in its config.json) is stale: --status and --dry-run list it, it never counts as
complete, and a run refuses until --rerun-stale (retrain it, replacing its results) is given.

The study (and torch) is imported once the arguments are checked, so --help answers at once.
"""
from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from medplan.catalog import check_architectures
from medplan.cli import entry_point
from medplan.cli.train import parse_model_options
from medplan.errors import MedplanError
from medplan.names import check_names

if TYPE_CHECKING:  # annotations only: the study is imported after the arguments are checked
    from medplan.study import Study


def _model_options(items: list[str] | None, archs: list[str]) -> dict[str, dict]:
    """``ARCH:key=value`` (one architecture) or ``key=value`` (every architecture of the study)."""
    out: dict[str, dict] = {}
    for item in items or []:
        head, sep, rest = item.partition(":")
        if sep and "=" not in head:
            out.setdefault(head, {}).update(parse_model_options([rest]))
        else:
            for a in archs:
                out.setdefault(a, {}).update(parse_model_options([item]))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medplan_benchmark", description=__doc__.split("\n\n")[0].split(": ", 1)[-1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--datasets", nargs="+", help="preprocessed datasets (default: the study's)")
    p.add_argument("-a", "--archs", nargs="+", help="architectures (default: the study's)")
    p.add_argument("--folds", nargs="+", type=int, help="folds to run (default: every fold of splits.json)")
    p.add_argument("--status", action="store_true", help="print the state of every job and exit")
    p.add_argument("--dry-run", action="store_true", help="list the jobs and a GPU-hour estimate; submit nothing")
    p.add_argument("--no-wait", action="store_true", help="slurm: submit and return (rerun or --status later)")
    p.add_argument("--rerun-stale", action="store_true",
                   help="retrain folds trained with other settings than the study's (replaces their results)")
    g = p.add_argument_group("protocol (default: the plan's)")
    g.add_argument("--lrs", nargs="+", type=float, help="LR grid of the search")
    g.add_argument("--no-lr-search", action="store_true", help="train the folds at the plan's LR")
    g.add_argument("--epochs-lr-search", type=int, help="epochs of each LR-search run")
    g.add_argument("--epochs", type=int, help="epochs of each cross-validation fold")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"))
    g.add_argument("--num-workers", type=int)
    g.add_argument("--no-amp", action="store_true")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the training forward of every job (kept in study.json)")
    g.add_argument("--model-opt", action="append", metavar="[ARCH:]KEY=VALUE", help="model builder option")
    g.add_argument("--measure-steps", type=int, help="timed steps per architecture for the efficiency table")
    e = p.add_argument_group("execution")
    e.add_argument("--executor", choices=("local", "slurm", "inline"), help="where jobs run (default: local)")
    e.add_argument("--retries", type=int, help="resubmissions of a failed job (default 2)")
    e.add_argument("--poll", type=float, default=10.0, help="seconds between queue checks (default 10)")
    e.add_argument("--partition")
    e.add_argument("--gpus-per-job", type=int)
    e.add_argument("--cpus-per-job", type=int)
    e.add_argument("--mem-gb", type=float)
    e.add_argument("--time", type=int, dest="time_min", metavar="MINUTES", help="time limit per job")
    e.add_argument("--array-parallelism", type=int)
    e.add_argument("--account")
    e.add_argument("--qos")
    return p


def check_arguments(args: argparse.Namespace) -> None:
    """Names and numbers, before the study (and torch) is imported."""
    if bool(args.datasets) != bool(args.archs):
        raise MedplanError("give both --datasets and --archs for a new study, or neither to use the saved one")
    check_names(args.datasets or [], "dataset name")
    check_architectures(args.archs or [])  # an unknown name answered before torch is imported
    for flag in ("epochs_lr_search", "epochs", "measure_steps", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise MedplanError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.folds and min(args.folds) < 0:
        raise MedplanError(f"--folds must be >= 0, got {min(args.folds)}")
    for item in args.model_opt or []:
        head, sep, rest = item.partition(":")
        if sep and "=" not in head:
            check_architectures([head])
            parse_model_options([rest])
        else:
            parse_model_options([item])


def make_study(args: argparse.Namespace) -> "Study":
    """A new study from -d/-a (keeping the job records of an existing one), or the saved one."""
    # the study imports torch and pandas: only after the arguments are checked
    from medplan.study import SlurmOptions, Study, load_study, study_path

    if bool(args.datasets) != bool(args.archs):
        raise MedplanError("give both --datasets and --archs for a new study, or neither to use the saved one")
    if args.datasets:
        check_names(args.datasets, "dataset name")
        check_names(args.archs, "architecture name")
        old = load_study() if study_path().is_file() else None
        study = Study(datasets=list(dict.fromkeys(args.datasets)), archs=list(dict.fromkeys(args.archs)))
        if old is not None:
            study.jobs = old.jobs
    else:
        study = load_study()
    settings = {"folds": args.folds, "executor": args.executor, "lrs": args.lrs, "retries": args.retries,
                "epochs_lr_search": args.epochs_lr_search, "epochs_cv": args.epochs,
                "measure_steps": args.measure_steps}
    for k, v in settings.items():
        if v is not None:
            setattr(study, k, v)
    if args.no_lr_search:
        study.lr_search = False
    study.rerun_stale = bool(args.rerun_stale)  # a choice of this call, never inherited from the saved study
    overrides = {"batch_size": args.batch_size, "device": args.device, "num_workers": args.num_workers,
                 "amp": False if args.no_amp else None, "compile": True if args.compile else None}
    study.overrides.update({k: v for k, v in overrides.items() if v is not None})
    for arch, opts in _model_options(args.model_opt, study.archs).items():
        study.model_options.setdefault(arch, {}).update(opts)
    for name in ("partition", "gpus_per_job", "cpus_per_job", "mem_gb", "time_min", "array_parallelism",
                 "account", "qos"):
        if getattr(args, name) is not None:
            setattr(study.slurm, name, getattr(args, name))
    assert isinstance(study.slurm, SlurmOptions)
    for name in ("epochs_lr_search", "epochs_cv", "measure_steps"):
        if getattr(study, name) is not None and getattr(study, name) < 1:
            raise MedplanError(f"--{name.replace('_cv', '').replace('_', '-')} must be >= 1")
    return study.validate()


@entry_point("medplan_benchmark")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_arguments(args)
    # the study imports torch and pandas: only after the arguments are checked
    from medplan.study import (JOBS_DIR, check_study, dry_run, format_dry_run, format_status, load_study, make_backend,
                               run_study, status_rows, study_path)

    if args.status and not args.datasets:
        study = load_study()
        backend = None
        if study.executor != "inline":
            try:
                backend = make_backend(study, study_path().parent / JOBS_DIR / study.executor)
            except MedplanError:
                backend = None  # the queue is out of reach: files only
        print(format_status(status_rows(study, backend)))
        return 0
    study = make_study(args)
    check_study(study)
    if args.dry_run:
        jobs, total = dry_run(study)
        print(format_dry_run(jobs, total, study))
        return 0
    if args.status:
        print(format_status(status_rows(study)))
        return 0
    result = run_study(study, wait=not args.no_wait, poll_s=args.poll)
    if args.no_wait and study.executor == "slurm":
        print(f"submitted {len(result.submitted)} job(s); follow them with medplan_benchmark --status")
        return 0
    print(format_status(status_rows(study)))
    if result.failed:
        for key, why in result.failed.items():
            print(f"medplan_benchmark: {key} failed after {study.retries + 1} attempt(s): {why}", file=sys.stderr)
        return 1
    return 0
