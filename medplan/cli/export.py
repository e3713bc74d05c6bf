"""medplan_export nnunet -d NAME --id ID: a planned dataset as an nnU-Net v2 raw dataset + medplan's folds.

  medplan_export nnunet -d CAMUS --id 501
      -> $nnUNet_raw/Dataset501_CAMUS/{dataset.json, imagesTr/, labelsTr/}   (kept cases only)
         $nnUNet_preprocessed/Dataset501_CAMUS/splits_final.json          (medplan's folds)
  then: nnUNetv2_plan_and_preprocess -d 501 -c 2d --verify_dataset_integrity
        nnUNetv2_train 501 2d 0      (trains and validates on medplan's fold 0)
"""
from __future__ import annotations

import argparse

from medplan.cli import entry_point
from medplan.errors import MedplanError
from medplan.names import check_name

FORMATS = ("nnunet",)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medplan_export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("format", help="export format: nnunet (nnU-Net v2 raw dataset + splits_final.json)")
    parser.add_argument("-d", "--dataset", required=True, help="planned medplan dataset (medplan_plan -d NAME first)")
    parser.add_argument("--id", dest="dataset_id", type=int, required=True, help="nnU-Net dataset id, 1..999")
    parser.add_argument("--name", help="nnU-Net dataset name (DatasetXXX_NAME; default: the medplan name)")
    parser.add_argument("-o", "--output", help="nnU-Net raw root (default: $nnUNet_raw)")
    parser.add_argument("--preprocessed", help="nnU-Net preprocessed root for splits_final.json "
                                               "(default: $nnUNet_preprocessed)")
    parser.add_argument("--force", action="store_true", help="replace an existing, different export")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


@entry_point("medplan_export")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.format.lower() not in FORMATS:
        raise MedplanError(f"unknown export format {args.format!r}; known: {', '.join(FORMATS)}")
    check_name(args.dataset, "dataset name")
    if args.name is not None:
        check_name(args.name, "nnU-Net dataset name")
    # imported once the arguments are checked: it pulls in the plan stage (plans, splits, raw index)
    from medplan.interop.nnunet import export_nnunet, nnunet_dataset_name

    nnunet_dataset_name(args.dataset_id, args.name or args.dataset)  # a bad --id before any file is read
    result = export_nnunet(args.dataset, args.dataset_id, raw_root=args.output, preprocessed_root=args.preprocessed,
                           name=args.name, force=args.force, progress=not args.no_progress)
    what = "wrote" if result.written else "up to date:"
    print(f"{what} {result.raw_dir} ({result.num_cases} cases, {len(result.excluded)} duplicate(s) left out) and "
          f"{result.splits_path} ({result.n_folds} folds)")
    print(f"next: nnUNetv2_plan_and_preprocess -d {result.dataset_id} -c 2d --verify_dataset_integrity; "
          f"nnUNetv2_train {result.dataset_id} 2d FOLD")
    return 0


if __name__ == "__main__":
    main()
