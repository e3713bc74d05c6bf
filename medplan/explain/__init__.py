"""Explain: Grad-CAM per foreground class on chosen cases, and how much of it lies on the target.

The paper (section 3.2, Fig. 1) looks at Grad-CAM maps on the 50 worst validation cases per
fold, at M3d-CAM's ``layer='auto'``. Here:

* **CAM**: ``pytorch_grad_cam.GradCAM`` (PyPI ``grad-cam``) with one segmentation target per
  foreground class: the sum of that class's logit over a mask, the mask being the prediction
  shown in the panel (``target="pred"``, as M3d-CAM) or the ground truth (``target="gt"``).
  The network runs exactly as in prediction: the plan's ``prepare_image`` + ``normalize`` and
  the trainer's ``forward_logits`` (so a model that runs at 224 internally is resized inside
  the explained module and its CAM is brought back to the input size, then to the image size).
  Each class map is min-max scaled to [0, 1] (grad-cam's convention); an empty target gives 0.
* **Layer ``auto``**: one forward pass with hooks on every module records outputs in execution
  order; the classifier is the last leaf module with parameters; the chosen layer is the last
  module finishing before it whose output is a spatial map: (B, C, H, W) with H, W > 1, or
  (B, H, W, C) (channels last), or tokens (B, N, C) with N (or N - 1, a class token) an h x w
  grid of the input's aspect ratio. Modules that run more than once per forward are skipped.
* **Energy-based pointing game**: per class and case, ``sum(cam * [gt == c]) / sum(cam)`` at
  the image's original size; ``gt_fraction`` (the class's share of the image) is what a map
  spread evenly would score, the chance level to compare with. A class in the GT with an
  all-zero map (the model predicts none of it) scores 0; a class absent from the GT, NaN.

Output of one model (``fold_K/explain/``, or ``ARCH/explain_mean/`` for ``mean_over_folds``):
``CASE.png`` (panel: image, GT, prediction, one heatmap overlay per class with a colour bar),
``CASE_cam.npz`` (``cams`` (n_fg, H, W) float16, ``classes``), ``layer.json`` (the layer and
how it was chosen), ``cases.csv``, ``pointing_game.csv`` (one row per case and class) and
``index.md``. Across architectures: ``DATASET/explain_grid/`` with the Fig.-1 grid per case.

Layout: :mod:`~medplan.explain.layers` (the layer choice), :mod:`~medplan.explain.cam`
(Grad-CAM and the pointing game), :mod:`~medplan.explain.cases` (raw files, validation
values), :mod:`~medplan.explain.model` (:class:`ModelExplainer`: trained folds as prediction
runs them), :mod:`~medplan.explain.figures`, :mod:`~medplan.explain.outputs` (the files of one
model), :mod:`~medplan.explain.request` (a request's jobs, checked before anything runs) and
:mod:`~medplan.explain.command` (:func:`explain`, the grid).
"""
from __future__ import annotations

from medplan.explain.cam import class_cams, energy_in_region, output_channel, resize_maps
from medplan.explain.cases import CaseMaps, raw_case_files, read_case_label, validated_cases, validation_cases
from medplan.explain.command import GRID_DIR, explain, write_grids
from medplan.explain.figures import figure_png, grid_figure, panel_figure, percent, tile_count
from medplan.explain.layers import LayerChoice, LayerRecord, choose_layer, trace_layers
from medplan.explain.model import TARGETS, ModelExplainer
from medplan.explain.outputs import (
    POINTING_COLUMNS,
    index_markdown,
    merge_csv,
    pointing_rows,
    safe_name,
    write_arch_pointing_summaries,
    write_model_outputs,
)
from medplan.explain.request import EXPLAIN_DIR, EXPLAIN_MEAN_DIR, ExplainRequest, Job, plan_jobs

_safe = safe_name  # the name tests/test_trust_names.py imports

__all__ = [
    "class_cams", "energy_in_region", "output_channel", "resize_maps",
    "CaseMaps", "raw_case_files", "read_case_label", "validated_cases", "validation_cases",
    "GRID_DIR", "explain", "write_grids",
    "figure_png", "grid_figure", "panel_figure", "percent", "tile_count",
    "LayerChoice", "LayerRecord", "choose_layer", "trace_layers",
    "TARGETS", "ModelExplainer",
    "POINTING_COLUMNS", "index_markdown", "merge_csv", "pointing_rows", "safe_name", "write_arch_pointing_summaries",
    "write_model_outputs",
    "EXPLAIN_DIR", "EXPLAIN_MEAN_DIR", "ExplainRequest", "Job", "plan_jobs",
]
