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
"""
from __future__ import annotations

import contextlib
import difflib
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from medplan.errors import MedplanError
from medplan.names import MAX_LENGTH, check_fold, check_name, check_names
from medplan.io import atomic_write_bytes, atomic_write_json, atomic_write_text, case_stem, read_image, read_json, read_label

TARGETS = ("pred", "gt")
#: columns of ``pointing_game.csv`` (one row per case and foreground class)
POINTING_COLUMNS = ("dataset", "arch", "maps", "target", "layer", "case_id", "class_index", "class", "energy_in_gt",
                    "gt_fraction", "dice")


# ============================================================================ layer choice
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
class _Record:
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


def trace_layers(forward: Callable[[torch.Tensor], Any], model: nn.Module, x: torch.Tensor) -> list[_Record]:
    """Every submodule's output shape, in the order the modules finish (one no-grad forward)."""
    records: dict[str, _Record] = {}
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
                records[name] = _Record(name, module, shape)
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


# ============================================================================ CAM
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


# ============================================================================ models and cases
@dataclass
class _FoldRunner:
    """One trained fold, wired as prediction runs it."""

    fold: Any
    predictor: Any
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor]

    @property
    def model(self) -> nn.Module:
        return self.predictor.folds[0].model


@dataclass
class CaseMaps:
    """Everything one figure and one pointing-game row need, at the image's original size."""

    case_id: str
    image: np.ndarray
    gt: np.ndarray | None
    pred: np.ndarray
    cams: np.ndarray                       # (n_fg, H, W) in [0, 1]
    dice: dict[str, Any] = field(default_factory=dict)   # mDSC and per-class dice, when known
    energy: list[float] = field(default_factory=list)
    gt_fraction: list[float] = field(default_factory=list)


class ModelExplainer:
    """Grad-CAM of one model (one fold, or several folds averaged) on images."""

    def __init__(self, fold_dirs: Sequence[Path], *, checkpoint: str = "best", device: str = "auto",
                 layer: str = "auto", target: str = "pred"):
        from medplan.inference import Predictor, _resolve_device, _trainer_forward, load_fold

        if target not in TARGETS:
            raise MedplanError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
        self.device = _resolve_device(device)
        folds = [load_fold(d, checkpoint, self.device) for d in fold_dirs]
        self.ensemble = Predictor(folds, device=self.device, amp=False)
        self.runners = [_FoldRunner(f.fold, Predictor([f], device=self.device, amp=False),
                                    _trainer_forward(f.arch, f.internal_size)) for f in folds]
        self.plan = self.ensemble.plan
        self.arch = folds[0].arch
        self.loss = str(self.plan["loss"])
        self.class_names = self.ensemble.class_names
        self.foreground = list(range(1, int(self.plan["num_classes"])))
        self.target = target
        self.layer_request = layer or "auto"
        self.layers: list[LayerChoice] = []
        self.checkpoint = checkpoint

    @property
    def folds(self) -> list[Any]:
        return [r.fold for r in self.runners]

    def _input(self, image: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        from medplan.preprocessing import normalize, prepare_image

        prepared = prepare_image(image, self.ensemble.input_size, self.ensemble.channels)
        x = normalize(torch.tensor(prepared[None], device=self.device), self.plan)
        return prepared, x

    def choose_layers(self, image: np.ndarray) -> list[LayerChoice]:
        """The layer of every fold (found once, on the first image)."""
        if not self.layers:
            _, x = self._input(image)
            self.layers = [choose_layer(lambda t, r=r: r.forward(r.model, t), r.model, x, self.layer_request)
                           for r in self.runners]
        return self.layers

    def explain(self, case_id: str, image: np.ndarray, gt: np.ndarray | None = None,
                dice: dict[str, Any] | None = None) -> CaseMaps:
        """Prediction (fold ensemble) and the fold-averaged class CAMs of one image."""
        from medplan.preprocessing import prepare_label

        image = self.ensemble.load(image)
        size = (int(image.shape[0]), int(image.shape[1]))
        if gt is not None and tuple(gt.shape) != size:
            raise MedplanError(f"case {case_id!r}: ground truth {tuple(gt.shape)} and image {size} differ in size")
        layers = self.choose_layers(image)
        prepared, x = self._input(image)
        probs = self.ensemble.probabilities_at_input_size(np.array(prepared[None]))
        pred = self.ensemble._finish(probs[0], size, False)
        if self.target == "gt":
            if gt is None:
                raise MedplanError(f"--target gt needs a ground truth, and case {case_id!r} has none")
            target_map = prepare_label(gt, self.ensemble.input_size)
        else:
            target_map = probs[0].argmax(0).cpu().numpy()
        masks = np.stack([(target_map == c) for c in self.foreground]).astype(np.float32)
        channels = [output_channel(c, self.loss) for c in self.foreground]
        total = None
        for runner, layer in zip(self.runners, layers):
            maps = class_cams(runner.model, x, masks, channels, layer, runner.forward)
            total = maps if total is None else total + maps
        cams = resize_maps(total / len(self.runners), size)
        out = CaseMaps(case_id, image, gt, pred, cams, dict(dice or {}))
        if gt is not None:
            for i, c in enumerate(self.foreground):
                region = gt == c
                out.energy.append(energy_in_region(cams[i], region))
                out.gt_fraction.append(float(region.mean()))
        return out


def _validation_cases(fold_dir: Path) -> dict[str, dict]:
    path = fold_dir / "validation" / "summary.json"
    if not path.is_file():
        raise MedplanError("fold has no validation results (train it to completion first)", path)
    per_case = read_json(path).get("per_case")
    if not isinstance(per_case, dict) or not per_case:
        raise MedplanError("validation summary has no per_case values", path)
    return per_case


def raw_case_files(plan: dict, dataset: str, case_id: str) -> tuple[Path, Path]:
    """The raw image and label of a case (the plan's ``raw_dir``, else ``$MEDPLAN_RAW/DATASET``)."""
    from medplan.io import IMAGE_SUFFIXES
    from medplan.paths import raw_dir

    check_name(case_id, "case id")
    roots = [Path(plan["raw_dir"])] if plan.get("raw_dir") else []
    roots.append(raw_dir(dataset))
    for root in roots:
        for suffix in (".png", *IMAGE_SUFFIXES):
            image = root / "images" / f"{case_id}{suffix}"
            if image.is_file():
                return image, root / "labels" / f"{case_id}.png"
    raise MedplanError(f"raw image of case {case_id!r} not found", roots[0] / "images" / f"{case_id}.png")


def _read_label(path: Path) -> np.ndarray:
    label = np.asarray(read_label(path))
    if label.ndim == 3:
        label = label[:, :, 0]
    return label.astype(np.int64)


# ============================================================================ figures
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


def _fmt(v: Any) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * float(v):.1f}"


def panel_figure(case: CaseMaps, class_names: Sequence[str], title: str = ""):
    """One row: image, GT (when known), prediction, one CAM overlay per foreground class with a colour bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medplan.inference import overlay_image

    n = 2 + (case.gt is not None) + len(case.cams)
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 2.9), squeeze=False)
    axes = list(axes[0])
    _show(axes[0], case.image, "image")
    k = 1
    if case.gt is not None:
        _show(axes[k], overlay_image(case.image, case.gt), "ground truth")
        k += 1
    dsc = f" (mDSC {_fmt(case.dice.get('mDSC'))})" if case.dice else ""
    _show(axes[k], overlay_image(case.image, case.pred), "prediction" + dsc)
    for i, cam in enumerate(case.cams):
        ax = axes[k + 1 + i]
        im = _heat_overlay(ax, case.image, cam)
        label = f"C_{i + 1}: {class_names[i + 1]}"
        if case.energy:
            label += f"\nenergy in GT {_fmt(case.energy[i])}%"
        ax.set_title(label, fontsize=8)
        ax.set_axis_off()
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    for ax in axes:
        _tile(ax)
    fig.suptitle(title or case.case_id, fontsize=9)
    return fig


def grid_figure(rows: Sequence[tuple[str, CaseMaps]], class_names: Sequence[str], title: str = ""):
    """Fig. 1: one row per architecture; columns GT, prediction, one CAM per foreground class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medplan.inference import overlay_image

    n_fg = len(class_names) - 1
    n_cols = 2 + n_fg
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(2.4 * n_cols + 0.6, 2.4 * len(rows) + 0.4), squeeze=False)
    im = None
    for r, (arch, case) in enumerate(rows):
        gt = case.gt if case.gt is not None else np.zeros_like(case.pred)
        _show(axes[r][0], overlay_image(case.image, gt), "GT" if r == 0 else "")
        _show(axes[r][1], overlay_image(case.image, case.pred), f"prediction (mDSC {_fmt(case.dice.get('mDSC'))})")
        axes[r][0].set_axis_on()
        axes[r][0].set_xticks([])
        axes[r][0].set_yticks([])
        axes[r][0].set_ylabel(arch, fontsize=9)
        for i in range(n_fg):
            ax = axes[r][2 + i]
            im = _heat_overlay(ax, case.image, case.cams[i])
            head = f"C_{i + 1}: {class_names[i + 1]}" if r == 0 else ""
            if case.energy:
                head = (head + "\n" if head else "") + f"energy {_fmt(case.energy[i])}%"
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
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    return buf.getvalue()


def tile_count(fig) -> int:
    """Image tiles of a panel or grid (colour bars not counted)."""
    return sum(1 for ax in fig.axes if ax.get_label() == "tile")


# ============================================================================ outputs
def _safe(name: str) -> str:
    """A file name from a case id or folder name that follows the name rule (never ``..``)."""
    safe = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "-_.") else "_" for ch in str(name))
    if not safe or safe.startswith("."):
        safe = "_" + safe
    return safe[:MAX_LENGTH]


def _merge_csv(path: Path, new: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Rows of an earlier run stay unless this run redid the same keys."""
    if path.is_file():
        try:
            old = pd.read_csv(path, keep_default_na=True)
        except Exception:
            old = pd.DataFrame(columns=new.columns)
        if not old.empty and all(k in old.columns for k in keys):
            done = set(map(tuple, new[list(keys)].astype(str).to_numpy()))
            keep = ~old[list(keys)].astype(str).apply(tuple, axis=1).isin(done)
            new = pd.concat([old[keep], new], ignore_index=True)
    return new


def pointing_rows(case: CaseMaps, *, dataset: str, arch: str, maps: str, target: str, layer: str,
                  class_names: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for i in range(len(case.cams)):
        name = class_names[i + 1]
        rows.append({"dataset": dataset, "arch": arch, "maps": maps, "target": target, "layer": layer,
                     "case_id": case.case_id, "class_index": i + 1, "class": name,
                     "energy_in_gt": case.energy[i] if case.energy else np.nan,
                     "gt_fraction": case.gt_fraction[i] if case.gt_fraction else np.nan,
                     "dice": (case.dice.get("dice") or {}).get(name, np.nan) if case.dice else np.nan})
    return rows


def index_markdown(cases: pd.DataFrame, pointing: pd.DataFrame, title: str, layer: dict) -> str:
    """The index page: one line per case with its Dice and pointing-game values, worst first."""
    lines = [f"# {title}", "",
             f"Grad-CAM layer: `{layer.get('layer')}` ({layer.get('how')}, output {layer.get('output_shape')}); "
             f"target: {layer.get('target')}; folds: {', '.join(map(str, layer.get('folds', [])))}.", "",
             "Energy in GT: share of the class's CAM inside its ground-truth region "
             "(chance level: the region's share of the image).", ""]
    classes = sorted({(int(r.class_index), str(r["class"])) for _, r in pointing.iterrows()}) if len(pointing) else []
    head = ["Case", "mDSC", *[f"Dice {n}" for _, n in classes], *[f"Energy in GT {n}" for _, n in classes], "Panel"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = cases.assign(_m=pd.to_numeric(cases["mDSC"], errors="coerce")).sort_values(["_m", "case_id"],
                                                                                        na_position="last")
    for _, c in order.iterrows():
        p = pointing[pointing["case_id"].astype(str) == str(c["case_id"])]
        by = {int(r.class_index): r for _, r in p.iterrows()}
        dice = [_fmt(by[i]["dice"]) if i in by else "–" for i, _ in classes]
        energy = [_fmt(by[i]["energy_in_gt"]) if i in by else "–" for i, _ in classes]
        lines.append(f"| {c['case_id']} | {_fmt(c['mDSC'])} | " + " | ".join(dice + energy)
                     + f" | [{c['panel']}]({c['panel']}) |")
    return "\n".join(lines) + "\n"


def write_model_outputs(out_dir: Path, explainer: ModelExplainer, results: Iterable[CaseMaps], *, dataset: str,
                        maps: str, source: str) -> tuple[list[Path], list[dict[str, Any]]]:
    """Panels, CAM arrays, layer.json, cases.csv, pointing_game.csv and index.md of one model.

    ``results`` may be a generator: each case is written as soon as it is computed (50 cases at
    512 x 512 need not sit in memory). Returns the paths and this run's pointing-game rows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    layer = {**explainer.layers[0].as_dict(), "arch": explainer.arch, "dataset": dataset,
             "folds": [str(f) for f in explainer.folds], "fold_layers": [c.name for c in explainer.layers],
             "checkpoint": explainer.checkpoint, "target": explainer.target, "maps": maps,
             "method": "Grad-CAM (pytorch-grad-cam), per-class segmentation target, min-max scaled",
             "input_size": list(explainer.ensemble.input_size)}
    written = []
    case_rows, point_rows = [], []
    for case in results:
        stem = _safe(case.case_id)
        title = f"{dataset} / {explainer.arch} ({maps}) — {case.case_id}"
        png = out_dir / f"{stem}.png"
        atomic_write_bytes(png, figure_png(panel_figure(case, explainer.class_names, title)))
        buf = io.BytesIO()
        np.savez_compressed(buf, cams=case.cams.astype(np.float16), classes=np.array(explainer.class_names[1:]))
        atomic_write_bytes(out_dir / f"{stem}_cam.npz", buf.getvalue())
        written.append(png)
        case_rows.append({"case_id": case.case_id, "source": source, "mDSC": case.dice.get("mDSC", np.nan),
                          "layer": layer["layer"], "target": explainer.target, "panel": png.name})
        point_rows += pointing_rows(case, dataset=dataset, arch=explainer.arch, maps=maps, target=explainer.target,
                                    layer=layer["layer"], class_names=explainer.class_names)
    cases = _merge_csv(out_dir / "cases.csv", pd.DataFrame(case_rows), ["case_id"])
    pointing = _merge_csv(out_dir / "pointing_game.csv", pd.DataFrame(point_rows, columns=list(POINTING_COLUMNS)),
                          ["case_id", "class_index"])
    atomic_write_json(out_dir / "layer.json", layer)
    atomic_write_bytes(out_dir / "cases.csv", cases.to_csv(index=False).encode())
    atomic_write_bytes(out_dir / "pointing_game.csv", pointing.to_csv(index=False).encode())
    atomic_write_text(out_dir / "index.md", index_markdown(cases, pointing, f"{dataset} / {explainer.arch}: "
                                                           f"Grad-CAM ({maps})", layer))
    return [*written, out_dir / "layer.json", out_dir / "pointing_game.csv", out_dir / "index.md"], point_rows


# ============================================================================ the whole command
@dataclass
class ExplainRequest:
    dataset: str
    archs: list[str]
    folds: list[Any] | None = None          # None: auto; ["all"]: every trained fold
    worst: int | None = None
    cases: list[str] | None = None
    images: str | Path | None = None
    target: str = "pred"
    layer: str = "auto"
    mean_over_folds: bool = False
    checkpoint: str = "best"
    device: str = "auto"
    output: str | Path | None = None
    progress: bool = True
    results_root: str | Path | None = None


def _model_dir(root: Path, dataset: str, arch: str) -> Path:
    from medplan.evaluation.aggregate import model_path

    path = model_path(root, dataset, arch)
    if not path.is_dir():
        raise MedplanError(f"no results for {dataset}/{arch}", path)
    return path


def _trained_folds(model_dir: Path, checkpoint: str) -> list[Path]:
    from medplan.inference import resolve_fold_dirs

    return resolve_fold_dirs(model_dir, None, checkpoint)


def _fold_dirs(model_dir: Path, folds: Sequence[Any] | None, checkpoint: str) -> list[Path]:
    from medplan.inference import resolve_fold_dirs

    if not folds or list(folds) == ["all"]:
        return _trained_folds(model_dir, checkpoint)
    if "all" in folds:
        raise MedplanError("-f all cannot be combined with fold numbers")
    return resolve_fold_dirs(model_dir, list(folds), checkpoint)


def _all_per_case(fold_dirs: Iterable[Path]) -> dict[str, tuple[Path, dict]]:
    """case -> (the fold that validated it, its per-case values)."""
    out: dict[str, tuple[Path, dict]] = {}
    for d in fold_dirs:
        path = d / "validation" / "summary.json"
        if path.is_file():
            for case_id, values in (read_json(path).get("per_case") or {}).items():
                out[case_id] = (d, values)
    return out


def _worst(dataset: str, arch: str, fold_dir: Path, n: int, root: Path) -> list[str]:
    """The fold's ``n`` worst validation cases (``fold_K/worst_cases.csv``, written by compare)."""
    from medplan.evaluation.compare import worst_cases

    fold = fold_dir.name[len("fold_"):]
    _validation_cases(fold_dir)
    (path,) = worst_cases(dataset, arch, n, folds=[fold], results_root=root)
    return [str(c) for c in pd.read_csv(path, dtype={"case_id": str})["case_id"]]


@dataclass
class _Job:
    """One model (one fold, or folds averaged) on a list of cases, written to ``out_dir``."""

    arch: str
    fold_dirs: list[Path]
    cases: list[str]
    out_dir: Path
    maps: str
    source: str
    per_case: dict[str, dict]


def _common_worst(req: ExplainRequest, root: Path) -> list[str]:
    """Several architectures: per fold the ``worst`` cases hardest for all of them (lowest mean
    per-case mDSC), as the paper picked its Fig. 1 examples."""
    from medplan.evaluation.compare import common_worst_cases

    table = common_worst_cases(req.dataset, req.archs, int(req.worst), results_root=root)
    if req.folds and list(req.folds) != ["all"]:
        table = table[table["fold"].astype(str).isin([str(f) for f in req.folds])]
    if table.empty:
        raise MedplanError(f"{', '.join(req.archs)} share no validation case on the requested folds",
                           root / req.dataset)
    return [str(c) for c in table["case_id"]]


def _plan_jobs(req: ExplainRequest, root: Path) -> list[_Job]:
    """Check every input and decide what runs where, before anything is computed or written."""
    jobs: list[_Job] = []
    modes = [m for m in ("worst", "cases", "images") if getattr(req, m)]
    if len(modes) != 1:
        raise MedplanError("choose the cases with exactly one of --worst N, --case NAME, --images DIR")
    if req.worst is not None and req.worst < 1:
        raise MedplanError(f"--worst must be >= 1, got {req.worst}")
    worst_common = bool(req.worst) and len(req.archs) > 1
    if worst_common:  # one set of cases for the grid; each explained by the fold that validated it
        for arch in req.archs:
            _trained_folds(_model_dir(root, req.dataset, arch), req.checkpoint)
        cases = _common_worst(req, root)
        req = ExplainRequest(**{**req.__dict__, "worst": None, "cases": cases,
                                "folds": req.folds if req.mean_over_folds else None})
    if req.images and req.target == "gt":
        raise MedplanError("--target gt needs ground truth; new images (--images) have none")
    if req.images and len(req.archs) > 1 and req.output:
        raise MedplanError("-o with several architectures would mix their maps; leave it out")
    for arch in req.archs:
        model_dir = _model_dir(root, req.dataset, arch)
        trained = _trained_folds(model_dir, req.checkpoint)
        all_cases = _all_per_case(trained)
        chosen = _fold_dirs(model_dir, req.folds, req.checkpoint)
        if req.cases and not req.folds and not req.mean_over_folds:
            groups: dict[Path, list[str]] = {}
            for case in req.cases:
                if case not in all_cases:
                    raise MedplanError(f"case {case!r} is not a validation case of any trained fold of {arch}",
                                       model_dir)
                groups.setdefault(all_cases[case][0], []).append(case)
            units = [([d], cs) for d, cs in groups.items()]
        elif req.mean_over_folds:
            if req.worst:
                cases: list[str] = []
                for d in chosen:
                    cases += [c for c in _worst(req.dataset, arch, d, req.worst, root) if c not in cases]
            else:
                cases = list(req.cases or [])
                for c in cases:
                    if c not in all_cases:
                        raise MedplanError(f"case {c!r} is not a validation case of any trained fold of {arch}",
                                           model_dir)
            units = [(chosen, cases)]
        else:
            units = []
            for d in chosen:
                if req.worst:
                    units.append(([d], _worst(req.dataset, arch, d, req.worst, root)))
                elif req.cases:
                    valid = _validation_cases(d)
                    for c in req.cases:
                        if c not in valid:
                            raise MedplanError(f"case {c!r} is not a validation case of {d.name}",
                                               d / "validation" / "summary.json")
                    units.append(([d], list(req.cases)))
                else:
                    units.append(([d], []))
        for dirs, cases in units:
            maps = "mean_over_folds" if len(dirs) > 1 or req.mean_over_folds else dirs[0].name
            base = model_dir / "explain_mean" if maps == "mean_over_folds" else dirs[0] / "explain"
            if req.images:
                base = base / _safe(Path(req.images).name)
            out = Path(req.output) if req.output else base
            source = "worst" if req.worst or worst_common else "images" if req.images else "named"
            values = {c: all_cases[c][1] for c in cases if c in all_cases}
            jobs.append(_Job(arch, dirs, cases, out, maps, source, values))
    return jobs


def explain(req: ExplainRequest) -> dict[str, Any]:
    """Run a request: per model its explain folder; with several architectures, the Fig.-1 grid.

    Returns ``{"written": [paths], "layers": {arch: layer}, "pointing": DataFrame}``.
    """
    from medplan.evaluation.aggregate import _results_root
    from medplan.inference import list_images
    from medplan.preprocessing import progress_bar

    root = _results_root(req.results_root)
    if not req.archs:
        raise MedplanError("name at least one architecture (-a)")
    # every name that becomes part of a path is checked before anything is read or written
    check_name(req.dataset, "dataset name")
    check_names(req.archs, "architecture name")
    for fold in req.folds or []:
        check_fold(fold)
    check_names(req.cases or [], "case id")
    if req.target not in TARGETS:
        raise MedplanError(f"--target must be one of {', '.join(TARGETS)}, got {req.target!r}")
    images = list_images(req.images) if req.images else None
    jobs = _plan_jobs(req, root)
    explainers = {id(j): ModelExplainer(j.fold_dirs, checkpoint=req.checkpoint, device=req.device, layer=req.layer,
                                        target=req.target) for j in jobs}
    # the layer of every model (and a common label set for the grid) is checked before the first file is written
    for j in jobs:
        ex = explainers[id(j)]
        if not images and not j.cases:
            raise MedplanError(f"no case to explain for {j.arch} ({j.maps})", j.out_dir.parent)
        sample = read_image(images[0] if images else raw_case_files(ex.plan, req.dataset, j.cases[0])[0])
        ex.choose_layers(np.asarray(sample))
    names = {tuple(ex.class_names) for ex in explainers.values()}
    if len(req.archs) > 1 and len(names) > 1:
        raise MedplanError(f"the architectures of {req.dataset} were trained with different labels; no common grid")
    written: list[Path] = []
    by_case: dict[str, list[tuple[str, CaseMaps, ModelExplainer]]] = {}
    all_points = []
    total = sum(len(images) if images else len(j.cases) for j in jobs)
    bar = iter(progress_bar(range(total), total=total, desc="explain", enabled=req.progress))
    for j in jobs:
        ex = explainers[id(j)]
        items = [(case_stem(p), p, None) for p in images] if images else \
            [(c, *raw_case_files(ex.plan, req.dataset, c)) for c in j.cases]

        def run(items=items, ex=ex, j=j) -> Iterator[CaseMaps]:
            for case_id, image_path, label_path in items:
                gt = None
                if label_path is not None:
                    if not Path(label_path).is_file():
                        raise MedplanError(f"ground truth of case {case_id!r} not found", label_path)
                    gt = _read_label(Path(label_path))
                res = ex.explain(case_id, read_image(image_path), gt, j.per_case.get(case_id))
                if len(req.archs) > 1:  # kept for the grid
                    by_case.setdefault(case_id, []).append((j.arch, res, ex))
                next(bar, None)
                yield res

        paths, points = write_model_outputs(j.out_dir, ex, run(), dataset=req.dataset, maps=j.maps, source=j.source)
        written += paths
        all_points += points
    if len(req.archs) > 1:
        written += write_grids(root, req, by_case)
    pointing = pd.DataFrame(all_points, columns=list(POINTING_COLUMNS))
    if not pointing.empty and not images:
        written += write_arch_pointing_summaries(root, req.dataset, req.archs)
    return {"written": written, "layers": {j.arch: explainers[id(j)].layers[0].name for j in jobs},
            "pointing": pointing}


def write_grids(root: Path, req: ExplainRequest, by_case: dict[str, list[tuple[str, CaseMaps, ModelExplainer]]]
                ) -> list[Path]:
    """``DATASET/explain_grid/CASE.png`` (rows: architectures) and its ``index.md``."""
    out = Path(req.output) / "grid" if req.output else root / req.dataset / "explain_grid"
    written, lines = [], [f"# {req.dataset}: Grad-CAM across architectures", "",
                          f"Rows: {', '.join(req.archs)}; target: {req.target}; "
                          f"maps: {'mean over folds' if req.mean_over_folds else 'the fold that validated the case'}.",
                          "", "| Case | " + " | ".join(f"mDSC {a}" for a in req.archs) + " | Grid |",
                          "|" + "---|" * (len(req.archs) + 2)]
    for case_id, entries in by_case.items():
        rows = [(arch, res) for arch, res, _ in entries]
        names = entries[0][2].class_names
        png = out / f"{_safe(case_id)}.png"
        atomic_write_bytes(png, figure_png(grid_figure(rows, names, f"{req.dataset} — {case_id}")))
        written.append(png)
        dsc = {arch: res.dice.get("mDSC") for arch, res in rows}
        lines.append(f"| {case_id} | " + " | ".join(_fmt(dsc.get(a)) for a in req.archs)
                     + f" | [{png.name}]({png.name}) |")
    atomic_write_text(out / "index.md", "\n".join(lines) + "\n")
    return [*written, out / "index.md"]


def write_arch_pointing_summaries(root: Path, dataset: str, archs: Sequence[str]) -> list[Path]:
    """``DATASET/ARCH/pointing_game.csv``: per class, over every explained case of the model."""
    from medplan.evaluation.aggregate import gather_pointing_game, pointing_game_summary

    written = []
    for arch in archs:
        df = gather_pointing_game(root, datasets=[dataset], archs=[arch])
        if df.empty:
            continue
        path = root / dataset / arch / "pointing_game.csv"
        atomic_write_bytes(path, pointing_game_summary(df).to_csv(index=False).encode())
        written.append(path)
    return written
