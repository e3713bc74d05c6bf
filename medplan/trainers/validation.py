"""Validation of a set-up trainer: loss and metrics every epoch on the whole validation fold
at the planned size, and at the end the best weights' label maps at each case's original size
(``validation/CASE.png`` + ``validation/summary.json``, through
:func:`medplan.metrics.probabilities_to_labels`, the function prediction uses).

These are the bodies of the trainer's ``validate`` and ``predict_validation_cases`` hooks;
the network runs through its ``forward_batch`` hook.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import numpy as np
import torch
from torch import nn

import medplan.trainers.distributed as ddp
from medplan.data import iterate_validation
from medplan.errors import MedplanError
from medplan.io import atomic_directory, atomic_write_json, atomic_write_png, read_label
from medplan.metrics import (MetricAccumulator, logits_to_labels, logits_to_probs, probabilities_to_labels,
                             summary_dict)
from medplan.preprocessing import load_case
from medplan.progress import progress_bar
from medplan.rundir import BEST, SUMMARY

if TYPE_CHECKING:  # annotations only: base imports this module
    from medplan.trainers.base import Trainer


def val_batch_size(t: "Trainer") -> int:
    return t.settings.val_batch_size or t.batch_size


def validation_batches(t: "Trainer") -> Iterable[dict]:
    return iterate_validation(t.data_dir, t.val_cases, t.plan, batch_size=val_batch_size(t), device=t.device)


@torch.no_grad()
def predict(t: "Trainer", model: nn.Module, batch: dict) -> torch.Tensor:
    """float32 logits of ``batch`` at the planned size (autocast as in training)."""
    with t.autocast():
        return t.forward_batch(model, batch).float()


def validation_metrics(t: "Trainer") -> dict | None:
    """``{"loss", "mIoU", "mDSC"}`` on the whole validation fold (rank 0 computes, every rank
    receives the same numbers); None without validation cases."""
    if not t.val_cases:
        return None
    result = None
    if t.ctx.is_main:
        model = ddp.unwrap(t.model)
        model.eval()
        acc = MetricAccumulator(t.plan.num_classes)
        loss_sum, n = 0.0, 0
        for batch in validation_batches(t):
            logits = predict(t, model, batch)
            loss_sum += float(t.compute_loss(logits, batch)) * logits.shape[0]
            n += logits.shape[0]
            acc.add(logits_to_labels(logits, t.plan.loss), batch["seg"], list(batch["case_ids"]))
        metrics = acc.result(t.class_names)
        result = {"loss": loss_sum / max(n, 1), "mIoU": float(metrics["mIoU"]), "mDSC": float(metrics["mDSC"])}
        model.train()
    return ddp.broadcast_object(t.ctx, result)


def validation_samples(t: "Trainer", n: int) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """``(case_id, image (C, h, w) uint8, label (h, w), prediction (h, w))`` of the first ``n``
    validation cases at the planned size, for the overlays a user watches evolve epoch by epoch
    (always the same cases). The current weights in eval mode, which draws no random numbers, so
    a run's numbers do not depend on whether anyone watches. Call on rank 0 only."""
    cases = list(t.val_cases[:n])
    if not cases:
        return []
    model = ddp.unwrap(t.model)
    model.eval()
    try:
        batch = next(iter(iterate_validation(t.data_dir, cases, t.plan, batch_size=len(cases), device=t.device)))
        labels = logits_to_labels(predict(t, model, batch), t.plan.loss).cpu().numpy().astype(np.uint8)
    finally:
        model.train()
    out = []
    for i, case_id in enumerate(batch["case_ids"]):
        image, seg, _ = load_case(t.data_dir, case_id)
        out.append((case_id, np.asarray(image), np.asarray(seg), labels[i]))
    return out


def write_validation_predictions(t: "Trainer") -> dict:
    """Write ``validation/CASE.png`` at each case's original size and ``validation/summary.json``
    (metrics against the raw labels at original size; ``at_input_size`` as the paper reported).
    The folder is swapped in whole or not at all."""
    label_paths = {c: t.raw_label_path(c) for c in t.val_cases}
    missing = [p for p in label_paths.values() if not p.is_file()]
    if missing:
        raise MedplanError(f"raw label missing ({len(missing)} of {len(label_paths)} validation cases); "
                           "restore the raw dataset, then rerun with --continue", missing[0])
    model = ddp.unwrap(t.model)
    model.eval()
    k = t.plan.num_classes
    at_original, at_input = MetricAccumulator(k), MetricAccumulator(k)
    loss = t.plan.loss
    with atomic_directory(t.run_dir.validation) as tmp:
        batches = progress_bar(validation_batches(t), total=-(-len(t.val_cases) // val_batch_size(t)),
                               desc="predicting validation cases", enabled=t.settings.progress, unit="batch",
                               leave=False)
        for batch in batches:
            logits = predict(t, model, batch)
            at_input.add(logits_to_labels(logits, loss), batch["seg"], list(batch["case_ids"]))
            probs = logits_to_probs(logits, loss)  # (B, K, h, w); [1 - p, p] for bce
            for i, case_id in enumerate(batch["case_ids"]):
                size = [int(v) for v in load_case(t.data_dir, case_id)[2]["original_size"]]
                pred, _ = probabilities_to_labels(probs[i], size)
                gt = read_label(label_paths[case_id])
                if gt.shape != pred.shape:
                    raise MedplanError(f"raw label is {list(gt.shape)}, the case's original size is {size}",
                                       label_paths[case_id])
                atomic_write_png(tmp / f"{case_id}.png", pred)
                at_original.add(pred, gt, case_id)
        summary = summary_dict(at_original, t.class_names)
        summary["at_input_size"] = at_input.result(t.class_names)
        summary.update(evaluated_at="original_size", checkpoint=BEST, best_epoch=t.state.best_epoch,
                       dataset=t.dataset, arch=t.arch, fold=t.fold)
        atomic_write_json(tmp / SUMMARY, summary)
    model.train()
    return summary
