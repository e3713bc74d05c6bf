"""The medplan raw format read back: find a dataset's folder (the one raw-folder resolver,
importing an official download found there first) and index it (:class:`RawIndex`:
``dataset.json`` and ``cases.csv`` checked against ``images/`` and ``labels/``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from medplan.datasets.writer import AUTO_IMPORT_FOLDER, PixelRecords, convert_dataset, detect_format
from medplan.errors import MedplanError
from medplan.io import images_by_case, read_cases_csv, read_json
from medplan.names import check_name
from medplan.paths import raw_root as default_raw_root


@dataclass
class RawIndex:
    """What a raw dataset folder declares, checked against what is on disk."""

    raw_dir: Path
    dataset: dict
    case_ids: list[str]
    groups: dict[str, str]
    group_column: str | None
    labels: dict[str, int]
    channels: int | None
    image_paths: dict[str, Path] = field(default_factory=dict)
    label_paths: dict[str, Path] = field(default_factory=dict)


def load_raw_index(raw_dir: str | Path) -> RawIndex:
    """Read dataset.json and cases.csv and check them against images/ and labels/."""
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise MedplanError("raw dataset folder not found", raw_dir)
    ds_path, csv_path = raw_dir / "dataset.json", raw_dir / "cases.csv"
    dataset = read_json(ds_path)
    if not isinstance(dataset, dict):
        raise MedplanError("expected a JSON object", ds_path)
    labels = dataset.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise MedplanError("'labels' must be a non-empty {name: index} object", ds_path)
    try:
        labels = {str(k): int(v) for k, v in labels.items()}
    except (TypeError, ValueError):
        raise MedplanError("label indices must be integers", ds_path) from None
    if sorted(labels.values()) != list(range(len(labels))):
        raise MedplanError(f"label indices must be 0..{len(labels) - 1} without gaps, got {sorted(labels.values())}",
                           ds_path)
    channels = dataset.get("channels")
    if channels is not None and channels not in (1, 3):
        raise MedplanError(f"'channels' must be 1 or 3, got {channels!r}", ds_path)
    group_column = dataset.get("group_column")
    try:
        case_ids, groups, _ = read_cases_csv(csv_path, group_column)
    except MedplanError as exc:
        if group_column is not None and "is not a column" in str(exc):
            raise MedplanError(f"dataset.json names group column {group_column!r} but cases.csv has no such "
                               "column", csv_path) from None
        raise
    if not case_ids:
        raise MedplanError("no cases listed", csv_path)
    declared_n = dataset.get("num_cases")
    if declared_n is not None and int(declared_n) != len(case_ids):
        raise MedplanError(f"num_cases is {declared_n} but cases.csv lists {len(case_ids)} cases", ds_path)
    index = RawIndex(raw_dir, dataset, case_ids, groups, group_column, labels, channels)
    for sub, paths in (("images", index.image_paths), ("labels", index.label_paths)):
        folder = raw_dir / sub
        if not folder.is_dir():
            raise MedplanError("folder not found", folder)
        found = images_by_case(folder, sub[:-1])
        for case_id in case_ids:
            if case_id not in found:
                raise MedplanError(f"{sub[:-1]} missing for case {case_id!r} listed in cases.csv", folder / f"{case_id}.png")
            paths[case_id] = found[case_id]
        extra = sorted(set(found) - set(groups))
        if extra:
            raise MedplanError(f"not listed in cases.csv ({len(extra)} such file(s) in {sub}/)", found[extra[0]])
    return index


def _datasets_in(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def resolve_raw_dataset(name: str, *, recorded: str | Path | None = None, progress: bool = True,
                        quiet: bool = False, scan: PixelRecords | None = None) -> Path:
    """The folder holding ``dataset.json`` for dataset ``name``, importing a download if needed:
    medplan's one raw-folder resolver.

    ``recorded`` (a plan's ``raw_dir``: the folder the plan was made from) wins while it still
    holds ``dataset.json``. Else ``$MEDPLAN_RAW/NAME`` may hold the medplan raw format, an
    earlier auto-import in ``NAME/medplan/``, or an official download layout, which is then
    imported (once) into ``NAME/medplan/`` without touching the download; ``scan`` then gets the
    fingerprint records of the images that import decodes (see :func:`convert_dataset`).
    """
    check_name(name, "dataset name")
    if recorded and (Path(recorded) / "dataset.json").is_file():
        return Path(recorded)
    root = default_raw_root()
    folder = root / name
    for candidate in (folder, folder / AUTO_IMPORT_FOLDER):
        if (candidate / "dataset.json").is_file():
            return candidate
    fmt = detect_format(folder) if folder.is_dir() else None
    if fmt is not None:
        if not quiet:
            print(f"medplan: {folder} holds a {fmt} download; importing it into {folder / AUTO_IMPORT_FOLDER} "
                  f"(the download is left as it is)", flush=True)
        return convert_dataset(fmt, folder, name, raw_root=root, progress=progress, scan=scan)
    there = _datasets_in(root)
    listing = f"datasets there: {', '.join(there)}" if there else "it holds no datasets"
    raise MedplanError(f"dataset {name!r} not found in $MEDPLAN_RAW ({root}); {listing}; "
                       f"run medplan_convert FORMAT SOURCE -d {name} first")
