"""medplan_explain: Grad-CAM per foreground class on the hardest cases, across architectures.

  medplan_explain -d CAMUS -a segformer_b3 -f 0 --worst 50          heatmaps for the 50 worst val cases
  medplan_explain -d CAMUS -a unet,segformer_b3,swin_umamba --case patient0042_4CH_ES   Fig. 1-style grid
  medplan_explain -d CAMUS -a segformer_b3 -f all --worst 50 --mean-over-folds
  medplan_explain -d CAMUS -a unet -f 0 --images new_scans/          new images (no ground truth)

Output: fold_K/explain/ (ARCH/explain_mean/ with --mean-over-folds): one panel PNG per case,
layer.json, pointing_game.csv, index.md; with several architectures DATASET/explain_grid/.
"""
from __future__ import annotations

import argparse

from medplan.cli import entry_point
from medplan.errors import MedplanError
from medplan.names import check_fold, check_name, check_names


def _fold(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def _names(values: list[str] | None) -> list[str]:
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


@entry_point("medplan_explain")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medplan_explain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--dataset", required=True, help="dataset name")
    parser.add_argument("-a", "--arch", action="append", required=True,
                        help="architecture(s), comma-separated or repeated; several give the cross-architecture grid")
    parser.add_argument("-f", "--folds", nargs="+", type=_fold, metavar="K",
                        help="fold(s), or 'all' (default: the fold that validated a named case; every trained fold "
                             "for --worst and --images)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--worst", type=int, metavar="N",
                       help="the N worst validation cases of each fold by per-case mDSC (several architectures: "
                            "the N hardest for all of them)")
    which.add_argument("--case", action="append", metavar="NAME", help="named case(s), comma-separated or repeated")
    which.add_argument("--images", metavar="DIR", help="a folder of new images (no ground truth, no pointing game)")
    parser.add_argument("--target", choices=["pred", "gt"], default="pred",
                        help="CAM target mask per class: the shown prediction (default) or the ground truth")
    parser.add_argument("--layer", default="auto",
                        help="module name to explain, or 'auto' (last spatial feature map before the logits)")
    parser.add_argument("--mean-over-folds", action="store_true", help="average the maps of the folds' models")
    parser.add_argument("--checkpoint", default="best", choices=["best", "final", "latest"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("-o", "--output", help="write here instead of the results folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    check_name(args.dataset, "dataset name")
    check_names(_names(args.arch), "architecture name")
    check_names(_names(args.case), "case id")
    for fold in args.folds or []:
        check_fold(fold)
    if args.worst is not None and args.worst < 1:
        raise MedplanError(f"--worst must be >= 1, got {args.worst}")
    # Grad-CAM imports torch: only after the arguments are checked
    from medplan.explain import ExplainRequest, explain

    request = ExplainRequest(dataset=args.dataset, archs=_names(args.arch), folds=args.folds, worst=args.worst,
                             cases=_names(args.case) or None, images=args.images, target=args.target,
                             layer=args.layer, mean_over_folds=args.mean_over_folds, checkpoint=args.checkpoint,
                             device=args.device, output=args.output, progress=not args.no_progress)
    result = explain(request)
    for arch, layer in result["layers"].items():
        print(f"{arch}: Grad-CAM at layer {layer}")
    pointing = result["pointing"]
    if not pointing.empty:
        means = pointing.groupby(["arch", "class"])["energy_in_gt"].mean()
        for (arch, cls), value in means.items():
            print(f"{arch}  {cls}: {100 * value:.1f}% of CAM energy inside the ground truth (mean over cases)")
    shown = [p for p in result["written"] if p.name in ("index.md", "pointing_game.csv", "layer.json")]
    print(f"wrote {len(result['written'])} files; " + ", ".join(str(p) for p in shown))
    return 0
