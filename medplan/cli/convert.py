"""medplan_convert FORMAT SOURCE [-d NAME]: official download layout -> medplan raw format."""
from __future__ import annotations

import argparse

from medplan.cli import entry_point
from medplan.datasets import FORMATS, convert_dataset
from medplan.io import read_json


def build_parser() -> argparse.ArgumentParser:
    formats = "\n".join(f"  {name:<9} {imp.description}" for name, imp in FORMATS.items())
    parser = argparse.ArgumentParser(
        prog="medplan_convert",
        description="Convert an official dataset download into the medplan raw format ($MEDPLAN_RAW/NAME).",
        epilog=f"formats:\n{formats}\n  auto      detect the layout",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("format", help="camus, isic2018, neopolyp, kvasir, cvc, busi, nnunet, folder or auto")
    parser.add_argument("source", help="the downloaded (extracted) folder")
    parser.add_argument("-d", "--dataset", dest="name", help="dataset name (default: per format, e.g. CAMUS; nnunet: Name of DatasetXXX_Name)")
    parser.add_argument("--map", dest="value_map", metavar="VALUE:CLASS,...",
                        help="folder format: mask value -> class (default: 0/255 masks -> 0/1, else class indices)")
    parser.add_argument("--images", help="folder format: images folder (default: images/)")
    parser.add_argument("--masks", help="folder format: masks folder (default: masks/)")
    parser.add_argument("--labels", dest="label_names", metavar="NAME,...",
                        help="folder format: class names, background first")
    parser.add_argument("--modality", help="folder format: echocardiography, ultrasound, dermoscopy, endoscopy")
    parser.add_argument("--force", action="store_true", help="replace an existing dataset of that name")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: up to 2)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


@entry_point("medplan_convert")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = {k: getattr(args, k) for k in ("value_map", "images", "masks", "label_names", "modality")}
    dest = convert_dataset(args.format, args.source, args.name, progress=not args.no_progress, force=args.force,
                           workers=args.workers, **options)
    info = read_json(dest / "dataset.json")
    labels = ", ".join(sorted(info["labels"], key=info["labels"].get))
    notes = f"; {'; '.join(info['notes'])}" if info.get("notes") else ""
    print(f"{info['name']}: {info['num_cases']} cases, {len(info['labels'])} classes ({labels}), "
          f"{info['channels']} channel(s), from {info['source_format']} -> {dest}{notes}")
    return 0


if __name__ == "__main__":
    main()
