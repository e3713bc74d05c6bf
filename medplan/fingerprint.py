"""Dataset inspection (``fingerprint.json``) and duplicate filtering (``duplicates.csv``).

Every image is decoded once, in worker processes, and everything that needs its pixels is
done in that pass: validation, per-channel 256-bin histograms (exact mean, std and
percentiles for uint8), the label histogram, the byte digest, the perceptual hash, a key that
equal pixels share (pixels are digested, decoded again, only where two files share one),
the sector-scan evidence and, when the caller hands in an array writer (:class:`ArrayWriter`;
the pipeline hands in :class:`medplan.preprocessing.CaseArrays`), the resized arrays, so this
module knows nothing of the array format. The per-case half (decode, record, :class:`ConvertScan`)
is :mod:`medplan.casescan`. Workers hand back small records, never pixels; the
per-case histograms, needed to leave duplicates out of the statistics once they are known, go
to a temporary memory-mapped file, so memory does not grow with the number of images. Images
medplan_convert decodes anyway get their records there (:class:`ConvertScan`), not decoded again.
"""
from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import medplan
from medplan.casescan import (BLACK_LEVEL, CORNER_COLS, CORNER_ROWS, GRAY_MAX_COLOR_SHARE, GRAY_TOLERANCE,
                              ArrayWriter, ConvertScan, pixel_digest_of, scan_case)
from medplan.datasets.raw import RawIndex, load_raw_index  # noqa: F401 - RawIndex is imported from here too
from medplan.duplicates import (DEFAULT_HASH, DEFAULT_HASH_SIZE, DEFAULT_THRESHOLD, DuplicateReport,
                                check_hash_options, duplicate_decisions, exact_pixel_digests, preload_hash,
                                summary_line, write_duplicates_csv)
from medplan.errors import MedplanError
from medplan.io import atomic_write_json, os_error_from_record, os_errors, with_path
from medplan.parallel import run_tasks

FINGERPRINT_FILE = "fingerprint.json"
DUPLICATES_FILE = "duplicates.csv"
# Bumped when the duplicate decisions change, so a fingerprint made under older rules is redone.
DUPLICATE_POLICY = 2  # 2: near-duplicates within one patient kept when the split is patient-aware


def _reserve(f, size: int, folder: Path) -> None:
    """Allocate the histogram file's blocks now: a full disk is then an OSError here, not a
    SIGBUS when the memory map touches a page later. Filesystems that cannot (EOPNOTSUPP,
    EINVAL) are left to allocate on write, as before."""
    if not hasattr(os, "posix_fallocate") or size <= 0:
        return
    try:
        os.posix_fallocate(f.fileno(), 0, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG):
            raise with_path(exc, folder, "write") from None


def patient_aware(raw: RawIndex) -> bool:
    """Whether the planner will split by patient: a group column with some group of 2+ cases
    (the default planner's ``group_kfold`` rule)."""
    return raw.group_column is not None and len(set(raw.groups.values())) < len(raw.case_ids)


def duplicates_line(fingerprint: dict) -> str:
    """One line for the logs of medplan_plan / medplan_preprocess: how many cases were dropped and why."""
    dup = fingerprint.get("duplicates") or {}
    if dup.get("summary"):
        return dup["summary"]
    why = {"identical_bytes": "identical bytes", "identical_pixels": "identical pixels", "phash": "near-duplicate"}
    decisions = [f"dropped: {why.get(reason, reason)}" for reason, n in (dup.get("by_reason") or {}).items()
                 for _ in range(int(n))]
    return summary_line(decisions, len(dup.get("kept_within_group") or []))


def _stats_from_hist(hist: np.ndarray) -> dict[str, float]:
    """Exact mean/std and inverted-CDF 0.5/99.5 percentiles of uint8 values from a histogram."""
    counts = [int(c) for c in hist]
    n = sum(counts)
    if n == 0:
        return {"mean": 0.0, "std": 0.0, "p005": 0.0, "p995": 0.0}
    s1 = sum(v * c for v, c in enumerate(counts))
    s2 = sum(v * v * c for v, c in enumerate(counts))
    var = (n * s2 - s1 * s1) / (n * n)  # exact integer numerator
    cdf = np.cumsum(np.asarray(hist, dtype=np.int64))
    return {"mean": s1 / n, "std": max(var, 0.0) ** 0.5,
            "p005": float(np.searchsorted(cdf, 0.005 * n)), "p995": float(np.searchsorted(cdf, 0.995 * n))}


def fingerprint_dataset(raw_dir: str | Path, out_dir: str | Path, *, hash_name: str = DEFAULT_HASH,
                        hash_size: int = DEFAULT_HASH_SIZE, threshold: int = DEFAULT_THRESHOLD,
                        arrays: ArrayWriter | None = None, num_workers: int | None = None,
                        progress: bool = True, precomputed: ConvertScan | None = None) -> dict:
    """Inspect a raw dataset, find duplicates and (optionally) write the arrays, in one pass.

    Writes ``out_dir/duplicates.csv`` and ``out_dir/fingerprint.json`` (atomically, after the
    whole pass succeeded) and returns the fingerprint. With ``arrays`` (an :class:`ArrayWriter`,
    e.g. ``medplan.preprocessing.CaseArrays.at(out_dir, (512, 512))``), the arrays are written
    for every kept case in the same pass, from the one decode of each image. ``precomputed``:
    the records the convert that wrote ``raw_dir`` computed (:class:`ConvertScan`); only the
    other cases are decoded, with the same result.
    """
    check_hash_options(hash_name, hash_size, threshold)
    raw = load_raw_index(raw_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if arrays is not None:
        arrays.prepare()
    opt = {"channels": raw.channels, "n_classes": len(raw.labels), "hash_name": hash_name,
           "hash_size": int(hash_size), "arrays": arrays}
    ids = raw.case_ids
    n = len(ids)
    done, done_hists = ({}, None) if precomputed is None else precomputed.records_for(raw, opt)
    todo = [i for i, c in enumerate(ids) if c not in done]
    tasks = [(ids[i], str(raw.image_paths[ids[i]]), str(raw.label_paths[ids[i]]), opt) for i in todo]
    preload_hash(hash_name)  # before the workers fork
    records: list[dict] = [{}] * n
    with os_errors(out_dir, "write"):
        tmp = tempfile.TemporaryFile(dir=out_dir, prefix=".fingerprint_hist.", suffix=".tmp")
    with tmp:
        shape = (n, 4, 256)
        _reserve(tmp, int(np.prod(shape)) * 4, out_dir)
        hists = np.memmap(tmp, dtype=np.uint32, mode="w+", shape=shape)
        try:
            for i, c in enumerate(ids):
                if c in done:
                    hists[i] = done_hists[done[c][0]]
                    records[i] = dict(done[c][1])
            with contextlib.closing(run_tasks(scan_case, tasks, num_workers=num_workers, desc="fingerprint",
                                              progress=progress)) as results:
                for i, rec in zip(todo, results, strict=True):
                    if rec["error"] is not None:
                        if "os_error" in rec:
                            raise os_error_from_record(rec["os_error"])
                        raise MedplanError(rec["error"])
                    hists[i] = rec.pop("hist")
                    records[i] = rec
        except BaseException:
            if arrays is not None:  # arrays of the workers the pool stopped mid-write (joined by now)
                arrays.discard_partial()
            raise
        groups = [raw.groups[c] for c in ids] if patient_aware(raw) else None
        byte_digests = [r["bytes_digest"] for r in records]
        pixel_digests = exact_pixel_digests(byte_digests, [r["pixel_key"] for r in records],
                                            lambda i: pixel_digest_of(raw.image_paths[ids[i]]))
        report = duplicate_decisions(ids, byte_digests, pixel_digests, [r["phash"] for r in records], threshold,
                                     groups)
        dups = report.dropped
        dropped = {d.case_id for d in dups}
        kept_idx = np.array([i for i, c in enumerate(ids) if c not in dropped], dtype=np.int64)
        total = np.zeros((4, 256), dtype=np.int64)
        for start in range(0, kept_idx.size, 4096):
            total += np.asarray(hists[kept_idx[start:start + 4096]], dtype=np.int64).sum(axis=0)
        del hists, done_hists
    input_size = None if arrays is None else arrays.input_size
    fingerprint = _summarise(raw, records, kept_idx, total, report, hash_name, hash_size, threshold, input_size)
    if arrays is not None:
        arrays.keep_only([ids[i] for i in kept_idx])
    write_duplicates_csv(out_dir / DUPLICATES_FILE, report.rows)
    atomic_write_json(out_dir / FINGERPRINT_FILE, fingerprint)
    return fingerprint


def _summarise(raw: RawIndex, records: list[dict], kept_idx: np.ndarray, total: np.ndarray, report: DuplicateReport,
               hash_name: str, hash_size: int, threshold: int, input_size: Sequence[int] | None) -> dict[str, Any]:
    dups = report.dropped
    kept = [records[i] for i in kept_idx]
    n_kept = len(kept)
    stored = raw.channels or (3 if any(r["channels"] == 3 for r in records) else 1)
    rgb_is_gray = stored == 3 and n_kept > 0 and all(r["is_gray"] for r in kept)
    seen = 1 if stored == 1 or rgb_is_gray else 3
    channel_hists = [total[3]] if seen == 1 else [total[0], total[1], total[2]]
    stats = [_stats_from_hist(h) for h in channel_hists]

    sizes = np.array([r["size"] for r in kept], dtype=np.int64).reshape(-1, 2)
    label_counts = np.array([r["label_counts"] for r in kept], dtype=np.int64).reshape(-1, len(raw.labels))
    pixel_count = label_counts.sum(axis=0)
    total_pixels = max(int(pixel_count.sum()), 1)
    names = sorted(raw.labels, key=raw.labels.get)
    groups = [raw.groups[r["case_id"]] for r in kept]
    group_sizes = np.unique(groups, return_counts=True)[1] if groups else np.zeros(0, dtype=np.int64)
    by_reason = {reason: sum(d.reason == reason for d in dups) for reason in ("identical_bytes", "identical_pixels",
                                                                               "phash")}
    dropped = {d.case_id: d for d in dups}
    per_case = {}
    for r in records:
        entry: dict[str, Any] = {"size": list(r["size"]), "channels": r["channels"],
                                 "group": raw.groups[r["case_id"]],
                                 "classes_present": [names[k] for k in np.nonzero(r["label_counts"])[0]],
                                 "border_black": round(r["border_black"], 4),
                                 "phash": r["phash"].hex(), "bytes_digest": r["bytes_digest"]}
        if r["channels"] == 3:
            entry["color_share"] = round(r["color_share"], 6)
        if r["case_id"] in dropped:
            entry["duplicate_of"] = dropped[r["case_id"]].kept_case_id
        per_case[r["case_id"]] = entry

    def median(col: int) -> int:
        return int(round(float(np.median(sizes[:, col])))) if n_kept else 0

    return {
        "dataset": raw.dataset.get("name", raw.raw_dir.name),
        "modality": raw.dataset.get("modality", "unknown"),
        "source_format": raw.dataset.get("source_format"),
        "num_cases": len(records),
        "num_kept": n_kept,
        "channels": stored,
        "rgb_is_gray": bool(rgb_is_gray),
        "channels_seen": seen,
        "color_evidence": {
            "gray_tolerance": GRAY_TOLERANCE, "max_color_share_for_gray": GRAY_MAX_COLOR_SHARE,
            "n_color_cases": int(sum(not r["is_gray"] for r in kept)),
            "max_color_share": round(max((r["color_share"] for r in kept), default=0.0), 6),
        },
        "sizes": {
            "median": [median(0), median(1)],
            "min": sizes.min(axis=0).tolist() if n_kept else [0, 0],
            "max": sizes.max(axis=0).tolist() if n_kept else [0, 0],
            "n_unique": int(len({tuple(s) for s in sizes.tolist()})),
        },
        "intensity": {
            "channels": seen,
            "source": "luma of the stored RGB (R=G=B)" if rgb_is_gray else ("RGB" if seen == 3 else "gray"),
            "mean": [s["mean"] for s in stats],
            "std": [s["std"] for s in stats],
            "percentile_00_5": [s["p005"] for s in stats],
            "percentile_99_5": [s["p995"] for s in stats],
            "n_pixels": int(channel_hists[0].sum()),
        },
        "labels": {
            "declared": dict(raw.labels),
            "values_found": [int(v) for v in np.nonzero(pixel_count)[0]],
            "pixel_count": {name: int(pixel_count[raw.labels[name]]) for name in names},
            "pixel_share": {name: float(pixel_count[raw.labels[name]]) / total_pixels for name in names},
            "presence": {name: (float(np.count_nonzero(label_counts[:, raw.labels[name]])) / n_kept if n_kept else 0.0)
                         for name in names},
        },
        "groups": {
            "column": raw.group_column,
            "n_groups": int(group_sizes.size),
            "max_cases_per_group": int(group_sizes.max()) if group_sizes.size else 0,
            "has_groups": bool(group_sizes.size < n_kept),
        },
        "border_black_fraction": float(np.mean([r["border_black"] for r in kept])) if n_kept else 0.0,
        "border_black_region": {"rows": CORNER_ROWS, "cols": CORNER_COLS, "level": BLACK_LEVEL},
        "duplicates": {
            "hash": hash_name, "hash_size": int(hash_size), "threshold": int(threshold),
            "policy": DUPLICATE_POLICY, "patient_aware": report.patient_aware,
            "n_dropped": len(dups), "dropped": [d.case_id for d in dups], "by_reason": by_reason,
            "decisions": {d.case_id: d.decision for d in dups},
            # near-duplicates within one patient, kept because the split is patient-aware: a
            # split that ignores patients must drop the first case of each pair as well
            "kept_within_group": [[d.kept_case_id, d.case_id, d.distance] for d in report.kept],
            "summary": report.summary(),
        },
        "arrays": None if input_size is None else {
            "input_size": [int(v) for v in input_size],
            "channels_by_case": {"1": int(sum(r["array_channels"] == 1 for r in kept)),
                                 "3": int(sum(r["array_channels"] == 3 for r in kept))},
        },
        "per_case": per_case,
        "created": datetime.now().isoformat(timespec="seconds"),
        "medplan_version": medplan.__version__,
    }
