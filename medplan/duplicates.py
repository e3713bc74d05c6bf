"""Duplicate and near-duplicate images: the data leakage the paper's filtering prevents.

Three kinds, strongest first:

* ``identical_bytes``  -- the files are byte-for-byte equal (a digest of the file bytes);
* ``identical_pixels`` -- the decoded arrays are equal (same shape, dtype and values) although
  the files differ (another PNG compression level, metadata);
* ``phash``            -- perceptual hashes within a Hamming distance ``threshold``
  (re-encoded JPEG copies, slightly brightened or resized copies).

Which are dropped (``duplicates.csv`` records the decision for every pair or group):

* exact duplicates (identical bytes or pixels) always: one copy is all a dataset needs;
* perceptual near-duplicates only where they could leak. With patient groups (a group column
  that splits the folds patient-aware) a near-duplicate under *another* patient id is exactly
  the leak that would put nearly the same pixels in a training and a validation fold, so it
  is dropped; near-duplicates *within* one patient (the end-diastole and end-systole frames
  of one CAMUS acquisition) always land in the same fold, so they are reported and kept.
  Without groups every near-duplicate is dropped, as any two cases may be split apart.

Duplicates are grouped transitively (connected components of the "is a duplicate of" graph
over the edges that lead to a drop) and one image per group is kept: the first case id in
sorted (string) order, so the choice does not depend on the order of the scan or the number
of workers; members of the kept case's own patient stay too, unless they are exact copies.

Default threshold 4 of 64 bits (phash, hash_size 8): re-encoded (JPEG q 75-90) and
brightened (+5..+10 grey levels) copies of structured images land at distance 0-4, while
distinct images sit at 12 or more (``tests/test_duplicates.py`` plants both). The paper's
counts (CAMUS 2000 -> 1996 images, i.e. end-diastole and end-systole frames of one patient are
*not* duplicates) argue for a low threshold; raise it to be more aggressive.
"""
from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from medplan.errors import MedplanError
from medplan.io import atomic_write_text

DEFAULT_HASH = "phash"
DEFAULT_HASH_SIZE = 8
DEFAULT_THRESHOLD = 4
REASONS = ("identical_bytes", "identical_pixels", "phash")
CSV_COLUMNS = ("case_id", "kept_case_id", "reason", "distance", "decision")


def _hash_functions() -> dict[str, Callable]:
    import imagehash

    return {
        "phash": imagehash.phash,
        "dhash": imagehash.dhash,
        "ahash": imagehash.average_hash,
        "whash": imagehash.whash,
    }


HASH_NAMES = ("phash", "dhash", "ahash", "whash")


def check_hash_options(hash_name: str, hash_size: int, threshold: int) -> None:
    """Reject impossible hash options before any work is done."""
    if hash_name not in HASH_NAMES:
        raise MedplanError(f"unknown perceptual hash {hash_name!r}; choose one of {', '.join(HASH_NAMES)}")
    if int(hash_size) < 2:
        raise MedplanError(f"hash_size must be >= 2, got {hash_size}")
    if hash_name == "whash" and int(hash_size) & (int(hash_size) - 1):
        raise MedplanError(f"whash needs a power-of-two hash_size, got {hash_size}")
    if not 0 <= int(threshold) <= int(hash_size) ** 2:
        raise MedplanError(f"threshold must be in 0..{int(hash_size) ** 2} for hash_size {hash_size}, got {threshold}")


def bytes_digest(data: bytes) -> str:
    """Digest of a file's bytes (SHA-256, hardware-accelerated on most CPUs; 128 bits kept)."""
    return hashlib.sha256(data).hexdigest()[:32]


def pixel_digest(array: np.ndarray | Image.Image) -> str:
    """Digest of decoded pixels, including shape and dtype so (2, 6) never equals (3, 4).

    An 8-bit gray or RGB PIL image gives the digest of its ``np.asarray`` (same bytes, one copy
    fewer)."""
    h = hashlib.sha256()
    if isinstance(array, Image.Image) and array.mode in ("L", "RGB"):
        w, height = array.size
        shape = (height, w) if array.mode == "L" else (height, w, 3)
        h.update(f"|u1{shape}".encode())
        h.update(array.tobytes())
        return h.hexdigest()[:32]
    array = np.asarray(array)
    h.update(f"{array.dtype.str}{array.shape}".encode())
    h.update(np.ascontiguousarray(array).data)
    return h.hexdigest()[:32]


def pixel_key(shape: Sequence[int], hist: np.ndarray, phash: bytes) -> str:
    """Digest of what a decoded image's pixels determine (shape, histograms, perceptual hash),
    computed while they are decoded: images with equal pixels have equal keys (see
    :func:`exact_pixel_digests`)."""
    h = hashlib.sha256(f"{tuple(int(s) for s in shape)}".encode())
    h.update(np.ascontiguousarray(hist).tobytes())
    h.update(phash)
    return h.hexdigest()[:32]


def exact_pixel_digests(byte_digests: Sequence[str], pixel_keys: Sequence[str],
                        digest_of: Callable[[int], str]) -> list[str]:
    """Per case, a digest equal to another case's exactly when their decoded pixels are equal,
    without digesting every image's pixels.

    Equal pixels have equal :func:`pixel_key`, and equal bytes have equal pixels: a case whose
    key no file with other bytes shares gets its bytes digest; only the cases of a key shared by
    different files get ``digest_of(i)`` (:func:`pixel_digest` of case ``i``, decoded again by
    the caller), in practice the re-encoded copies of one image and nothing else."""
    files: dict[str, set[str]] = {}
    for b, k in zip(byte_digests, pixel_keys):
        files.setdefault(k, set()).add(b)
    return [digest_of(i) if len(files[k]) > 1 else f"bytes:{b}"
            for i, (b, k) in enumerate(zip(byte_digests, pixel_keys))]


def preload_hash(hash_name: str) -> None:
    """Import what the hash function imports on its first call, in the parent process, so that
    forked workers share it instead of each importing it (scipy.fftpack: ~0.2 CPU-s each)."""
    _hash_functions()
    if hash_name == "phash":
        import scipy.fftpack  # noqa: F401
    elif hash_name == "whash":
        import pywt  # noqa: F401


def perceptual_hash(image: np.ndarray | Image.Image, hash_name: str = DEFAULT_HASH,
                    hash_size: int = DEFAULT_HASH_SIZE) -> bytes:
    """Perceptual hash of an image as packed bits (``hash_size**2`` bits, big-endian)."""
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.ascontiguousarray(image))
    bits = np.asarray(_hash_functions()[hash_name](pil, hash_size=hash_size).hash, dtype=bool).ravel()
    return np.packbits(bits).tobytes()


def pack_hashes(hashes: Sequence[bytes]) -> np.ndarray:
    """Stack packed hashes into an ``(N, W)`` uint64 matrix (zero-padded to whole words)."""
    if len(hashes) == 0:
        return np.zeros((0, 1), dtype=np.uint64)
    n_bytes = len(hashes[0])
    if any(len(h) != n_bytes for h in hashes):
        raise ValueError("all hashes must have the same length")
    words = -(-n_bytes // 8)
    buf = np.zeros((len(hashes), words * 8), dtype=np.uint8)
    buf[:, :n_bytes] = np.frombuffer(b"".join(hashes), dtype=np.uint8).reshape(len(hashes), n_bytes)
    return buf.view(">u8").astype(np.uint64)


def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    return table[x.view(np.uint8)].reshape(*x.shape, 8).sum(-1, dtype=np.uint8)


def hamming_pairs(packed: np.ndarray, threshold: int, *, max_block_elements: int = 1 << 22
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs ``i < j`` whose Hamming distance is ``<= threshold``, as (i, j, distance).

    Vectorised XOR + popcount over blocks of rows against all later rows, so memory stays
    bounded (about ``max_block_elements`` words per block) for any number of images.
    """
    n, words = packed.shape
    out_i, out_j, out_d = [], [], []
    rows = max(1, max_block_elements // max(1, n * words))
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        block = packed[start:stop, None, :] ^ packed[None, start:, :]  # (b, n - start, W)
        dist = _popcount(block).sum(-1, dtype=np.int32)
        bi, bj = np.nonzero(dist <= threshold)
        keep = bj + start > bi + start  # only i < j (the block includes itself)
        bi, bj = bi[keep], bj[keep]
        out_i.append(bi + start)
        out_j.append(bj + start)
        out_d.append(dist[bi, bj])
    if not out_i:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty.astype(np.int32)
    return (np.concatenate(out_i).astype(np.int64), np.concatenate(out_j).astype(np.int64),
            np.concatenate(out_d).astype(np.int32))


def hamming(a: bytes, b: bytes) -> int:
    """Hamming distance between two packed hashes."""
    return int(np.unpackbits(np.frombuffer(a, np.uint8) ^ np.frombuffer(b, np.uint8)).sum())


@dataclass(frozen=True)
class Duplicate:
    """One duplicate pair and what was done: ``case_id`` dropped in favour of ``kept_case_id``,
    or (``decision`` starting with "kept") both kept as near-duplicates within one patient."""

    case_id: str
    kept_case_id: str
    reason: str
    distance: int
    decision: str = field(default="", compare=False)

    @property
    def dropped(self) -> bool:
        return not self.decision.startswith("kept")


@dataclass
class DuplicateReport:
    """What :func:`duplicate_decisions` found: the dropped cases and the near-duplicate pairs kept."""

    dropped: list[Duplicate]
    kept: list[Duplicate]
    patient_aware: bool

    @property
    def rows(self) -> list[Duplicate]:
        return sorted(self.dropped + self.kept, key=lambda d: (not d.dropped, d.case_id, d.kept_case_id))

    def summary(self) -> str:
        return summary_line([d.decision for d in self.dropped], len(self.kept))


_DECISION_TEXT = {
    "identical_bytes": "identical bytes",
    "identical_pixels": "identical pixels",
}


def summary_line(decisions: Sequence[str], n_kept_pairs: int) -> str:
    """``duplicates: 2 dropped (1 identical bytes, 1 near-duplicate across patients), 3
    near-duplicate pair(s) within a patient kept``."""
    counts: dict[str, int] = {}
    for decision in decisions:
        why = decision.split(":", 1)[1].strip() if ":" in decision else decision
        counts[why] = counts.get(why, 0) + 1
    if decisions:
        text = f"duplicates: {len(decisions)} dropped ({', '.join(f'{n} {why}' for why, n in counts.items())})"
    else:
        text = "duplicates: none dropped"
    if n_kept_pairs:
        text += f", {n_kept_pairs} near-duplicate pair(s) within a patient kept (same fold; see duplicates.csv)"
    return text


def _equal_value_edges(values: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Edges chaining all indices that share a value (a star per value is enough for components)."""
    first: dict[str, int] = {}
    src, dst = [], []
    for i, v in enumerate(values):
        j = first.setdefault(v, i)
        if j != i:
            src.append(j)
            dst.append(i)
    return np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)


def duplicate_decisions(case_ids: Sequence[str], byte_digests: Sequence[str], pixel_digests: Sequence[str],
                        hashes: Sequence[bytes], threshold: int = DEFAULT_THRESHOLD,
                        groups: Sequence[str] | None = None) -> DuplicateReport:
    """Decide, for every duplicate pair or group, what is dropped and what is kept.

    ``groups`` (patient per case) is given when the split is patient-aware: near-duplicates
    across patients are then dropped, those within one patient kept and reported. Without it
    every near-duplicate is dropped. Exact duplicates are dropped either way.

    The reason of a dropped case is its relation to the kept case of its group: equal bytes,
    else equal pixels, else ``phash`` with the Hamming distance to the kept case (which can
    exceed the threshold when the group was joined through a chain of near-duplicates).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(case_ids)
    if not (len(byte_digests) == len(pixel_digests) == len(hashes) == n):
        raise ValueError("case_ids, digests and hashes must have the same length")
    if groups is not None and len(groups) != n:
        raise ValueError("groups must have one entry per case")
    aware = groups is not None
    if n < 2:
        return DuplicateReport([], [], aware)
    edges = [_equal_value_edges(byte_digests), _equal_value_edges(pixel_digests)]
    i, j, d = hamming_pairs(pack_hashes(list(hashes)), threshold)
    if aware:
        same = np.array([groups[a] == groups[b] for a, b in zip(i.tolist(), j.tolist())], dtype=bool)
        within = [(int(a), int(b), int(c)) for a, b, c in zip(i[same], j[same], d[same])]
        i, j = i[~same], j[~same]
    else:
        within = []
    edges.append((i, j))
    src = np.concatenate([e[0] for e in edges])
    dst = np.concatenate([e[1] for e in edges])
    dropped: list[Duplicate] = []
    if src.size:
        graph = coo_matrix((np.ones(src.size, dtype=np.int8), (src, dst)), shape=(n, n))
        n_comp, comp = connected_components(graph, directed=False)
        sizes = np.bincount(comp, minlength=n_comp)
        order = np.argsort(comp, kind="stable")
        starts = np.concatenate([[0], np.cumsum(sizes)])
        near = "near-duplicate across patients" if aware else "near-duplicate"
        for label in np.nonzero(sizes > 1)[0]:
            members = sorted(order[starts[label]:starts[label + 1]].tolist(), key=lambda k: case_ids[k])
            keep = members[0]
            kept = [keep]
            for k in members[1:]:
                twin = next((m for m in kept if byte_digests[m] == byte_digests[k]), None)
                if twin is not None:
                    dropped.append(Duplicate(case_ids[k], case_ids[twin], "identical_bytes", 0,
                                             "dropped: identical bytes"))
                    continue
                twin = next((m for m in kept if pixel_digests[m] == pixel_digests[k]), None)
                if twin is not None:
                    dropped.append(Duplicate(case_ids[k], case_ids[twin], "identical_pixels", 0,
                                             "dropped: identical pixels"))
                    continue
                if aware and groups[k] == groups[keep]:
                    kept.append(k)  # the kept case's own patient: same fold, nothing to leak
                    continue
                dropped.append(Duplicate(case_ids[k], case_ids[keep], "phash", hamming(hashes[k], hashes[keep]),
                                         f"dropped: {near}"))
    gone = {dup.case_id for dup in dropped}
    kept_pairs = []
    for a, b, dist in within:
        if case_ids[a] in gone or case_ids[b] in gone:
            continue
        first, second = sorted((case_ids[a], case_ids[b]))
        kept_pairs.append(Duplicate(second, first, "phash", dist,
                                    f"kept: near-duplicate within patient {groups[a]}"))
    return DuplicateReport(sorted(dropped, key=lambda x: x.case_id),
                           sorted(kept_pairs, key=lambda x: (x.case_id, x.kept_case_id)), aware)


def find_duplicates(case_ids: Sequence[str], byte_digests: Sequence[str], pixel_digests: Sequence[str],
                    hashes: Sequence[bytes], threshold: int = DEFAULT_THRESHOLD,
                    groups: Sequence[str] | None = None) -> list[Duplicate]:
    """The dropped cases of :func:`duplicate_decisions`, sorted by case id."""
    return duplicate_decisions(case_ids, byte_digests, pixel_digests, hashes, threshold, groups).dropped


def write_duplicates_csv(path: str | Path, duplicates: Sequence[Duplicate]) -> None:
    """``duplicates.csv``: one row per dropped case, then one per near-duplicate pair kept
    within a patient; ``decision`` says which and why (header only when there are none)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for d in duplicates:
        decision = d.decision or ("dropped: " + _DECISION_TEXT.get(d.reason, "near-duplicate"))
        writer.writerow([d.case_id, d.kept_case_id, d.reason, d.distance, decision])
    atomic_write_text(path, buf.getvalue())


def read_duplicates_csv(path: str | Path) -> list[Duplicate]:
    """Every row of ``duplicates.csv`` (files without a ``decision`` column list drops only)."""
    path = Path(path)
    if not path.is_file():
        raise MedplanError("file not found", path)
    with open(path, newline="", encoding="utf-8") as f:
        return [Duplicate(r["case_id"], r["kept_case_id"], r["reason"], int(r["distance"]),
                          r.get("decision") or "dropped: " + _DECISION_TEXT.get(r["reason"], "near-duplicate"))
                for r in csv.DictReader(f)]
