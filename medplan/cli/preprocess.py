"""medplan_preprocess: plan if needed, then write the preprocessed arrays."""
from __future__ import annotations

import argparse

from medplan import pipeline
from medplan.cli import entry_point
from medplan.cli.plan import add_plan_arguments, plan_options
from medplan.planners.overrides import parse_set_args


@entry_point("medplan_preprocess")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medplan_preprocess", description=__doc__)
    add_plan_arguments(parser)
    parser.add_argument("--replan", action="store_true", help="plan again even if plans.json exists")
    args = parser.parse_args(argv)
    data = pipeline.preprocess(args.dataset, replan=args.replan, overrides=parse_set_args(args.overrides),
                               num_workers=args.num_workers, progress=not args.no_progress, log=print,
                               **plan_options(args))
    n = len(list(data.glob("*.json")))
    print(f"{args.dataset}: {n} preprocessed case(s) in {data}")
    return 0
