"""One model to explain: trained folds, run as prediction runs them, and their class CAMs."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from medplan.errors import MedplanError
from medplan.explain.cam import class_cams, energy_in_region, output_channel, resize_maps
from medplan.explain.cases import CaseMaps
from medplan.explain.layers import LayerChoice, choose_layer
from medplan.inference import FoldModel, Predictor, load_fold
from medplan.metrics import probabilities_to_labels
from medplan.preprocessing import normalize, prepare_image, prepare_label

TARGETS = ("pred", "gt")


class ModelExplainer:
    """Grad-CAM of one model (one fold, or several folds averaged) on images.

    The prediction is the folds' ensemble (:class:`~medplan.inference.Predictor`); the CAM of
    each fold runs through the forward its run records (:attr:`FoldModel.forward`), then the
    maps are averaged over the folds."""

    def __init__(self, fold_dirs: Sequence[Path], *, checkpoint: str = "best", device: str = "auto",
                 layer: str = "auto", target: str = "pred"):
        if target not in TARGETS:
            raise MedplanError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
        models = [load_fold(d, checkpoint, "cpu") for d in fold_dirs]
        self.ensemble = Predictor(models, device=device, amp=False)  # resolves the device, moves the folds there
        self.device = self.ensemble.device
        self.models: list[FoldModel] = models
        self.plan = self.ensemble.plan
        self.arch = models[0].arch
        self.loss = self.plan.loss
        self.class_names = self.ensemble.class_names
        self.foreground = list(range(1, self.plan.num_classes))
        self.target = target
        self.layer_request = layer or "auto"
        self.layers: list[LayerChoice] = []
        self.checkpoint = checkpoint

    @property
    def folds(self) -> list[Any]:
        return [m.fold for m in self.models]

    def _input(self, image: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        prepared = prepare_image(image, self.ensemble.input_size, self.ensemble.channels)
        x = normalize(torch.tensor(prepared[None], device=self.device), self.plan.normalization)
        return prepared, x

    def choose_layers(self, image: np.ndarray) -> list[LayerChoice]:
        """The layer of every fold (found once, on the first image)."""
        if not self.layers:
            _, x = self._input(image)
            self.layers = [choose_layer(lambda t, m=m: m.forward(m.model, t), m.model, x, self.layer_request)
                           for m in self.models]
        return self.layers

    def explain(self, case_id: str, image: np.ndarray, gt: np.ndarray | None = None,
                dice: dict[str, Any] | None = None) -> CaseMaps:
        """Prediction (fold ensemble) and the fold-averaged class CAMs of one image."""
        image = self.ensemble.load(image)
        size = (int(image.shape[0]), int(image.shape[1]))
        if gt is not None and tuple(gt.shape) != size:
            raise MedplanError(f"case {case_id!r}: ground truth {tuple(gt.shape)} and image {size} differ in size")
        layers = self.choose_layers(image)
        prepared, x = self._input(image)
        probs = self.ensemble.probabilities_at_input_size(np.array(prepared[None]))
        pred = probabilities_to_labels(probs[0], size)[0]
        if self.target == "gt":
            if gt is None:
                raise MedplanError(f"--target gt needs a ground truth, and case {case_id!r} has none")
            target_map = prepare_label(gt, self.ensemble.input_size)
        else:
            target_map = probs[0].argmax(0).cpu().numpy()
        masks = np.stack([(target_map == c) for c in self.foreground]).astype(np.float32)
        channels = [output_channel(c, self.loss) for c in self.foreground]
        total = None
        for m, layer in zip(self.models, layers):
            maps = class_cams(m.model, x, masks, channels, layer, m.forward)
            total = maps if total is None else total + maps
        cams = resize_maps(total / len(self.models), size)
        out = CaseMaps(case_id, image, gt, pred, cams, dict(dice or {}))
        if gt is not None:
            for i, c in enumerate(self.foreground):
                region = gt == c
                out.energy.append(energy_in_region(cams[i], region))
                out.gt_fraction.append(float(region.mean()))
        return out
