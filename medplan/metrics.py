"""Segmentation metrics exactly as the benchmark paper computes them.

TP, FP and FN are summed over all pixels of all evaluated images and over all foreground
classes (background, index 0, excluded) and only then turned into ratios ("global
micro-averaging")::

    mDSC = 2TP / (2TP + FP + FN)    mIoU = TP / (TP + FP + FN)
    mRec = TP / (TP + FN)           mPrec = TP / (TP + FP)

Class-wise Dice and IoU use the same formulas on one class's sums. Per-case values use the
same formulas on that case's counts.

Empty denominators (the choices, so that JSON never holds NaN):

* A class with no TP, FP or FN anywhere (absent from both prediction and ground truth) has
  ``null`` dice/iou/recall/precision in ``per_class``: there is nothing to judge it on. It
  still takes part in the micro-average, where it contributes zeros and changes nothing.
* When all foreground classes together have TP + FP + FN = 0 (nothing to find and nothing
  predicted), mDSC = mIoU = mRec = mPrec = 1.0: the prediction agrees perfectly. This
  happens for per-case values of normal images, never for a real validation set.
* Otherwise a zero denominator of mRec (no foreground in the ground truth, some predicted)
  or mPrec (nothing predicted, some foreground present) is ``null``: undefined, not 0.
  mDSC and mIoU are then still defined (and 0).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from medplan.errors import MedplanError

LOSSES = ("bce", "ce")


# --------------------------------------------------------------------------- counting


def _check_shapes(pred: Any, gt: Any) -> None:
    if tuple(pred.shape) != tuple(gt.shape):
        raise MedplanError(f"prediction shape {tuple(pred.shape)} differs from ground-truth shape {tuple(gt.shape)}")


def _range_error(what: str, lo: int, hi: int, num_classes: int) -> MedplanError:
    return MedplanError(f"{what} holds label values {lo}..{hi}, outside 0..{num_classes - 1} (num_classes={num_classes})")


def confusion_counts(pred: Any, gt: Any, num_classes: int) -> np.ndarray:
    """TP, FP, FN per class, shape ``(num_classes, 3)`` int64, background row included.

    ``pred`` and ``gt`` are integer label maps of any (equal) shape, numpy arrays or torch
    tensors on any device; torch inputs are counted on their device and only the
    ``num_classes**2`` confusion matrix is copied back.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise MedplanError(f"num_classes must be a positive integer, got {num_classes!r}")
    k = int(num_classes)
    if isinstance(pred, torch.Tensor) or isinstance(gt, torch.Tensor):
        device = pred.device if isinstance(pred, torch.Tensor) else gt.device
        p, g = torch.as_tensor(pred, device=device), torch.as_tensor(gt, device=device)
        _check_shapes(p, g)
        for what, t in (("prediction", p), ("ground truth", g)):
            if t.is_floating_point() or t.is_complex():
                raise MedplanError(f"{what} must be an integer label map, got dtype {t.dtype}")
        p, g = p.reshape(-1).long(), g.reshape(-1).long()
        if p.numel():
            for what, t in (("prediction", p), ("ground truth", g)):
                lo, hi = (int(v) for v in torch.aminmax(t))
                if lo < 0 or hi >= k:
                    raise _range_error(what, lo, hi, k)
        cm = torch.bincount(g * k + p, minlength=k * k).reshape(k, k).cpu().numpy().astype(np.int64)
    else:
        p, g = np.asarray(pred), np.asarray(gt)
        _check_shapes(p, g)
        for what, a in (("prediction", p), ("ground truth", g)):
            if a.dtype.kind not in "biu":
                raise MedplanError(f"{what} must be an integer label map, got dtype {a.dtype}")
        p, g = p.reshape(-1).astype(np.int64, copy=False), g.reshape(-1).astype(np.int64, copy=False)
        if p.size:
            for what, a in (("prediction", p), ("ground truth", g)):
                lo, hi = int(a.min()), int(a.max())
                if lo < 0 or hi >= k:
                    raise _range_error(what, lo, hi, k)
        cm = np.bincount(g * k + p, minlength=k * k).reshape(k, k).astype(np.int64)
    # cm[true, predicted]
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    return np.stack([tp, fp, fn], axis=1).astype(np.int64)


# --------------------------------------------------------------------------- ratios


def _ratio(num: int, den: int) -> float | None:
    return float(num) / float(den) if den > 0 else None


def _class_names(class_names: Sequence[str] | Mapping[str, int], num_classes: int) -> list[str]:
    """Names in index order; accepts a list of K names or plans["labels"] (name -> index)."""
    if isinstance(class_names, Mapping):
        by_index = {int(v): str(n) for n, v in class_names.items()}
        if sorted(by_index) != list(range(len(by_index))):
            raise MedplanError(f"labels must map names to contiguous indices 0..K-1, got {dict(class_names)}")
        names = [by_index[i] for i in range(len(by_index))]
    else:
        names = [str(n) for n in class_names]
    if len(names) != num_classes:
        raise MedplanError(
            f"{len(names)} class names ({', '.join(names)}) for {num_classes} classes; "
            f"give one name per class, background first"
        )
    if len(set(names)) != len(names):
        raise MedplanError(f"duplicate class names: {', '.join(names)}")
    return names


def _as_counts(counts: Any) -> np.ndarray:
    c = np.asarray(counts)
    if c.ndim != 2 or c.shape[1] != 3 or c.shape[0] < 1:
        raise MedplanError(f"counts must have shape (num_classes, 3) [TP, FP, FN], got {c.shape}")
    return c.astype(np.int64)


def _global(counts: np.ndarray) -> dict[str, float | None]:
    tp, fp, fn = (int(v) for v in counts[1:].sum(axis=0))
    if tp + fp + fn == 0:  # nothing in the ground truth, nothing predicted: perfect agreement
        return {"mDSC": 1.0, "mIoU": 1.0, "mRec": 1.0, "mPrec": 1.0}
    return {
        "mDSC": _ratio(2 * tp, 2 * tp + fp + fn),
        "mIoU": _ratio(tp, tp + fp + fn),
        "mRec": _ratio(tp, tp + fn),
        "mPrec": _ratio(tp, tp + fp),
    }


def summarize(counts: np.ndarray, class_names: Sequence[str] | Mapping[str, int]) -> dict[str, Any]:
    """Micro-averaged metrics (background excluded) and per-class values from TP/FP/FN counts.

    ``counts`` comes from :func:`confusion_counts` (row 0 = background); ``class_names`` names
    all K classes in index order, background first (or is plans["labels"]).
    """
    c = _as_counts(counts)
    names = _class_names(class_names, c.shape[0])
    out: dict[str, Any] = _global(c)
    per_class: dict[str, dict[str, Any]] = {}
    for name, (tp, fp, fn) in zip(names[1:], c[1:].tolist()):
        per_class[name] = {
            "dice": _ratio(2 * tp, 2 * tp + fp + fn),
            "iou": _ratio(tp, tp + fp + fn),
            "recall": _ratio(tp, tp + fn),
            "precision": _ratio(tp, tp + fp),
            "tp": int(tp),
            "fp": int(fp),
            "fn": int(fn),
        }
    out["per_class"] = per_class
    return out


# --------------------------------------------------------------------------- accumulation


class MetricAccumulator:
    """Adds up TP/FP/FN over a validation set, globally and, when given case ids, per case.

    >>> acc = MetricAccumulator(num_classes=4)
    >>> acc.add(pred, gt, case_id="patient0001_2CH_ED")       # doctest: +SKIP
    >>> acc.result(plans["labels"])["mDSC"]                      # doctest: +SKIP
    """

    def __init__(self, num_classes: int):
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
            raise MedplanError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes = int(num_classes)
        self.counts = np.zeros((self.num_classes, 3), dtype=np.int64)
        self.case_counts: dict[str, np.ndarray] = {}
        self._anonymous = 0

    def add(self, pred: Any, gt: Any, case_id: str | Sequence[str] | None = None) -> np.ndarray:
        """Count one prediction against its ground truth; returns its (K, 3) counts.

        ``case_id`` may be one id (the whole of ``pred`` is that case), a sequence of ids
        (one per item along the first axis of a batch), or None (counted globally only; each
        such call counts as one case in ``n_cases``). Adding an id again accumulates into it.
        """
        if case_id is not None and not isinstance(case_id, str):
            ids = list(case_id)
            if len(ids) != len(pred) or len(ids) != len(gt):
                raise MedplanError(f"{len(ids)} case ids for a batch of {len(pred)} predictions and {len(gt)} labels")
            total = np.zeros_like(self.counts)
            for cid, p, g in zip(ids, pred, gt):
                total += self.add(p, g, str(cid))
            return total
        counts = confusion_counts(pred, gt, self.num_classes)
        self.counts += counts
        if case_id is None:
            self._anonymous += 1
        else:
            prev = self.case_counts.get(case_id)
            self.case_counts[case_id] = counts if prev is None else prev + counts
        return counts

    @property
    def n_cases(self) -> int:
        return len(self.case_counts) + self._anonymous

    def result(self, class_names: Sequence[str] | Mapping[str, int]) -> dict[str, Any]:
        """Global metrics (as :func:`summarize`) plus ``n_cases``; cheap enough for every epoch."""
        out = summarize(self.counts, class_names)
        out["n_cases"] = self.n_cases
        return out

    def case_result(self, case_id: str, class_names: Sequence[str] | Mapping[str, int]) -> dict[str, Any]:
        """One case's mDSC, mIoU, mRec, mPrec and class-wise Dice, from its own counts."""
        s = summarize(self.case_counts[case_id], class_names)
        return {
            "mDSC": s["mDSC"],
            "mIoU": s["mIoU"],
            "mRec": s["mRec"],
            "mPrec": s["mPrec"],
            "dice": {name: v["dice"] for name, v in s["per_class"].items()},
        }


def summary_dict(acc: MetricAccumulator, class_names: Sequence[str] | Mapping[str, int]) -> dict[str, Any]:
    """The contents of ``validation/summary.json``: global metrics, per class, n_cases, per case."""
    out = acc.result(class_names)
    out["per_case"] = {cid: acc.case_result(cid, class_names) for cid in sorted(acc.case_counts)}
    return out


# --------------------------------------------------------------------------- logits


def _check_loss(logits: torch.Tensor, loss: str) -> None:
    if loss not in LOSSES:
        raise MedplanError(f"unknown loss {loss!r} (expected bce or ce)")
    if logits.ndim < 2:
        raise MedplanError(f"logits must have shape (B, K, ...), got {tuple(logits.shape)}")
    if loss == "bce" and logits.shape[1] != 1:
        raise MedplanError(f"loss bce needs 1 logit channel, got {logits.shape[1]}")


def logits_to_probs(logits: torch.Tensor, loss: str) -> torch.Tensor:
    """Class probabilities ``(B, K, H, W)``: ``[1 - p, p]`` from one BCE logit, softmax for CE."""
    _check_loss(logits, loss)
    if loss == "bce":
        p = torch.sigmoid(logits.float())
        return torch.cat([1.0 - p, p], dim=1)
    return torch.softmax(logits.float(), dim=1)


def logits_to_labels(logits: torch.Tensor, loss: str) -> torch.Tensor:
    """Label map ``(B, H, W)`` long: sigmoid > 0.5 (i.e. logit > 0) for BCE, argmax for CE."""
    _check_loss(logits, loss)
    if loss == "bce":
        return (logits[:, 0] > 0).long()
    return logits.argmax(dim=1)


def probabilities_to_labels(probs: torch.Tensor, size: Sequence[int]) -> tuple[np.ndarray, torch.Tensor]:
    """One image's class probabilities ``(K, h, w)`` -> its label map at ``size`` = (H, W).

    Bilinear interpolation of the probabilities to the original size, then the most probable
    class (for a BCE head's ``[1 - p, p]``: p > 0.5, the rule of :func:`logits_to_labels`).
    Returns the labels ((H, W) uint8, on the CPU) and the probabilities at ``size`` (on the
    tensor's device). Validation at original size and prediction both use this one function.
    """
    if probs.ndim != 3:
        raise MedplanError(f"probabilities must have shape (K, H, W), got {tuple(probs.shape)}")
    size = (int(size[0]), int(size[1]))
    up = probs[None]
    if tuple(up.shape[-2:]) != size:
        up = torch.nn.functional.interpolate(up, size=size, mode="bilinear", align_corners=False)
    up = up[0]
    return up.argmax(dim=0).to(torch.uint8).cpu().numpy(), up
