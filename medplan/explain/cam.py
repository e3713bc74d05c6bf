"""Grad-CAM per foreground class, and the energy-based pointing game.

* **CAM**: ``pytorch_grad_cam.GradCAM`` (PyPI ``grad-cam``) with one segmentation target per
  foreground class: the sum of that class's logit over a mask (the prediction shown in the
  panel, or the ground truth). The network runs exactly as in prediction (the trainer's
  ``forward_logits``, so a model that runs at 224 internally is resized inside the explained
  module and its CAM comes back at the input size). Each class map is min-max scaled to
  [0, 1] (grad-cam's convention); an empty target gives 0.
* **Energy-based pointing game**: ``sum(cam * region) / sum(cam)``; NaN for an empty region,
  0 for an all-zero map over a non-empty region.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medplan.errors import MedplanError
from medplan.explain.layers import LayerChoice

class _Explained(nn.Module):
    """The network as prediction runs it (trainer forward: internal resizing), for grad-cam."""

    def __init__(self, model: nn.Module, forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.net = model
        self._forward = forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._forward(self.net, x) if self._forward is not None else self.net(x)
        if isinstance(out, (list, tuple)):  # deep supervision: the full-resolution output
            out = out[0]
        return out


class _MaskTarget:
    """Sum of one logit channel over a mask (grad-cam's SemanticSegmentationTarget, on a tensor)."""

    def __init__(self, channel: int, mask: torch.Tensor):
        self.channel, self.mask = channel, mask

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return (output[self.channel] * self.mask.to(output.device, output.dtype)).sum()


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """No parameter gradients while explaining (only activations need them)."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def output_channel(class_index: int, loss: str) -> int:
    """Logit channel of a foreground class: the class index for CE, the one channel for BCE."""
    return 0 if loss == "bce" else int(class_index)


def class_cams(model: nn.Module, x: torch.Tensor, masks: np.ndarray | torch.Tensor, channels: Sequence[int],
               layer: LayerChoice, forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
               ) -> np.ndarray:
    """Grad-CAM of one normalized image ``x`` (1, C, h, w) for each (channel, mask) target.

    ``masks``: (n, h, w) target masks at the input size. Returns (n, h, w) float32 in [0, 1]
    (all zeros where a mask is empty: nothing to explain). One batched forward and backward.
    """
    # grad-cam pulls in OpenCV: imported when a CAM is computed, not when medplan.explain is
    from pytorch_grad_cam import GradCAM

    masks_t = torch.as_tensor(np.asarray(masks, dtype=np.float32))
    if masks_t.ndim != 3 or len(channels) != masks_t.shape[0]:
        raise MedplanError(f"need one (h, w) mask per channel, got masks {tuple(masks_t.shape)} for {len(channels)}")
    explained = _Explained(model, forward).eval()
    module = dict(model.named_modules())[layer.name]
    targets = [_MaskTarget(int(c), m) for c, m in zip(channels, masks_t)]
    batch = x.detach().float().repeat(len(targets), 1, 1, 1)
    with _frozen(model), GradCAM(model=explained, target_layers=[module],
                                 reshape_transform=layer.reshape_transform()) as cam:
        cam.compute_input_gradient = True  # gradients flow from the input, parameters stay frozen
        maps = cam(input_tensor=batch, targets=targets)
    maps = np.nan_to_num(np.asarray(maps, dtype=np.float32), nan=0.0)
    empty = masks_t.flatten(1).sum(1).numpy() == 0
    maps[empty] = 0.0
    return maps


def resize_maps(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(n, h, w) -> (n, H, W), bilinear."""
    t = torch.as_tensor(np.asarray(maps, dtype=np.float32))[None]
    if tuple(t.shape[-2:]) != tuple(size):
        t = F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False)
    return t[0].clamp_(0, 1).numpy()


def energy_in_region(cam: np.ndarray, region: np.ndarray) -> float:
    """Energy-based pointing game: the share of the map's total inside ``region``.

    NaN when the region is empty (nothing to point at); 0 when the map is all zero although
    the region is not (the model attends to nothing there, e.g. it predicts no such pixel)."""
    cam = np.clip(np.asarray(cam, dtype=np.float64), 0, None)
    region = np.asarray(region, dtype=bool)
    if cam.shape != region.shape:
        raise MedplanError(f"CAM {cam.shape} and region {region.shape} differ in size")
    total = cam.sum()
    if not region.any():
        return float("nan")
    if total <= 0:
        return 0.0
    return float(cam[region].sum() / total)
