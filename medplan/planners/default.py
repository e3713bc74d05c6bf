"""The default planner: the paper's protocol, with augmentation chosen from the data.

Fixed by the protocol (section 2.3 of the paper): 512x512 input, batch 8, AdamW + REX, LR grid
{1e-4, 5e-5, 1e-5}, 100 epochs for the LR search and 150 for cross-validation, early stopping
on validation mIoU, BCE for binary and CE for multi-class tasks, 5 uniformly sized folds,
patient-aware where patients are known. Chosen from the fingerprint: modality, classes,
normalization and the augmentation pipeline. Every decision carries its reason.
"""
from __future__ import annotations

from datetime import datetime
from pathlib import Path

import medplan
from medplan.planners import register_planner
from medplan.plan import Augmentation

INPUT_SIZE = [512, 512]
BATCH_SIZE = 8
LR_GRID = [1e-4, 5e-5, 1e-5]
EPOCHS = {"lr_search": 100, "cv": 150}
N_FOLDS = 5
SPLIT_SEED = 12345
# The paper states "identical early stopping criteria across runs" without numbers; these
# stop a run once validation mIoU has not improved by 0.001 for 30 epochs (a fifth of 150).
EARLY_STOPPING = {"monitor": "val_mIoU", "mode": "max", "patience": 30, "min_delta": 0.001}

# Acquisitions whose images have a canonical orientation: flipping or turning them produces
# anatomy that never occurs (an echo sector is never upside down, the apex is always on top).
CANONICAL_ORIENTATION = {"echocardiography", "ultrasound"}
# Acquisitions with no canonical orientation: a lesion or a polyp looks the same turned.
ORIENTATION_FREE = {"dermoscopy", "endoscopy"}
CONE_EVIDENCE = 0.5  # share of near-black pixels in the top corners above which we see a sector scan


def infer_image_modality(fingerprint: dict, hint: str | None) -> tuple[str, str]:
    """Which acquisition the images come from, and why we think so."""
    if hint and hint != "unknown":
        return hint, f"declared by the importer in dataset.json ({hint})"
    cone = fingerprint.get("border_black_fraction", 0.0)
    gray = fingerprint.get("channels", 1) == 1 or fingerprint.get("rgb_is_gray", False)
    if gray and cone >= CONE_EVIDENCE:
        return "ultrasound", (f"gray images whose top corners are {cone:.0%} black: a sector (cone) "
                              "acquisition such as ultrasound")
    return "unknown", "no importer hint and no sector-scan evidence in the images"


def choose_augmentation(image_modality: str, rgb: bool) -> tuple[dict, str]:
    """Augmentation pipeline for the acquisition: orientation and colour rules, then intensity."""
    aug = Augmentation.off_json()  # every key of the augmentation table, switched off
    aug.update({"brightness": 0.2, "contrast": 0.2, "p_intensity": 0.5, "gamma": [0.8, 1.25], "p_gamma": 0.3,
                "scale": [0.85, 1.15], "p_scale": 0.5, "p_blur": 0.1})
    if image_modality in CANONICAL_ORIENTATION:
        aug.update({"rotation_deg": 10.0, "p_rotation": 0.5, "noise_std": 0.03, "p_noise": 0.15})
        why = (f"{image_modality} has a canonical orientation (sector apex on top): no flips or 90-degree "
               "turns, small rotations (+-10 deg) and scaling for probe position, gamma/brightness/contrast "
               "for gain settings, mild noise for speckle")
    elif image_modality in ORIENTATION_FREE:
        aug.update({"rotation_deg": 180.0, "p_rotation": 0.5, "hflip": True, "vflip": True, "rot90": True})
        why = (f"{image_modality} images have no canonical orientation: flips, 90-degree turns and free "
               "rotation; scaling and brightness/contrast/gamma for acquisition variability")
    else:
        aug.update({"rotation_deg": 15.0, "p_rotation": 0.5, "hflip": True})
        why = ("acquisition unknown: conservative geometry (horizontal flips, +-15 deg rotation, no vertical "
               "flips); scaling and brightness/contrast/gamma")
    if rgb:
        aug.update({"saturation": 0.1, "hue": 0.02, "p_color": 0.3})
        why += ("; colour images carry colour information, so mild colour jitter (saturation 0.1, hue 0.02) "
                "models white-balance differences without changing what the colours mean")
    else:
        why += "; no colour jitter (gray images)"
    return aug, why


@register_planner("default")
def plan_default(fingerprint: dict, dataset_json: dict, *, raw_dir: str | Path) -> dict:
    """Turn a fingerprint into a plan following the paper's protocol."""
    reasons: dict[str, str] = {}
    channels_stored = int(fingerprint.get("channels", dataset_json.get("channels", 1)))
    rgb = channels_stored == 3 and not fingerprint.get("rgb_is_gray", False)
    if channels_stored == 3 and not rgb:
        reasons["modality"] = "stored as RGB but every pixel has R = G = B: treated as gray (1 channel)"
    else:
        reasons["modality"] = f"{'RGB' if rgb else 'gray'} images ({channels_stored} channel(s) stored)"

    image_modality, why_modality = infer_image_modality(fingerprint, dataset_json.get("modality"))
    reasons["image_modality"] = why_modality

    labels = {str(k): int(v) for k, v in dataset_json["labels"].items()}
    n_classes = len(labels)
    task = "binary" if n_classes == 2 else "multiclass"
    share = fingerprint.get("labels", {}).get("pixel_share", {})
    share_text = ", ".join(f"{k} {v:.1%}" for k, v in share.items()) if share else "n/a"
    reasons["labels"] = f"from dataset.json; pixel share: {share_text}"
    reasons["task"] = f"{n_classes} classes including background"
    loss = "bce" if task == "binary" else "ce"
    reasons["loss"] = ("binary task: binary cross-entropy on one logit (paper, ISIC'18)" if loss == "bce"
                       else "multi-class task: cross-entropy (paper)")

    groups = fingerprint.get("groups", {})
    if groups.get("has_groups"):
        split = {"strategy": "group_kfold", "n_folds": N_FOLDS, "seed": SPLIT_SEED,
                 "group_column": groups.get("column") or "group"}
        reasons["split"] = (f"{groups.get('n_groups')} groups (patients) for {fingerprint.get('num_kept')} cases, "
                            f"up to {groups.get('max_cases_per_group')} per group: patient-aware {N_FOLDS}-fold CV "
                            "so no patient is in both training and validation")
    else:
        split = {"strategy": "kfold", "n_folds": N_FOLDS, "seed": SPLIT_SEED, "group_column": None}
        reasons["split"] = f"no patient identifiers: random image-level {N_FOLDS}-fold CV (paper)"

    sizes = fingerprint.get("sizes", {})
    reasons["input_size"] = (f"paper protocol: every model at 512x512 (median image size "
                             f"{sizes.get('median', '?')}, range {sizes.get('min', '?')}..{sizes.get('max', '?')})")
    reasons["batch_size"] = "paper protocol: batch size 8"

    intensity = fingerprint.get("intensity", {})
    mean = [float(m) for m in intensity.get("mean", [0.0] * (3 if rgb else 1))]
    std = [max(float(s), 1e-3) for s in intensity.get("std", [255.0] * (3 if rgb else 1))]
    normalization = {"scheme": "zscore", "mean": mean, "std": std}
    reasons["normalization"] = ("z-score with the dataset's per-channel mean/std over all kept pixels "
                                "(applied on the fly after intensity augmentation)")

    augmentation, reasons["augmentation"] = choose_augmentation(image_modality, rgb)

    reasons["optimizer"] = "paper protocol: AdamW"
    reasons["lr_schedule"] = "paper protocol: REX, lr_t = lr_0 (1 - z) / (1 - z/2), z = t/T"
    reasons["lr_grid"] = "paper protocol: LR search over {1e-4, 5e-5, 1e-5} per model and dataset"
    reasons["lr"] = "used until an LR search (medplan_tune) has chosen one"
    reasons["epochs"] = "paper protocol: 100 epochs per LR-search run, 150 per cross-validation fold"
    reasons["early_stopping"] = ("paper: identical early stopping on validation mIoU for all runs "
                                 f"(patience {EARLY_STOPPING['patience']}, min delta {EARLY_STOPPING['min_delta']})")

    dup = fingerprint.get("duplicates", {})
    excluded = sorted(dup.get("dropped", []))
    reasons["excluded_cases"] = (f"{len(excluded)} duplicate or near-duplicate image(s) dropped to prevent leakage "
                                 f"(identical bytes, identical pixels, {dup.get('hash', 'phash')} Hamming distance "
                                 f"<= {dup.get('threshold', '?')}); see duplicates.csv")

    return {
        "dataset": dataset_json.get("name", fingerprint.get("dataset")),
        "planner": "default",
        "medplan_version": medplan.__version__,
        "created": datetime.now().isoformat(timespec="seconds"),
        "raw_dir": str(Path(raw_dir).resolve()),
        "modality": "rgb" if rgb else "gray",
        "channels": 3 if rgb else 1,
        "image_modality": image_modality,
        "labels": labels,
        "num_classes": n_classes,
        "task": task,
        "loss": loss,
        "num_outputs": 1 if loss == "bce" else n_classes,
        "split": split,
        "input_size": list(INPUT_SIZE),
        "batch_size": BATCH_SIZE,
        "normalization": normalization,
        "augmentation": augmentation,
        "optimizer": {"name": "AdamW", "weight_decay": 0.01, "betas": [0.9, 0.999]},
        "lr_schedule": {"name": "rex"},
        "lr_grid": list(LR_GRID),
        "lr": LR_GRID[0],
        "epochs": dict(EPOCHS),
        "early_stopping": dict(EARLY_STOPPING),
        "duplicates": {k: dup.get(k) for k in ("hash", "hash_size", "threshold", "n_dropped")},
        "num_cases": fingerprint.get("num_cases"),
        "num_kept": fingerprint.get("num_kept"),
        "excluded_cases": excluded,
        "intensity_window": dataset_json.get("intensity_window"),
        "reasons": reasons,
    }
