"""Figures: the panel of one case (image, GT, prediction, one CAM overlay per class with a
colour bar) and the Fig.-1 grid across architectures, as PNG bytes."""
from __future__ import annotations

import io
import math
from typing import Any, Sequence

import numpy as np

from medplan.explain.cases import CaseMaps
from medplan.inference import overlay_image


def _pyplot():
    """matplotlib's pyplot on the Agg backend (imported on first use: it is slow to import and
    only figures need it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _heat_overlay(ax, image: np.ndarray, cam: np.ndarray, alpha: float = 0.5):
    gray = image if image.ndim == 2 else image[:, :, :3].mean(axis=2)
    ax.imshow(gray, cmap="gray", interpolation="nearest")
    return ax.imshow(cam, cmap="jet", vmin=0.0, vmax=1.0, alpha=alpha, interpolation="bilinear")


def _show(ax, array, title: str) -> None:
    ax.imshow(array, cmap=None if array.ndim == 3 else "gray", interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()


def _tile(ax) -> None:
    ax.set_label("tile")


def percent(v: Any) -> str:
    """A share in [0, 1] as a percentage with one decimal; ``–`` when unknown."""
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * float(v):.1f}"


def panel_figure(case: CaseMaps, class_names: Sequence[str], title: str = ""):
    """One row: image, GT (when known), prediction, one CAM overlay per foreground class with a colour bar."""
    plt = _pyplot()
    n = 2 + (case.gt is not None) + len(case.cams)
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 2.9), squeeze=False)
    axes = list(axes[0])
    _show(axes[0], case.image, "image")
    k = 1
    if case.gt is not None:
        _show(axes[k], overlay_image(case.image, case.gt), "ground truth")
        k += 1
    dsc = f" (mDSC {percent(case.dice.get('mDSC'))})" if case.dice else ""
    _show(axes[k], overlay_image(case.image, case.pred), "prediction" + dsc)
    for i, cam in enumerate(case.cams):
        ax = axes[k + 1 + i]
        im = _heat_overlay(ax, case.image, cam)
        label = f"C_{i + 1}: {class_names[i + 1]}"
        if case.energy:
            label += f"\nenergy in GT {percent(case.energy[i])}%"
        ax.set_title(label, fontsize=8)
        ax.set_axis_off()
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    for ax in axes:
        _tile(ax)
    fig.suptitle(title or case.case_id, fontsize=9)
    return fig


def grid_figure(rows: Sequence[tuple[str, CaseMaps]], class_names: Sequence[str], title: str = ""):
    """Fig. 1: one row per architecture; columns GT, prediction, one CAM per foreground class."""
    plt = _pyplot()
    n_fg = len(class_names) - 1
    n_cols = 2 + n_fg
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(2.4 * n_cols + 0.6, 2.4 * len(rows) + 0.4), squeeze=False)
    im = None
    for r, (arch, case) in enumerate(rows):
        gt = case.gt if case.gt is not None else np.zeros_like(case.pred)
        _show(axes[r][0], overlay_image(case.image, gt), "GT" if r == 0 else "")
        _show(axes[r][1], overlay_image(case.image, case.pred), f"prediction (mDSC {percent(case.dice.get('mDSC'))})")
        axes[r][0].set_axis_on()
        axes[r][0].set_xticks([])
        axes[r][0].set_yticks([])
        axes[r][0].set_ylabel(arch, fontsize=9)
        for i in range(n_fg):
            ax = axes[r][2 + i]
            im = _heat_overlay(ax, case.image, case.cams[i])
            head = f"C_{i + 1}: {class_names[i + 1]}" if r == 0 else ""
            if case.energy:
                head = (head + "\n" if head else "") + f"energy {percent(case.energy[i])}%"
            ax.set_title(head, fontsize=8)
            ax.set_axis_off()
        for ax in axes[r]:
            _tile(ax)
    if im is not None:
        fig.colorbar(im, ax=[a for row in axes for a in row[2:]], fraction=0.02, pad=0.01, label="Grad-CAM")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def figure_png(fig) -> bytes:
    plt = _pyplot()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    return buf.getvalue()


def tile_count(fig) -> int:
    """Image tiles of a panel or grid (colour bars not counted)."""
    return sum(1 for ax in fig.axes if ax.get_label() == "tile")
