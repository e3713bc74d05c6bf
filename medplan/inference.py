"""Predict: trained folds + new images -> one label map per image at its original size.

A results folder is self-contained: each ``fold_K/checkpoint_*.pt`` holds the weights, the
architecture name, its options and the full plan (``config.json`` beside it is read when a
checkpoint lacks one of them), so a copied ``RESULTS/DATASET/ARCH/`` folder predicts on any
machine without the raw or preprocessed data.

Each fold's network is built and run by the trainer its run records (config.json
``trainer``, else the checkpoint's; :func:`recorded_trainer`), made through its constructor
(:meth:`~medplan.trainers.base.Trainer.for_prediction`): a trainer or architecture that is not
installed here is a one-line error, never a silent fall-back to the base trainer.

Per image: the plan's preprocessing (:func:`medplan.preprocessing.prepare_image` then
:func:`~medplan.preprocessing.normalize`), the network at the planned input size (through the
trainer's ``forward_logits``, so an internal resolution is respected), class probabilities
(:func:`medplan.metrics.logits_to_probs`: softmax, or ``[1-p, p]`` for a BCE head)
averaged over folds and test-time flips, then
:func:`~medplan.metrics.probabilities_to_labels` (the function validation uses):
bilinear interpolation of the probabilities to the original ``(H, W)``, then argmax. Averaging probabilities (not labels)
is what makes the fold ensemble better than majority voting on borderline pixels.
"""
from __future__ import annotations

import concurrent.futures
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from medplan.architectures import get_entry, is_model, list_models
from medplan.errors import MedplanError
from medplan.interop.nnunetv2 import NnunetPredictor, fold_from_pointer
from medplan.interop.postprocessing import apply_postprocessing, read_postprocessing
from medplan.io import atomic_write_png, case_stem, images_by_case, paint_labels, read_image, to_uint8
from medplan.metrics import logits_to_probs, probabilities_to_labels
from medplan.names import check_fold
from medplan.plan import Plan
from medplan.preprocessing import normalize, prepare_image
from medplan.progress import progress_bar
from medplan.rundir import CHECKPOINTS, FOLD_PREFIX, RunDir, checkpoint_name, fold_dirs, is_model_dir
from medplan.trainers.base import Trainer, resolve_device
from medplan.trainers.checkpoint import load_checkpoint
from medplan.trainers.registry import get_trainer, list_trainers

__all__ = ["CHECKPOINTS", "FoldModel", "Predictor", "checkpoint_name", "external_arch", "list_images", "load_fold",
           "load_external_folds", "overlay_image", "predict_folder", "recorded_trainer", "resolve_fold_dirs",
           "tta_flips"]
STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict")
#: medplan's own trainers whose recipe moved into the model cards (issue 12): runs that record
#: them are served by the trainer now registered for their architecture (with the card's facts)
RETIRED_TRAINERS = frozenset({"Internal224Trainer", "HiFormerTrainer", "MISSFormerTrainer", "InternImageTrainer",
                              "TransNeXtTrainer", "SegFormerTrainer", "VWFormerMiTTrainer",
                              "VWFormerConvNeXtTrainer"})
#: plan keys every fold of an ensemble must share (they decide the input and the output)
SHARED_PLAN_KEYS = ("input_size", "channels", "num_classes", "num_outputs", "loss", "normalization")



# ---------------------------------------------------------------------------- loading
@dataclass
class FoldModel:
    """One trained fold, ready to run."""

    fold: str
    checkpoint: Path
    arch: str
    plan: Plan
    model_options: dict
    internal_size: tuple[int, int] | None
    model: nn.Module
    #: ``forward(model, images) -> logits`` of the trainer the run records (its validation path)
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None


def resolve_fold_dirs(path: str | Path, folds: Sequence[int | str] | None = None,
                      checkpoint: str = "best") -> list[Path]:
    """The fold folders to use: ``path`` itself when it is a fold folder, else its ``fold_K``.

    ``folds=None`` takes every numbered fold holding the requested checkpoint (``fold_all``
    only when nothing else is there); an explicitly asked fold without it is an error.
    """
    path = Path(path)
    ckpt = checkpoint_name(checkpoint)
    if not path.is_dir():
        raise MedplanError("results folder not found", path)
    here = RunDir(path)
    if any(here.has_checkpoint(name) for name in CHECKPOINTS) or here.fold is not None:
        if folds:
            raise MedplanError("folds were given but the path is already one fold folder", path)
        if not here.has_checkpoint(ckpt):
            raise MedplanError(f"no {ckpt} in this fold folder (train it first, or use --checkpoint)", path)
        return [path]
    if folds:
        dirs = [path / f"{FOLD_PREFIX}{check_fold(f)}" for f in folds]
        for d in dirs:
            if not RunDir(d).has_checkpoint(ckpt):
                raise MedplanError(f"fold has no {ckpt}" if d.is_dir() else "fold folder not found", d / ckpt)
        return dirs
    present = fold_dirs(path)
    trained = [d for d in present if d.has_checkpoint(ckpt)]
    numbered = [d.path for d in trained if (d.fold or "").isdigit()]
    if numbered:
        return numbered
    if trained:
        return [d.path for d in trained]
    what = f"no {FOLD_PREFIX}K/{ckpt}" + (f" (fold folders: {', '.join(d.name for d in present)})" if present else "")
    raise MedplanError(f"{what}; not a trained results folder", path)


def recorded_trainer(arch: str, recorded: Sequence[str | None], where: Path) -> type[Trainer]:
    """The trainer class a run records (config.json: ``module.Class``; a checkpoint: ``Class``),
    found among the registered ones and the base trainer; a run that records none (made before
    medplan recorded it) gets the trainer registered for ``arch``, as training would. A recorded
    trainer that is not installed here is an error naming the file."""
    registered = get_trainer(arch)
    names = [n for n in recorded if isinstance(n, str) and n]
    if not names:
        return registered
    candidates = [registered, Trainer, *(get_trainer(name) for name in list_trainers())]
    for name in names:
        for cls in candidates:
            qualname = cls.__qualname__
            if name in (qualname, f"{cls.__module__}.{qualname}") or name.endswith(f".{qualname}"):
                return cls
    if any(name.rsplit(".", 1)[-1] in RETIRED_TRAINERS for name in names):
        return registered
    known = ", ".join(sorted({c.__qualname__ for c in candidates}))
    raise MedplanError(f"was trained by trainer {names[0]!r}, which is not installed here (known: {known})", where)


def _registered_forward(arch: str, internal_size: tuple[int, int] | None,
                        plan: Plan) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """``forward_logits`` of ``arch``'s registered trainer at ``internal_size``: for a
    :class:`FoldModel` made by hand without ``forward`` (:func:`load_fold` always sets it)."""
    trainer = get_trainer(arch).for_prediction(".", arch=arch, plan=plan)
    trainer.internal_size = internal_size
    return trainer.forward_logits


def load_fold(fold_dir: str | Path, checkpoint: str = "best", device: str | torch.device = "cpu") -> FoldModel:
    """Build the fold's network through the trainer its run records and load its weights;
    MedplanError naming the file on any problem."""
    run = RunDir(fold_dir)
    ckpt_path = run.checkpoint(checkpoint)
    state = load_checkpoint(ckpt_path, map_location="cpu")
    config = run.config()
    weights = next((state[k] for k in STATE_DICT_KEYS if isinstance(state.get(k), dict)), None)
    if weights is None:
        raise MedplanError(f"checkpoint holds no model weights (keys: {', '.join(sorted(state))})", ckpt_path)
    arch = state.get("arch") or config.get("arch")
    recorded_plan = state.get("plan") or config.get("plan")
    if not arch or not isinstance(recorded_plan, dict):
        raise MedplanError("neither the checkpoint nor config.json names the architecture and the plan", ckpt_path)
    if not is_model(arch):
        raise MedplanError(f"records architecture {arch!r}, which is not installed here "
                           f"(available: {', '.join(list_models())})", ckpt_path)
    plan = Plan.from_json(recorded_plan, source=ckpt_path)
    trainer_cls = recorded_trainer(arch, [config.get("trainer"), state.get("trainer")], ckpt_path)
    options = dict(state.get("model_options") or config.get("model_options") or {})
    options["pretrained"] = False  # the checkpoint's weights replace them; never look for files
    trainer = trainer_cls.for_prediction(run.path, arch=arch, plan=plan, model_options=options,
                                         dataset=str(state.get("dataset") or config.get("dataset") or ""),
                                         fold=run.fold or "all", lr=state.get("lr") or config.get("lr"))
    if "internal_size" in config:  # the size the run used, whatever the trainer's default
        internal = config["internal_size"]
        trainer.internal_size = None if internal is None else (int(internal[0]), int(internal[1]))
    model = trainer.build_network()
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise MedplanError(f"weights do not fit architecture {arch!r} ({first})", ckpt_path) from None
    model.to(device).eval()
    return FoldModel(fold=run.fold if run.fold is not None else run.name, checkpoint=ckpt_path, arch=arch,
                     plan=plan, model_options=trainer.model_options, internal_size=trainer.internal_size,
                     model=model, forward=trainer.forward_logits)


def external_arch(fold_dir: str | Path) -> str | None:
    """The architecture of a fold folder when its own code, not medplan, runs it (``nnunetv2``)."""
    arch = RunDir(fold_dir).config().get("arch")
    return arch if isinstance(arch, str) and is_model(arch) and get_entry(arch).external else None


def load_external_folds(fold_dirs: Sequence[str | Path], checkpoint: str = "best",
                        device: str | torch.device = "cpu", batch_size: int | None = None,
                        tta: bool = False) -> NnunetPredictor:
    """nnunetv2 folds as one predictor (nnU-Net's): each fold's ``checkpoint_*.pt`` names nnU-Net's
    model folder and checkpoint; every fold must share the plan and the nnU-Net trainer."""
    folds, plan, trainer = [], None, None
    for d in fold_dirs:
        run = RunDir(d)
        path = run.checkpoint(checkpoint)
        pointer = load_checkpoint(path, map_location="cpu")
        if not isinstance(pointer.get("plan"), dict):
            raise MedplanError("names no plan (not an nnunetv2 run)", path)
        fold_plan = Plan.from_json(pointer["plan"], source=path)
        fold_trainer = str((pointer.get("nnunet") or {}).get("trainer") or "")
        if plan is not None and (fold_plan.labels != plan.labels or fold_trainer != trainer):
            raise MedplanError("fold was trained with other labels or another nnU-Net trainer than the first fold; "
                               "ensemble folds of one plan only", path)
        plan, trainer = fold_plan, fold_trainer
        folds.append(fold_from_pointer(run.path, pointer, path))
    return NnunetPredictor(folds, plan, trainer, device=device, batch_size=batch_size, tta=tta)


# ---------------------------------------------------------------------------- predictor
def _resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    return resolve_device(device)


def tta_flips(plan: Plan, tta: bool) -> list[tuple[int, ...]]:
    """Flip dims to average over: none; with TTA the horizontal flip, plus the vertical flip
    (and both) only when the plan's augmentation used vertical flips (a vertically flipped
    echocardiogram is not an image the network has seen)."""
    flips: list[tuple[int, ...]] = [()]
    if tta:
        flips.append((-1,))
        if plan.augmentation.vflip:
            flips += [(-2,), (-2, -1)]
    return flips


class Predictor:
    """Trained folds as one model: ``predict(image) -> label map`` at the image's original size.

    >>> predictor = Predictor.from_folder("results/CAMUS/unet")            # doctest: +SKIP
    >>> labels = predictor.predict("new_image.png")                          # doctest: +SKIP
    >>> labels, probs = predictor.predict(array, return_probabilities=True)  # doctest: +SKIP
    """

    def __init__(self, folds: list[FoldModel], *, device: str | torch.device = "cpu", tta: bool = False,
                 batch_size: int | None = None, amp: bool = True):
        if not folds:
            raise MedplanError("a Predictor needs at least one trained fold")
        ref = folds[0]
        for f in folds[1:]:
            diff = [k for k in SHARED_PLAN_KEYS if getattr(f.plan, k) != getattr(ref.plan, k)]
            if diff:
                raise MedplanError(f"fold {f.fold} was trained with a different plan ({', '.join(diff)}) than "
                                   f"fold {ref.fold}; ensemble folds of one plan only", f.checkpoint)
        self.folds = folds
        self.plan = ref.plan
        self.device = _resolve_device(device)
        for f in folds:
            f.model.to(self.device)
        self.tta = bool(tta)
        self.batch_size = int(batch_size or self.plan.batch_size)
        if self.batch_size < 1:
            raise MedplanError(f"batch size must be >= 1, got {batch_size}")
        self.loss = self.plan.loss
        self.input_size = self.plan.input_size
        self.channels = self.plan.channels
        self.class_names = self.plan.class_names
        self.num_classes = self.plan.num_classes
        self.flips = tta_flips(self.plan, self.tta)
        self._forwards = [f.forward or _registered_forward(f.arch, f.internal_size, f.plan) for f in folds]
        self.amp_dtype = None
        if amp and self.device.type == "cuda":
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    @classmethod
    def from_folder(cls, path: str | Path, folds: Sequence[int | str] | None = None, checkpoint: str = "best",
                    device: str | torch.device = "auto", tta: bool = False, batch_size: int | None = None,
                    amp: bool = True) -> "Predictor | NnunetPredictor":
        """A model folder (``.../DATASET/ARCH`` holding ``fold_K/``) or one fold folder (an
        ``nnunetv2`` one gives nnU-Net's predictor, with the same interface)."""
        dev = _resolve_device(device)
        fold_dirs = resolve_fold_dirs(path, folds, checkpoint)
        if external_arch(fold_dirs[0]):
            return load_external_folds(fold_dirs, checkpoint, dev, batch_size, tta)
        return cls([load_fold(d, checkpoint, dev) for d in fold_dirs], device=dev, tta=tta,
                   batch_size=batch_size, amp=amp)

    # -- preprocessing
    def load(self, image: Any) -> np.ndarray:
        """Path or array -> uint8 (H, W[, C]) as the network's preprocessing expects."""
        path = None
        if isinstance(image, (str, os.PathLike)):
            path = Path(image)
            image = read_image(path)
        array = np.asarray(image)
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
            raise MedplanError(f"expected a 2D gray or RGB image (H, W) or (H, W, 3), got shape {array.shape}", path)
        if array.dtype.kind not in "biuf":
            raise MedplanError(f"cannot use pixel type {array.dtype}", path)
        window = self.plan.intensity_window  # the training data's one window for >8-bit images
        return to_uint8(array, (window.low, window.high) if window else None)

    def _prepare(self, image: np.ndarray) -> np.ndarray:
        return prepare_image(image, self.input_size, self.channels)

    # -- network
    @torch.no_grad()
    def probabilities_at_input_size(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) uint8 at the input size -> (B, K, h, w) float32 probabilities on the device,
        the mean over folds and flips."""
        x = normalize(torch.as_tensor(np.asarray(batch)).to(self.device), self.plan.normalization)
        total = None
        for fold, forward in zip(self.folds, self._forwards):
            for dims in self.flips:
                xi = torch.flip(x, dims) if dims else x
                if self.amp_dtype is not None:
                    with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype):
                        logits = forward(fold.model, xi)
                else:
                    logits = forward(fold.model, xi)
                probs = logits_to_probs(logits.float(), self.loss).float()
                if dims:
                    probs = torch.flip(probs, dims)
                total = probs if total is None else total + probs
        return total / float(len(self.folds) * len(self.flips))

    def _finish(self, probs: torch.Tensor, size: tuple[int, int], return_probabilities: bool):
        """(K, h, w) probabilities -> label map (and probabilities) at ``size``."""
        labels, up = probabilities_to_labels(probs, size)
        if return_probabilities:
            return labels, up.float().cpu().numpy()
        return labels

    def predict_batch(self, images: Iterable[Any], return_probabilities: bool = False) -> list:
        """Images (arrays or paths) -> a list of label maps (or ``(labels, probs)`` pairs)."""
        loaded = [self.load(im) for im in images]
        out: list = []
        for start in range(0, len(loaded), self.batch_size):
            chunk = loaded[start:start + self.batch_size]
            out += self._predict_loaded(chunk, return_probabilities)
        return out

    def _predict_loaded(self, chunk: list[np.ndarray], return_probabilities: bool) -> list:
        if not chunk:
            return []
        probs = self.probabilities_at_input_size(np.stack([self._prepare(im) for im in chunk]))
        return [self._finish(probs[i], (int(im.shape[0]), int(im.shape[1])), return_probabilities)
                for i, im in enumerate(chunk)]

    def predict(self, image: Any, return_probabilities: bool = False):
        """One image (array or path) -> label map (H, W) uint8 [, probabilities (K, H, W) float32]."""
        return self.predict_batch([image], return_probabilities)[0]


# ---------------------------------------------------------------------------- folders
def overlay_image(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The image (gray or RGB) with each foreground class painted in its palette colour."""
    img = to_uint8(np.asarray(image))
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    out = paint_labels(img[:, :, :3].astype(np.float32), labels, alpha)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def list_images(input_dir: str | Path) -> list[Path]:
    """Image files of a folder, sorted; duplicate case names or an empty folder are errors."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise MedplanError("input folder not found", input_dir)
    files = list(images_by_case(input_dir).values())
    if not files:
        raise MedplanError("no images in this folder (PNG, JPEG, TIFF, BMP, .mhd, .nii.gz, ...)", input_dir)
    return files


def _save_case(out: Path, stem: str, image: np.ndarray, labels: np.ndarray, probs: np.ndarray | None,
               want_overlay: bool) -> list[Path]:
    written = [out / f"{stem}.png"]
    atomic_write_png(written[0], labels)
    if want_overlay:
        written.append(out / f"{stem}_overlay.png")
        atomic_write_png(written[-1], overlay_image(image, labels))
    if probs is not None:
        written.append(out / f"{stem}.npz")
        tmp = out / f".{stem}.{uuid.uuid4().hex[:8]}.npz"
        np.savez_compressed(tmp, probabilities=probs.astype(np.float32))
        os.replace(tmp, written[-1])
    return written


def predict_folder(model_dir: str | Path | Predictor | NnunetPredictor, input_dir: str | Path, output_dir: str | Path,
                   *, folds: Sequence[int | str] | None = None, checkpoint: str = "best", device: str = "auto",
                   tta: bool = False, save_probabilities: bool = False, overlay: bool = False,
                   batch_size: int | None = None, postprocessing: bool = True,
                   progress: bool | None = None) -> list[Path]:
    """Predict every image of ``input_dir`` into ``output_dir``: ``CASE.png`` (class indices at the
    image's size), optionally ``CASE_overlay.png`` and ``CASE.npz`` (``probabilities``, (K, H, W)).

    With ``postprocessing`` (and a model folder, not a predictor object), the largest-component
    rule the folds chose (``ARCH/postprocessing.json``, nnU-Net's post-processing) is applied to
    the label maps (and overlays); the probabilities stay raw.

    Files are written to a hidden staging folder inside ``output_dir`` and moved in only when
    every image succeeded, so an error leaves ``output_dir`` as it was. Returns the label maps.
    """
    files = list_images(input_dir)
    output_dir = Path(output_dir)
    if output_dir.resolve() == Path(input_dir).resolve():
        raise MedplanError("the output folder is the input folder; label maps would overwrite the images",
                           output_dir)
    given = isinstance(model_dir, (Predictor, NnunetPredictor))
    predictor = model_dir if given else Predictor.from_folder(
        model_dir, folds=folds, checkpoint=checkpoint, device=device, tta=tta, batch_size=batch_size)
    decision = None
    if postprocessing and not given:
        root = Path(model_dir) if is_model_dir(model_dir) else Path(model_dir).parent  # a fold folder's model
        decision = read_postprocessing(root, predictor.num_classes)
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = output_dir / f".medplan_predict.{uuid.uuid4().hex[:8]}.tmp"
    staging.mkdir()
    written: list[Path] = []
    bs = predictor.batch_size
    chunks = [files[i:i + bs] for i in range(0, len(files), bs)]
    try:
        show = progress if progress is not None else True
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            load = lambda paths: [predictor.load(p) for p in paths]  # noqa: E731
            pending = pool.submit(load, chunks[0])
            for i in progress_bar(range(len(chunks)), total=len(chunks), desc="predict", enabled=show):
                images = pending.result()
                if i + 1 < len(chunks):
                    pending = pool.submit(load, chunks[i + 1])  # read ahead while the network runs
                results = predictor._predict_loaded(images, save_probabilities)
                for path, image, res in zip(chunks[i], images, results):
                    labels, probs = res if save_probabilities else (res, None)
                    if decision is not None:
                        labels = apply_postprocessing(labels, decision)
                    written += _save_case(staging, case_stem(path), image, labels, probs, overlay)
        finals = []
        for p in written:
            final = output_dir / p.name
            os.replace(p, final)
            finals.append(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [p for p in finals if p.suffix == ".png" and not p.name.endswith("_overlay.png")]
