"""A planned medplan dataset as an nnU-Net v2 raw dataset, trained on medplan's folds.

:func:`export_nnunet` writes ``NNUNET_RAW/DatasetXXX_Name/`` (``dataset.json``,
``imagesTr/CASE_0000.png``, ``labelsTr/CASE.png``) holding the plan's kept cases only (the
duplicates the plan excluded are left out), and ``NNUNET_PREPROCESSED/DatasetXXX_Name/
splits_final.json`` holding the dataset's ``splits.json`` as it is (same format: a list of
``{"train": [...], "val": [...]}``; patient-aware where the plan's split is). nnU-Net uses an
existing ``splits_final.json`` instead of making its own, so ``nnUNetv2_train ID 2d K``
trains and validates on exactly medplan's fold K.

The raw PNGs are copied byte for byte (medplan's raw images and labels already are what
nnU-Net's NaturalImage2DIO reads: 8-bit gray or RGB images, 8-bit class-index label maps);
any other file is decoded and written as such a PNG. The raw folder is built under a
temporary name and swapped in whole. dataset.json carries a ``medplan`` block (patient
groups, modality, excluded cases, a signature of what was exported), which the ``nnunet``
importer reads back; an export that is already up to date is left as it is.

A later ``nnunetv2`` trainer calls :func:`export_nnunet` with its own roots.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from medplan import __version__
from medplan.datasets import load_raw_index
from medplan.datasets.nnunet import (DATASET_JSON, IMAGES_TR, LABELS_TR, MEDPLAN_KEY, SPLITS_FINAL, channel_file)
from medplan.errors import MedplanError
from medplan.io import (atomic_directory, atomic_write_json, os_errors, png_bytes, read_image_keeping_png, read_json,
                        read_label)
from medplan.locks import dataset_stage, exclusive_lock, remove_stale_siblings
from medplan.names import check_name
from medplan.progress import progress_bar
from medplan.stagefiles import cases_and_groups, load_plan, load_splits, raw_dir_of

#: nnU-Net's environment variables for its three folders
ENV_RAW, ENV_PREPROCESSED, ENV_RESULTS = "nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"
FILE_ENDING = ".png"
MAX_ID = 999


@dataclass(frozen=True)
class NnunetExport:
    """What :func:`export_nnunet` wrote (or found up to date)."""

    name: str              # DatasetXXX_Name
    dataset_id: int
    raw_dir: Path          # NNUNET_RAW/DatasetXXX_Name
    splits_path: Path      # NNUNET_PREPROCESSED/DatasetXXX_Name/splits_final.json
    num_cases: int         # kept cases exported
    excluded: tuple[str, ...]  # duplicates the plan left out
    n_folds: int
    written: bool          # False when an identical export was already there


def nnunet_dataset_name(dataset_id: int, name: str) -> str:
    """``Dataset501_CAMUS``: nnU-Net's folder name for id ``dataset_id`` and ``name``."""
    if isinstance(dataset_id, bool) or not isinstance(dataset_id, int) or not 1 <= dataset_id <= MAX_ID:
        raise MedplanError(f"nnU-Net dataset id must be an integer 1..{MAX_ID}, got {dataset_id!r}")
    check_name(name, "nnU-Net dataset name")
    return f"Dataset{dataset_id:03d}_{name}"


def nnunet_root(env: str, given: str | Path | None, option: str) -> Path:
    """``given``, else the folder nnU-Net's environment variable ``env`` names; an error saying
    what to set when there is neither."""
    if given is not None:
        return Path(given).expanduser()
    value = os.environ.get(env)
    if not value:
        raise MedplanError(f"where should nnU-Net's data go? set ${env} (as for nnU-Net itself) or give {option}")
    return Path(value).expanduser()


def _same_id_elsewhere(dataset_id: int, folder: str, roots: list[Path]) -> Path | None:
    """A folder of another name nnU-Net would also take for ``dataset_id`` (it refuses to guess)."""
    prefix = f"Dataset{dataset_id:03d}"
    for root in roots:
        if not root.is_dir():
            continue
        for entry in sorted(root.iterdir()):
            if entry.is_dir() and entry.name.startswith(prefix) and entry.name != folder:
                return entry
    return None


def _signature(index: Any, kept: list[str], splits: list[dict], block: dict[str, Any]) -> str:
    """Changes whenever anything exported would: the kept cases' files, the folds, the block."""
    h = hashlib.sha1()
    for case in kept:
        for path in (index.image_paths[case], index.label_paths[case]):
            st = path.stat()
            h.update(f"{case}:{path.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    h.update(json.dumps([splits, block, index.labels, index.channels], sort_keys=True).encode())
    return h.hexdigest()


def _image_png(path: Path) -> tuple[bytes, int]:
    """The PNG bytes nnU-Net gets for a raw image, and its channel count."""
    array, data = read_image_keeping_png(path)
    channels = 1 if array.ndim == 2 else array.shape[2]
    if data is not None:
        return data, channels
    if array.dtype != np.uint8 or channels not in (1, 3):
        raise MedplanError(f"raw image is {array.dtype} with shape {list(array.shape)}; the medplan raw format holds "
                           "8-bit gray or RGB images", path)
    return png_bytes(array), channels


def _label_png(path: Path, num_classes: int) -> bytes:
    array, data = read_image_keeping_png(path)
    if data is None or array.ndim != 2:
        array, data = read_label(path), None  # a palette PNG's indices are its classes
    if array.ndim != 2 or array.dtype.kind not in "iu":
        raise MedplanError(f"label map is {array.dtype} with shape {list(array.shape)}; expected one channel of "
                           "class indices", path)
    if array.size and int(array.max()) >= num_classes:
        raise MedplanError(f"label value {int(array.max())} outside the classes 0..{num_classes - 1}", path)
    return data if data is not None else png_bytes(array.astype(np.uint8))


def _dataset_json(dataset: str, index: Any, kept: list[str], block: dict[str, Any], stored: int) -> dict[str, Any]:
    modality = index.dataset.get("modality")
    gray = str(modality) if modality and modality != "unknown" else "gray"
    # nnU-Net normalises every channel of these names by z-score
    channels = {"0": "R", "1": "G", "2": "B"} if stored == 3 else {"0": gray}
    return {
        "channel_names": channels,
        "labels": dict(sorted(index.labels.items(), key=lambda kv: kv[1])),
        "numTraining": len(kept),
        "file_ending": FILE_ENDING,
        "overwrite_image_reader_writer": "NaturalImage2DIO",
        "name": dataset,
        "description": (f"medplan dataset {dataset}: {len(kept)} kept case(s), "
                        f"{len(block['excluded_cases'])} duplicate(s) left out; folds in splits_final.json"),
        MEDPLAN_KEY: block,
    }


def _state(path: Path, same: Any) -> bool | None:
    """None: nothing at ``path``; else whether ``same(path)`` (an unreadable file is not the same)."""
    if not path.exists():
        return None
    try:
        return bool(same(path))
    except MedplanError:
        return False


def _exported_with(signature: str) -> Any:
    def same(dest: Path) -> bool:
        info = read_json(dest / DATASET_JSON) if (dest / DATASET_JSON).is_file() else None
        return isinstance(info, dict) and isinstance(info.get(MEDPLAN_KEY), dict) \
            and info[MEDPLAN_KEY].get("signature") == signature
    return same


def _write_cases(tmp: Path, index: Any, kept: list[str], progress: bool) -> int:
    """Every kept case into ``tmp``; returns the channel count they share (nnU-Net needs one)."""
    (tmp / IMAGES_TR).mkdir()
    (tmp / LABELS_TR).mkdir()
    k = len(index.labels)
    seen: dict[int, str] = {}
    for case in progress_bar(kept, total=len(kept), desc="export nnU-Net", enabled=progress, unit="case"):
        image, channels = _image_png(index.image_paths[case])
        seen.setdefault(channels, case)
        if len(seen) > 1:
            raise MedplanError(f"gray and RGB images in one dataset (cases {' and '.join(seen.values())}); nnU-Net "
                               "needs one channel count", index.image_paths[case])
        for target, data in ((tmp / IMAGES_TR / channel_file(case, 0, FILE_ENDING), image),
                             (tmp / LABELS_TR / f"{case}{FILE_ENDING}", _label_png(index.label_paths[case], k))):
            with os_errors(target, "write"):
                target.write_bytes(data)
    return next(iter(seen))


def export_nnunet(dataset: str, dataset_id: int, *, raw_root: str | Path | None = None,
                  preprocessed_root: str | Path | None = None, results_root: str | Path | None = None,
                  name: str | None = None, force: bool = False, progress: bool = True) -> NnunetExport:
    """Write planned dataset ``dataset`` as nnU-Net dataset ``dataset_id`` with medplan's folds.

    Roots default to ``$nnUNet_raw`` / ``$nnUNet_preprocessed`` (``$nnUNet_results`` is only
    looked at for folders of the same id). ``name`` defaults to the medplan name. An existing,
    different export (or a different ``splits_final.json``) is replaced only with ``force``;
    an identical one is left as it is (``written`` False).
    """
    check_name(dataset, "dataset name")
    folder = nnunet_dataset_name(dataset_id, name or dataset)
    raw = nnunet_root(ENV_RAW, raw_root, "--output")
    pre = nnunet_root(ENV_PREPROCESSED, preprocessed_root, "--preprocessed")
    results = Path(results_root) if results_root is not None else (
        Path(os.environ[ENV_RESULTS]) if os.environ.get(ENV_RESULTS) else None)
    other = _same_id_elsewhere(dataset_id, folder, [raw, pre] + ([results] if results else []))
    if other is not None:
        raise MedplanError(f"nnU-Net dataset id {dataset_id} is already used by {other.name} (nnU-Net refuses two "
                           f"datasets of one id); choose another --id or remove it", other)
    dest, splits_path = raw / folder, pre / folder / SPLITS_FINAL
    load_plan(dataset)  # never planned: say so before the stage lock creates its folder
    with dataset_stage(dataset, "export"):  # plan and splits stay as read while they are exported
        plan = load_plan(dataset)
        splits = load_splits(dataset, plan)
        raw_dir = raw_dir_of(plan)
        index = load_raw_index(raw_dir)
        kept, _ = cases_and_groups(raw_dir, plan)
        block: dict[str, Any] = {
            "dataset": dataset, "source_format": index.dataset.get("source_format"),
            "modality": index.dataset.get("modality"), "split": plan.split.to_json(),
            "excluded_cases": list(plan.excluded_cases),
            "groups": {c: index.groups[c] for c in kept} if index.group_column else None,
        }
        block["signature"] = _signature(index, kept, splits, block)
        block.update(medplan_version=__version__, exported=datetime.now().isoformat(timespec="seconds"))
        result = NnunetExport(folder, dataset_id, dest, splits_path, len(kept), tuple(plan.excluded_cases),
                              len(splits), True)
        with exclusive_lock(raw / f".{folder}.lock", purpose=f"export {dataset} to nnU-Net"):
            remove_stale_siblings(dest)
            states = {dest: _state(dest, _exported_with(block["signature"])),
                      splits_path: _state(splits_path, lambda p: read_json(p) == splits)}
            if all(states.values()):
                return dataclasses.replace(result, written=False)
            for path, state in states.items():
                if state is False and not force:
                    raise MedplanError("already exists and differs from this export; use --force to replace it",
                                       path)
            with atomic_directory(dest) as tmp:
                stored = _write_cases(tmp, index, kept, progress)
                atomic_write_json(tmp / DATASET_JSON, _dataset_json(dataset, index, kept, block, stored))
            atomic_write_json(splits_path, splits)
    return result
