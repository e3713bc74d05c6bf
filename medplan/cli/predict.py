"""medplan_predict: label maps for new images from trained folds (probabilities averaged over folds)."""
from __future__ import annotations

import argparse

from medplan.cli import entry_point
from medplan.errors import MedplanError
from medplan.names import check_fold, check_name
from medplan.paths import results_dir
from medplan.rundir import CHECKPOINTS


def _fold(value: str) -> int | str:
    return int(value) if value.isdigit() else value


@entry_point("medplan_predict")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="medplan_predict", description=__doc__,
        epilog="Writes OUT/CASE.png (class indices at each image's original size); --overlay adds "
               "CASE_overlay.png, --save-probabilities CASE.npz ('probabilities', K x H x W float32).")
    src = parser.add_argument_group("model (either -d and -a, or -m)")
    src.add_argument("-d", "--dataset", help="dataset the model was trained on (under $MEDPLAN_RESULTS)")
    src.add_argument("-a", "--arch", help="architecture")
    src.add_argument("-m", "--model-dir", help="a results folder holding fold_K/ (e.g. a copied RESULTS/CAMUS/unet), "
                                                "or one fold folder")
    parser.add_argument("-i", "--input", required=True, help="folder of images (PNG, JPEG, TIFF, .mhd, .nii.gz, ...)")
    parser.add_argument("-o", "--output", required=True, help="folder for the label maps")
    parser.add_argument("-f", "--folds", nargs="+", type=_fold, help="folds to ensemble (default: every trained fold)")
    parser.add_argument("--checkpoint", default="best", choices=sorted(CHECKPOINTS), help="default: %(default)s")
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: average over a horizontal flip (and vertical flips "
                             "when the plan trained with them)")
    parser.add_argument("--save-probabilities", action="store_true", help="also write CASE.npz with class probabilities")
    parser.add_argument("--overlay", action="store_true", help="also write CASE_overlay.png (image with coloured classes)")
    parser.add_argument("--no-postprocessing", action="store_true",
                        help="skip the largest-component post-processing the folds chose (postprocessing.json)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="default: %(default)s")
    parser.add_argument("--batch-size", type=int, help="images per forward pass (default: the plan's batch size)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.model_dir and (args.dataset or args.arch):
        raise MedplanError("give either -m MODEL_DIR or -d DATASET -a ARCH, not both")
    if not args.model_dir and not (args.dataset and args.arch):
        raise MedplanError("which model? give -d DATASET -a ARCH, or -m MODEL_DIR")
    if args.batch_size is not None and args.batch_size < 1:
        raise MedplanError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not args.model_dir:
        check_name(args.dataset, "dataset name")
        check_name(args.arch, "architecture name")
    for fold in args.folds or []:
        check_fold(fold)
    model_dir = args.model_dir or results_dir(args.dataset, args.arch)
    # inference imports torch: only after the arguments are checked
    from medplan.inference import predict_folder

    written = predict_folder(model_dir, args.input, args.output, folds=args.folds, checkpoint=args.checkpoint,
                             device=args.device, tta=args.tta, save_probabilities=args.save_probabilities,
                             overlay=args.overlay, batch_size=args.batch_size,
                             postprocessing=not args.no_postprocessing,
                             progress=not args.no_progress)
    print(f"wrote {len(written)} label map(s) to {args.output}")
    return 0
