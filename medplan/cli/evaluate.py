"""medplan_evaluate: metrics from saved label maps; Table-3 reports over folds; paired comparisons.

  medplan_evaluate --all-folds                           every dataset x architecture -> reports + report/index.html
  medplan_evaluate --html                                rebuild $MEDPLAN_RESULTS/report/index.html only
  medplan_evaluate -d CAMUS -a unet --postprocessing     decide nnU-Net's largest-component rule on the folds
  medplan_evaluate -d CAMUS -a unet [--at-input-size]    one model: per fold and mean +- SD
  medplan_evaluate --pred masks/ --gt labels/ --labels 0,1,2,3 [--names background,LV,...]
  medplan_evaluate -d CAMUS --compare unet segformer_b3 [--worst 50]
  medplan_evaluate --model-from NeoPolyp -a unet --on Kvasir --map 1,2:1
"""
from __future__ import annotations

import argparse

from medplan.cli import entry_point
from medplan.errors import MedplanError
from medplan.io import atomic_write_json
from medplan.names import check_fold, check_names


def _fold(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def _size(text: str) -> list[int]:
    try:
        parts = [int(v) for v in text.lower().replace("x", ",").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H,W (e.g. 512,512), got {text!r}") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected H,W (e.g. 512,512), got {text!r}")
    return parts


def one(values: list[str] | None, what: str) -> str | None:
    """The single value of a repeatable option, where only one makes sense."""
    if values and len(values) > 1:
        raise MedplanError(f"give one {what} here, got {', '.join(values)}")
    return values[0] if values else None


def _fmt(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _print_summary(summary: dict) -> None:
    print(f"{summary['n_cases']} cases, evaluated at {summary.get('evaluated_at', 'original_size')}")
    print("  " + "  ".join(f"{m} {_fmt(summary[m])}" for m in ("mDSC", "mIoU", "mRec", "mPrec")))
    for name, v in summary["per_class"].items():
        print(f"  {name}: Dice {_fmt(v['dice'])}  IoU {_fmt(v['iou'])}")


@entry_point("medplan_evaluate")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medplan_evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--dataset", action="append", help="dataset (repeatable for --all-folds)")
    parser.add_argument("-a", "--arch", action="append", help="architecture (repeatable for --all-folds)")
    parser.add_argument("-f", "--folds", nargs="+", type=_fold, help="folds (compare / worst / cross-dataset)")
    parser.add_argument("--all-folds", action="store_true",
                        help="gather every fold_K/validation/ (of -d/-a, or of everything under $MEDPLAN_RESULTS)")
    parser.add_argument("--at-input-size", action="store_true",
                        help="metrics at the planned input size (as the paper reported) instead of original size")
    parser.add_argument("--recompute", action="store_true",
                        help="recompute from the label maps even where validation/summary.json exists")
    parser.add_argument("--no-plots", action="store_true", help="reports without the PNG plots")
    parser.add_argument("--html", action="store_true",
                        help="(re)build the web report $MEDPLAN_RESULTS/report/index.html from every fold and stop")
    parser.add_argument("--no-html", action="store_true", help="--all-folds without the web report")
    parser.add_argument("--postprocessing", action="store_true",
                        help="with -d/-a: decide nnU-Net's largest-component post-processing on the folds "
                             "(writes postprocessing.json, which medplan_predict applies)")
    pair = parser.add_argument_group("a folder pair")
    pair.add_argument("--pred", help="folder of predicted label maps")
    pair.add_argument("--gt", help="folder of ground-truth label maps")
    pair.add_argument("--labels", help="declared class values as stored, background first (e.g. 0,1,2,3 or 0,255)")
    pair.add_argument("--names", help="class names, background first (e.g. background,LV,LV wall,LA)")
    pair.add_argument("--input-size", type=_size, metavar="H,W", help="resize both (nearest) to H,W before counting")
    pair.add_argument("-o", "--output", help="write the summary JSON here")
    cmp_ = parser.add_argument_group("paired comparison and worst cases")
    cmp_.add_argument("--compare", nargs=2, metavar=("ARCH_A", "ARCH_B"), help="paired per-case comparison on -d")
    cmp_.add_argument("--worst", type=int, metavar="N", help="write fold_K/worst_cases.csv with the N worst cases")
    cmp_.add_argument("--n-boot", type=int, default=10000, help="bootstrap resamples (default: %(default)s)")
    cmp_.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: %(default)s)")
    cross = parser.add_argument_group("cross-dataset")
    cross.add_argument("--model-from", metavar="DATASET", help="dataset the model (-a) was trained on")
    cross.add_argument("--on", metavar="DATASET", help="dataset to evaluate it on (its raw images and labels)")
    cross.add_argument("--map", action="append", metavar="SRC[,SRC]:DST",
                       help="map the model's classes to the target's, e.g. 1,2:1 (repeatable)")
    cross.add_argument("--map-gt", action="append", metavar="SRC[,SRC]:DST", help="map the target's labels likewise")
    cross.add_argument("--checkpoint", default="best", choices=["best", "final", "latest"])
    cross.add_argument("--tta", action="store_true", help="flip test-time augmentation")
    cross.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    progress = not args.no_progress
    check_names(args.dataset or [], "dataset name")
    check_names([*(args.arch or []), *(args.compare or [])], "architecture name")
    check_names([d for d in (args.model_from, args.on) if d is not None], "dataset name")
    for fold in args.folds or []:
        check_fold(fold)
    if args.worst is not None and args.worst < 1:
        raise MedplanError(f"--worst must be >= 1, got {args.worst}")
    if args.n_boot < 1:
        raise MedplanError(f"--n-boot must be >= 1, got {args.n_boot}")
    # evaluation imports torch and pandas: only after the arguments are checked
    from medplan.evaluation.aggregate import gather_all_folds, write_cv_summaries
    from medplan.evaluation.compare import (format_comparison, paired_comparison, worst_cases,  # likewise
                                            write_comparison)
    from medplan.evaluation.evaluate import cross_dataset_evaluation, evaluate_folders  # likewise
    from medplan.evaluation.report import format_folds, format_table, write_reports  # likewise
    from medplan.report import build_report  # likewise (matplotlib, jinja2)

    if args.html and not args.all_folds:
        print(f"wrote {build_report(incremental=not args.recompute)}")
        return 0
    if args.postprocessing:
        dataset, arch = one(args.dataset, "dataset (-d)"), one(args.arch, "architecture (-a)")
        if not (dataset and arch):
            raise MedplanError("--postprocessing needs -d DATASET -a ARCH")
        from medplan.evaluation.postprocessing import decide_postprocessing  # only this option needs it
        d = decide_postprocessing(dataset, arch, progress=progress)
        print(f"post-processing: largest component for classes {d['largest_component_classes'] or 'none'}"
              f"{' (after foreground as one)' if d['foreground_largest_component'] else ''}; "
              f"mDSC {d['raw']['mDSC']:.4f} -> {d['postprocessed']['mDSC']:.4f} "
              f"(pooled over folds {', '.join(map(str, d['folds']))})")
        return 0

    if args.pred or args.gt:
        if not (args.pred and args.gt and args.labels):
            raise MedplanError("a folder pair needs --pred, --gt and --labels")
        summary = evaluate_folders(args.pred, args.gt, args.labels, args.names, input_size=args.input_size,
                                   progress=progress)
        _print_summary(summary)
        if args.output:
            atomic_write_json(args.output, summary)
            print(f"wrote {args.output}")
        return 0

    if args.model_from or args.on:
        arch = one(args.arch, "architecture (-a)")
        if not (args.model_from and args.on and arch):
            raise MedplanError("cross-dataset evaluation needs --model-from DATASET -a ARCH --on DATASET")
        summary = cross_dataset_evaluation(args.model_from, arch, args.on, mapping=args.map, map_gt=args.map_gt,
                                           folds=args.folds, checkpoint=args.checkpoint, device=args.device,
                                           tta=args.tta, at_input_size=args.at_input_size, progress=progress)
        print(f"{args.model_from}/{arch} (folds {', '.join(summary['folds'])}) on {args.on}:")
        _print_summary(summary)
        return 0

    if args.compare or args.worst is not None:
        dataset = one(args.dataset, "dataset (-d)")
        if not dataset:
            raise MedplanError("--compare / --worst need -d DATASET")
        archs = list(args.compare or args.arch or [])
        if not archs:
            raise MedplanError("--worst needs -a ARCH (or --compare ARCH_A ARCH_B)")
        if args.compare:
            result = paired_comparison(dataset, *args.compare, n_boot=args.n_boot, seed=args.seed, folds=args.folds,
                                       recompute=args.recompute)
            print(format_comparison(result))
            for path in write_comparison(result):
                print(f"wrote {path}")
        if args.worst is not None:
            for arch in archs:
                for path in worst_cases(dataset, arch, args.worst, folds=args.folds, recompute=args.recompute):
                    print(f"wrote {path}")
        return 0

    if not (args.all_folds or args.dataset or args.arch):
        raise MedplanError("nothing to evaluate: give --all-folds, -d/-a, --pred/--gt, --compare or --model-from "
                           "(see --help)")
    df = gather_all_folds(recompute=args.recompute, at_input_size=args.at_input_size, datasets=args.dataset,
                          archs=args.arch, progress=progress)
    if args.dataset or args.arch:
        print(format_folds(df))
        print()
    print(format_table(df))
    written = write_cv_summaries(df, at_input_size=args.at_input_size)
    if not args.dataset and not args.arch:
        written += write_reports(df, suffix="_at_input_size" if args.at_input_size else "", plots=not args.no_plots)
        if not args.at_input_size and not args.no_html:
            written.append(build_report(table=df))
    for path in written:
        print(f"wrote {path}")
    return 0
