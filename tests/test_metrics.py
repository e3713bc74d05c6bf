"""The paper's metrics: global micro-averaging over pixels, images and foreground classes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medplan.errors import MedplanError
from medplan.metrics import (
    MetricAccumulator,
    confusion_counts,
    logits_to_labels,
    logits_to_probs,
    summarize,
    summary_dict,
)

NAMES4 = ["background", "A", "B", "C"]

# pixel pairs (gt, pred): (0,0) (1,1) (1,2) (2,2) / (0,1) (1,1) (2,2) (2,0); class 3 absent from both
GT4 = np.array([[0, 1, 1, 2], [0, 1, 2, 2]], dtype=np.uint8)
PRED4 = np.array([[0, 1, 2, 2], [1, 1, 2, 0]], dtype=np.uint8)


def test_confusion_counts_by_hand():
    counts = confusion_counts(PRED4, GT4, 4)
    assert counts.dtype == np.int64 and counts.shape == (4, 3)
    # rows: class; columns: TP, FP, FN
    assert counts.tolist() == [[1, 1, 1], [2, 1, 1], [2, 1, 1], [0, 0, 0]]


def test_summarize_four_classes_by_hand():
    s = summarize(confusion_counts(PRED4, GT4, 4), NAMES4)
    # foreground sums: TP = 4, FP = 2, FN = 2 (background row excluded)
    assert s["mDSC"] == pytest.approx(8 / 12)
    assert s["mIoU"] == pytest.approx(4 / 8)
    assert s["mRec"] == pytest.approx(4 / 6)
    assert s["mPrec"] == pytest.approx(4 / 6)
    assert set(s["per_class"]) == {"A", "B", "C"}  # no background
    a = s["per_class"]["A"]
    assert a["dice"] == pytest.approx(4 / 6) and a["iou"] == pytest.approx(2 / 4)
    assert (a["tp"], a["fp"], a["fn"]) == (2, 1, 1)
    # class absent from prediction and ground truth: undefined -> None (null in JSON)
    assert s["per_class"]["C"]["dice"] is None and s["per_class"]["C"]["iou"] is None


def test_class_only_in_ground_truth():
    gt = np.array([[0, 1, 1, 3]])
    pred = np.array([[0, 1, 1, 0]])
    s = summarize(confusion_counts(pred, gt, 4), NAMES4)
    c = s["per_class"]["C"]
    assert (c["tp"], c["fp"], c["fn"]) == (0, 0, 1)
    assert c["dice"] == 0.0 and c["iou"] == 0.0 and c["recall"] == 0.0
    assert c["precision"] is None  # nothing predicted as C
    # global: TP = 2 (A), FN = 1 (C)
    assert s["mDSC"] == pytest.approx(4 / 5)
    assert s["mIoU"] == pytest.approx(2 / 3)
    assert s["mRec"] == pytest.approx(2 / 3)
    assert s["mPrec"] == pytest.approx(1.0)


def test_binary_by_hand():
    gt = np.array([[0, 1, 1, 0]])
    pred = np.array([[1, 1, 0, 0]])
    s = summarize(confusion_counts(pred, gt, 2), ["background", "lesion"])
    assert (s["mDSC"], s["mIoU"], s["mRec"], s["mPrec"]) == pytest.approx((0.5, 1 / 3, 0.5, 0.5))
    assert s["per_class"]["lesion"]["dice"] == pytest.approx(0.5)


def test_micro_average_differs_from_macro():
    # class A: 8 pixels, all found; class B: 2 pixels, all missed
    gt = np.array([1] * 8 + [2] * 2 + [0] * 6)
    pred = np.array([1] * 8 + [0] * 2 + [0] * 6)
    s = summarize(confusion_counts(pred, gt, 3), ["background", "A", "B"])
    micro = s["mDSC"]
    macro = np.mean([v["dice"] for v in s["per_class"].values()])
    assert micro == pytest.approx(16 / 18)  # TP=8, FN=2
    assert macro == pytest.approx(0.5)  # (1 + 0) / 2
    # and pooling over images is not the mean of per-image values
    acc = MetricAccumulator(2)
    acc.add(np.array([1, 1, 1, 1]), np.array([1, 1, 1, 1]), case_id="big")  # dice 1
    acc.add(np.array([0, 0]), np.array([1, 0]), case_id="small")  # dice 0
    out = summary_dict(acc, ["background", "fg"])
    assert out["mDSC"] == pytest.approx(8 / 9)
    assert [out["per_case"][c]["mDSC"] for c in ("big", "small")] == [1.0, 0.0]


def test_empty_conventions():
    zeros = np.zeros((3, 3), dtype=np.uint8)
    s = summarize(confusion_counts(zeros, zeros, 3), ["bg", "A", "B"])
    assert (s["mDSC"], s["mIoU"], s["mRec"], s["mPrec"]) == (1.0, 1.0, 1.0, 1.0)
    assert s["per_class"]["A"]["dice"] is None
    # empty ground truth, something predicted: Dice/IoU 0, recall undefined
    pred = zeros.copy()
    pred[0, 0] = 1
    s = summarize(confusion_counts(pred, zeros, 3), ["bg", "A", "B"])
    assert (s["mDSC"], s["mIoU"], s["mPrec"]) == (0.0, 0.0, 0.0)
    assert s["mRec"] is None


def test_torch_and_numpy_agree():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 4, size=(3, 17, 23))
    pred = rng.integers(0, 4, size=(3, 17, 23))
    a = confusion_counts(pred, gt, 4)
    b = confusion_counts(torch.from_numpy(pred), torch.from_numpy(gt).to(torch.uint8), 4)
    c = confusion_counts(torch.from_numpy(pred), gt, 4)  # mixed
    assert isinstance(b, np.ndarray)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    # reference by loops over classes
    for k in range(4):
        assert a[k, 0] == np.sum((pred == k) & (gt == k))
        assert a[k, 1] == np.sum((pred == k) & (gt != k))
        assert a[k, 2] == np.sum((pred != k) & (gt == k))


def test_bad_inputs_are_medplan_errors():
    with pytest.raises(MedplanError, match="shape"):
        confusion_counts(np.zeros((4, 4), int), np.zeros((4, 5), int), 2)
    with pytest.raises(MedplanError, match="shape"):
        confusion_counts(torch.zeros(4, 4, dtype=torch.long), torch.zeros(5, 4, dtype=torch.long), 2)
    with pytest.raises(MedplanError, match="outside 0..1"):
        confusion_counts(np.array([0, 2]), np.array([0, 1]), 2)
    with pytest.raises(MedplanError, match="outside 0..1"):
        confusion_counts(torch.tensor([0, 1]), torch.tensor([0, -1]), 2)
    with pytest.raises(MedplanError, match="integer"):
        confusion_counts(np.array([0.0, 1.0]), np.array([0, 1]), 2)
    with pytest.raises(MedplanError, match="class names"):
        summarize(np.zeros((3, 3), np.int64), ["bg", "A"])


def test_accumulator_batches_case_ids_and_json():
    acc = MetricAccumulator(4)
    batch_pred = np.stack([PRED4, GT4])
    batch_gt = np.stack([GT4, GT4])
    acc.add(batch_pred, batch_gt, case_id=["c1", "c2"])
    assert acc.n_cases == 2
    labels = {"background": 0, "A": 1, "B": 2, "C": 3}  # plans["labels"] form
    out = summary_dict(acc, labels)
    # c2 is perfect, so the global counts are those of c1 plus c2's TPs: TP = 4 + 6, FP = FN = 2
    assert out["mDSC"] == pytest.approx(20 / 24)
    assert out["per_case"]["c2"]["mDSC"] == 1.0
    assert out["per_case"]["c1"]["mDSC"] == pytest.approx(8 / 12)
    assert out["per_case"]["c1"]["dice"]["C"] is None
    assert out["n_cases"] == 2
    text = json.dumps(out, allow_nan=False)  # no NaN ever reaches the JSON
    assert json.loads(text)["per_class"]["C"]["dice"] is None


def test_logits_to_probs_and_labels():
    logits = torch.tensor([-2.0, 0.0, 3.0]).reshape(1, 1, 1, 3)
    probs = logits_to_probs(logits, "bce")
    assert probs.shape == (1, 2, 1, 3)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 1, 3))
    torch.testing.assert_close(probs[:, 1], torch.sigmoid(logits[:, 0]))
    assert logits_to_labels(logits, "bce").tolist() == [[[0, 0, 1]]]  # sigmoid(0) = 0.5 is not > 0.5
    ce = torch.tensor([[[[0.1, 2.0]], [[1.0, 0.0]], [[0.5, 3.0]]]])  # (1, 3, 1, 2)
    assert logits_to_labels(ce, "ce").tolist() == [[[1, 2]]]
    torch.testing.assert_close(logits_to_probs(ce, "ce").sum(1), torch.ones(1, 1, 2))
    with pytest.raises(MedplanError, match="1 logit channel"):
        logits_to_labels(ce, "bce")
    with pytest.raises(MedplanError, match="unknown loss"):
        logits_to_probs(ce, "dice")
