"""Duplicate and near-duplicate images: the data leakage the paper's filtering prevents.

Three kinds, strongest first:

* ``identical_bytes``  -- the files are byte-for-byte equal (a digest of the file bytes);
* ``identical_pixels`` -- the decoded arrays are equal (same shape, dtype and values) although
  the files differ (another PNG compression level, metadata);
* ``phash``            -- perceptual hashes within a Hamming distance ``threshold``
  (re-encoded JPEG copies, slightly brightened or resized copies).

Duplicates are grouped transitively (connected components of the "is a duplicate of"
graph) and one image per group is kept: the first case id in sorted (string) order, so the
choice does not depend on the order of the scan or the number of workers. Patient groups
are ignored on purpose: a copy of an image under another patient id is exactly the leak
that would put the same pixels in a training and a validation fold.

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
from dataclasses import dataclass
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
CSV_COLUMNS = ("case_id", "kept_case_id", "reason", "distance")


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


def pixel_digest(array: np.ndarray) -> str:
    """Digest of decoded pixels, including shape and dtype so (2, 6) never equals (3, 4)."""
    h = hashlib.sha256()
    h.update(f"{array.dtype.str}{array.shape}".encode())
    h.update(np.ascontiguousarray(array).data)
    return h.hexdigest()[:32]


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
    """One dropped case and why."""

    case_id: str
    kept_case_id: str
    reason: str
    distance: int


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


def find_duplicates(case_ids: Sequence[str], byte_digests: Sequence[str], pixel_digests: Sequence[str],
                    hashes: Sequence[bytes], threshold: int = DEFAULT_THRESHOLD) -> list[Duplicate]:
    """Group duplicates and return the dropped cases, sorted by case id.

    The reason of a dropped case is its relation to the kept case of its group: equal bytes,
    else equal pixels, else ``phash`` with the Hamming distance to the kept case (which can
    exceed the threshold when the group was joined through a chain of near-duplicates).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(case_ids)
    if not (len(byte_digests) == len(pixel_digests) == len(hashes) == n):
        raise ValueError("case_ids, digests and hashes must have the same length")
    if n < 2:
        return []
    edges = [_equal_value_edges(byte_digests), _equal_value_edges(pixel_digests)]
    i, j, _ = hamming_pairs(pack_hashes(list(hashes)), threshold)
    edges.append((i, j))
    src = np.concatenate([e[0] for e in edges])
    dst = np.concatenate([e[1] for e in edges])
    if src.size == 0:
        return []
    graph = coo_matrix((np.ones(src.size, dtype=np.int8), (src, dst)), shape=(n, n))
    n_comp, comp = connected_components(graph, directed=False)
    sizes = np.bincount(comp, minlength=n_comp)
    order = np.argsort(comp, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)])
    dropped: list[Duplicate] = []
    for label in np.nonzero(sizes > 1)[0]:
        members = sorted(order[starts[label]:starts[label + 1]].tolist(), key=lambda k: case_ids[k])
        keep = members[0]
        for k in members[1:]:
            if byte_digests[k] == byte_digests[keep]:
                reason, dist = "identical_bytes", 0
            elif pixel_digests[k] == pixel_digests[keep]:
                reason, dist = "identical_pixels", 0
            else:
                reason, dist = "phash", hamming(hashes[k], hashes[keep])
            dropped.append(Duplicate(case_ids[k], case_ids[keep], reason, dist))
    return sorted(dropped, key=lambda d: d.case_id)


def write_duplicates_csv(path: str | Path, duplicates: Sequence[Duplicate]) -> None:
    """``duplicates.csv``: one row per dropped case (header only when nothing was dropped)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for d in duplicates:
        writer.writerow([d.case_id, d.kept_case_id, d.reason, d.distance])
    atomic_write_text(path, buf.getvalue())


def read_duplicates_csv(path: str | Path) -> list[Duplicate]:
    path = Path(path)
    if not path.is_file():
        raise MedplanError("file not found", path)
    with open(path, newline="", encoding="utf-8") as f:
        return [Duplicate(r["case_id"], r["kept_case_id"], r["reason"], int(r["distance"]))
                for r in csv.DictReader(f)]
