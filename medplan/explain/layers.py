"""Which layer Grad-CAM reads: ``auto`` or a named module, and how its output is laid out.

``auto``: one forward pass with hooks on every module records outputs in execution order; the
classifier is the last leaf module with parameters; the chosen layer is the last module
finishing before it whose output is a spatial map: (B, C, H, W) with H, W > 1, or
(B, H, W, C) (channels last), or tokens (B, N, C) with N (or N - 1, a class token) an h x w
grid of the input's aspect ratio. Modules that run more than once per forward are skipped.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from medplan.errors import MedplanError

@dataclass
class LayerChoice:
    """The layer Grad-CAM reads, and how its output is laid out."""

    name: str
    shape: tuple[int, ...]
    layout: str                      # nchw | nhwc | tokens
    grid: tuple[int, int]            # the spatial grid (h, w) of the output
    prefix_tokens: int = 0           # tokens before the grid (a class token)
    how: str = "auto"                # auto | --layer

    def reshape_transform(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Turn the layer's output into (B, C, h, w) for grad-cam (None when it already is)."""
        if self.layout == "nchw":
            return None
        h, w = self.grid
        if self.layout == "nhwc":
            return lambda t: t.permute(0, 3, 1, 2)
        skip = self.prefix_tokens
        return lambda t: t[:, skip:, :].reshape(t.shape[0], h, w, t.shape[-1]).permute(0, 3, 1, 2)

    def as_dict(self) -> dict[str, Any]:
        return {"layer": self.name, "how": self.how, "output_shape": list(self.shape), "layout": self.layout,
                "grid": list(self.grid), "prefix_tokens": self.prefix_tokens}


@dataclass
class LayerRecord:
    """One module's output in a traced forward pass (the last call's shape, and how many calls)."""

    name: str
    module: nn.Module
    shape: tuple[int, ...] | None
    calls: int = 1


def _close(a: float, b: float, tol: float = 0.15) -> bool:
    return abs(math.log(a / b)) <= tol


def _spatial_layout(shape: tuple[int, ...] | None, in_hw: tuple[int, int]) -> tuple[str, tuple[int, int], int] | None:
    """(layout, grid, prefix tokens) when ``shape`` is a spatial map of an ``in_hw`` input."""
    if shape is None:
        return None
    ratio = in_hw[0] / in_hw[1]
    if len(shape) == 4:
        if shape[2] > 1 and shape[3] > 1 and _close(shape[2] / shape[3], ratio):
            return "nchw", (shape[2], shape[3]), 0
        if shape[1] > 1 and shape[2] > 1 and _close(shape[1] / shape[2], ratio):
            return "nhwc", (shape[1], shape[2]), 0
        return None
    if len(shape) == 3 and shape[1] >= 4:
        for prefix in (0, 1):
            n = shape[1] - prefix
            h = int(round(math.sqrt(n * ratio)))
            if h > 1 and n % h == 0 and n // h > 1 and _close(h / (n // h), ratio):
                return "tokens", (h, n // h), prefix
    return None


def trace_layers(forward: Callable[[torch.Tensor], Any], model: nn.Module, x: torch.Tensor) -> list[LayerRecord]:
    """Every submodule's output shape, in the order the modules finish (one no-grad forward)."""
    records: dict[str, LayerRecord] = {}
    order: list[str] = []
    handles = []

    def hook(name):
        def fn(module, inputs, output):
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else None
            if name in records:
                records[name].calls += 1
                order.remove(name)
                records[name].shape = shape
            else:
                records[name] = LayerRecord(name, module, shape)
            order.append(name)
        return fn

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            forward(x)
    finally:
        for h in handles:
            h.remove()
    return [records[n] for n in order]


def choose_layer(forward: Callable[[torch.Tensor], Any], model: nn.Module, x: torch.Tensor,
                 layer: str = "auto") -> LayerChoice:
    """The layer to explain: ``auto`` (see the module docstring) or a module name of ``model``."""
    records = trace_layers(forward, model, x)
    in_hw = (int(x.shape[-2]), int(x.shape[-1]))
    if layer and layer != "auto":
        names = dict(model.named_modules())
        if layer not in names or not layer:
            near = difflib.get_close_matches(layer, [n for n in names if n], n=3)
            hint = f" (did you mean {', '.join(near)}?)" if near else " (see the model's named_modules())"
            raise MedplanError(f"unknown layer {layer!r} for {type(model).__name__}{hint}")
        rec = next((r for r in records if r.name == layer), None)
        if rec is None:
            raise MedplanError(f"layer {layer!r} does not run in the forward pass; pick another")
        if rec.calls > 1:
            raise MedplanError(f"layer {layer!r} runs {rec.calls} times per forward pass; pick another")
        found = _spatial_layout(rec.shape, in_hw)
        if found is None:
            raise MedplanError(f"layer {layer!r} outputs {rec.shape}, not a spatial feature map "
                               "((B, C, H, W), (B, H, W, C) or (B, N, C) tokens on a grid)")
        return LayerChoice(layer, rec.shape, found[0], found[1], found[2], how="--layer")
    classifier = None
    for i, r in enumerate(records):
        if not any(True for _ in r.module.children()) and any(True for _ in r.module.parameters(recurse=False)):
            classifier = i
    candidates = records[:classifier] if classifier is not None else records
    for r in reversed(candidates):
        found = _spatial_layout(r.shape, in_hw) if r.calls == 1 else None
        if found is not None:
            return LayerChoice(r.name, r.shape, found[0], found[1], found[2], how="auto")
    raise MedplanError(f"{type(model).__name__}: no module before the classifier outputs a spatial feature map; "
                       "name one with --layer")
