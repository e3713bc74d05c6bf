"""medplan_plan: fingerprint + duplicates + plan + splits, explained."""
from __future__ import annotations

import argparse

from medplan import pipeline
from medplan.cli import entry_point
from medplan.planners.explain import explain_plan
from medplan.planners.overrides import parse_set_args
from medplan.paths import preprocessed_dir


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by medplan_plan and medplan_preprocess."""
    parser.add_argument("-d", "--dataset", required=True, help="dataset name (folder under $MEDPLAN_RAW)")
    parser.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                        help="override a plan decision, dotted keys, JSON values (e.g. --set input_size=[256,256] "
                             "--set augmentation.hflip=false --set epochs.cv=50); repeatable")
    parser.add_argument("--planner", default="default", help="planner name (default: %(default)s)")
    parser.add_argument("--hash", dest="hash_name", choices=["phash", "dhash", "ahash", "whash"],
                        help="perceptual hash for near-duplicates (default: phash)")
    parser.add_argument("--hash-size", type=int, help="hash size in bits per side (default: 8)")
    parser.add_argument("--threshold", type=int, help="Hamming distance at or below which images are near-duplicates")
    parser.add_argument("--refingerprint", action="store_true", help="rescan the raw data even if unchanged")
    parser.add_argument("-j", "--num-workers", type=int, help="worker processes (default: CPU count)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def plan_options(args: argparse.Namespace) -> dict:
    return {"planner": args.planner, "hash_name": args.hash_name, "hash_size": args.hash_size,
            "threshold": args.threshold, "refingerprint": args.refingerprint}


@entry_point("medplan_plan")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medplan_plan", description=__doc__)
    add_plan_arguments(parser)
    args = parser.parse_args(argv)
    plan = pipeline.plan(args.dataset, overrides=parse_set_args(args.overrides), num_workers=args.num_workers,
                         progress=not args.no_progress, log=print, **plan_options(args))
    print(explain_plan(plan))
    print(f"wrote {preprocessed_dir(args.dataset)}/{{fingerprint.json, duplicates.csv, plans.json, splits.json}}")
    return 0
