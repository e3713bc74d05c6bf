"""nnU-Net v2's default 2D training augmentation, as a medplan recipe option.

Why: with ``--set augmentation.backend=nnunet`` a study trains any architecture of medplan with
nnU-Net's augmentation instead of medplan's, so a comparison with nnU-Net can tell "is it the
architecture or the augmentation?".

The pipeline is the one ``nnunetv2`` (2.5 to 2.8) builds in
``nnUNetTrainer.get_training_transforms`` for a 2D configuration, made of the same
``batchgeneratorsv2`` transforms (nnU-Net v2 moved from batchgenerators to batchgeneratorsv2) with
the same parameters: a spatial transform (rotation p = 0.2, within +-180 degrees, or +-15 when
the patch's aspect ratio exceeds 1.5; scaling p = 0.2 in [0.7, 1.4], one factor for both axes;
no elastic deformation), gaussian noise (p = 0.1), gaussian blur (p = 0.2), multiplicative
brightness (p = 0.15), contrast (p = 0.15), simulated low resolution (p = 0.25), gamma on the
inverted image (p = 0.1) and on the image (p = 0.3), mirroring of both axes (each p = 0.5), then
the padding label -1 back to background. :func:`nnunet_pipeline_differences` compares it with
nnunetv2's own when that is installed. One difference: the blur's ``benchmark`` (time FFT
against direct convolution and keep the faster) is off, because which one wins is a matter of
timing and the two round differently, which would make batches depend on the machine's load.

It runs per sample on the already normalized image (as in nnU-Net, after its normalization) and
on the label map. Labels stay exact: the segmentation is resampled the nnU-Net way (each label's
indicator interpolated, the best-scoring label kept), so every output label is one of the input's
labels or background; :meth:`NnunetAugmenter.__call__` checks that they lie in the class set.

batchgeneratorsv2 draws from numpy's and torch's global generators. Each batch seeds both from
the loader's per-batch generator and puts them back afterwards, so the batches are a function of
``(seed, epoch, k)`` (workers and ``num_workers=0`` give the same batches) and the trainer's own
random state is left untouched. CPU only: the transforms work sample by sample on CPU tensors.
"""
from __future__ import annotations

import math
from importlib import metadata
from typing import Any

import numpy as np
import torch

from medplan.data.augmentation import check_batch
from medplan.errors import MedplanError

PACKAGE = "batchgeneratorsv2"
INSTALL_HINT = ("augmentation.backend=nnunet needs batchgeneratorsv2 (nnU-Net v2's augmentation): "
                "pip install 'medplan[nnunet]'")
#: the ignore value nnU-Net pads the segmentation with outside the image, set back to background at the end
_PAD_LABEL = -1


def require_batchgeneratorsv2() -> str:
    """The installed batchgeneratorsv2 version; a one-line MedplanError naming the extra if missing."""
    try:
        import batchgeneratorsv2  # noqa: F401 - the optional extra
    except ImportError:
        raise MedplanError(INSTALL_HINT) from None
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:  # importable but not installed as a distribution
        return "unknown"


def rotation_range(patch_size: tuple[int, int]) -> tuple[float, float]:
    """nnU-Net's 2D rotation range (radians): +-15 degrees for elongated patches, else +-180."""
    limit = 15.0 if max(patch_size) / min(patch_size) > 1.5 else 180.0
    return (-limit / 360 * 2.0 * np.pi, limit / 360 * 2.0 * np.pi)


def nnunet_2d_transforms(patch_size: tuple[int, int]) -> Any:
    """nnUNetTrainer.get_training_transforms for a 2D configuration (no deep supervision, no
    cascade, no regions, no masking), built from batchgeneratorsv2; blur benchmarking off."""
    require_batchgeneratorsv2()
    from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
    from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
    from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
    from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
    from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
    from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
    from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
    from batchgeneratorsv2.transforms.utils.random import RandomTransform
    from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTansform

    patch_size = tuple(int(s) for s in patch_size)
    return ComposeTransforms([
        SpatialTransform(patch_size, patch_center_dist_from_border=0, random_crop=False, p_elastic_deform=0,
                         p_rotation=0.2, rotation=rotation_range(patch_size), p_scaling=0.2, scaling=(0.7, 1.4),
                         p_synchronize_scaling_across_axes=1, bg_style_seg_sampling=False,
                         border_mode_seg="constant", padding_value_seg=_PAD_LABEL),
        RandomTransform(GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_channel=1, synchronize_channels=True),
                        apply_probability=0.1),
        RandomTransform(GaussianBlurTransform(blur_sigma=(0.5, 1.0), synchronize_channels=False,
                                              synchronize_axes=False, p_per_channel=0.5, benchmark=False),
                        apply_probability=0.2),
        RandomTransform(MultiplicativeBrightnessTransform(multiplier_range=BGContrast((0.75, 1.25)),
                                                          synchronize_channels=False, p_per_channel=1),
                        apply_probability=0.15),
        RandomTransform(ContrastTransform(contrast_range=BGContrast((0.75, 1.25)), preserve_range=True,
                                          synchronize_channels=False, p_per_channel=1),
                        apply_probability=0.15),
        RandomTransform(SimulateLowResolutionTransform(scale=(0.5, 1), synchronize_channels=False,
                                                       synchronize_axes=True, ignore_axes=None, allowed_channels=None,
                                                       p_per_channel=0.5),
                        apply_probability=0.25),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=1, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1),
                        apply_probability=0.1),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=0, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1),
                        apply_probability=0.3),
        MirrorTransform(allowed_axes=(0, 1)),
        RemoveLabelTansform(_PAD_LABEL, 0),
    ])


class NnunetAugmenter:
    """``aug(images, segs, generator, out=None) -> (images, segs)``: nnU-Net's 2D augmentation of
    normalized float32 images (B, C, H, W) and uint8 labels (B, H, W), sample by sample.

    Unlike :class:`~medplan.data.augmentation.BatchAugmenter` it expects images *after* the
    plan's normalization (``normalized_input``). ``out`` (may be ``images`` itself: each sample is
    read before it is written) receives the images; labels come back as a new uint8 tensor.
    """

    normalized_input = True

    def __init__(self, num_classes: int):
        self.version = require_batchgeneratorsv2()
        self.num_classes = int(num_classes)
        self._pipelines: dict[tuple[int, int], Any] = {}  # (H, W) -> the composed transforms

    def __repr__(self) -> str:
        return f"NnunetAugmenter(batchgeneratorsv2 {self.version}, {self.num_classes} classes)"

    def pipeline(self, size: tuple[int, int]) -> Any:
        if size not in self._pipelines:
            self._pipelines[size] = nnunet_2d_transforms(size)
        return self._pipelines[size]

    def __call__(self, images: torch.Tensor, segs: torch.Tensor, generator: torch.Generator | None = None,
                 out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        check_batch(images, segs)
        if images.device.type != "cpu" or images.dtype != torch.float32:
            raise ValueError(f"the nnU-Net augmentation runs on CPU float32 images, got {images.dtype} "
                             f"on {images.device}")
        if out is None:
            out = torch.empty_like(images)
        elif out.shape != images.shape or out.dtype != torch.float32 or out.device != images.device:
            raise ValueError(f"out must be float32 {tuple(images.shape)} on the CPU, got {out.dtype} "
                             f"{tuple(out.shape)} on {out.device}")
        transforms = self.pipeline(tuple(images.shape[-2:]))
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        seg_out = torch.empty_like(segs, dtype=torch.uint8)
        np_state = np.random.get_state()
        with torch.random.fork_rng(devices=[]):  # the CPU generator comes back as it was
            torch.default_generator.manual_seed(seed)  # not torch.manual_seed: leave CUDA's generators alone
            np.random.seed(seed % 2**32)
            try:
                for i in range(images.shape[0]):
                    sample = transforms(image=images[i].clone(), segmentation=segs[i][None].to(torch.int16))
                    self._check_labels(sample["segmentation"])
                    out[i].copy_(sample["image"])
                    seg_out[i].copy_(sample["segmentation"][0])
            finally:
                np.random.set_state(np_state)
        return out, seg_out

    def _check_labels(self, seg: torch.Tensor) -> None:
        lo, hi = torch.aminmax(seg)
        if int(lo) < 0 or int(hi) >= self.num_classes:
            raise RuntimeError(f"nnU-Net augmentation produced labels in [{int(lo)}, {int(hi)}], outside the "
                               f"{self.num_classes} classes: a bug, please report it")


def nnunet_pipeline_differences(patch_size: tuple[int, int]) -> list[str]:
    """How our pipeline differs from nnunetv2's own 2D ``get_training_transforms`` (needs nnunetv2):
    one line per difference, the blur's benchmark flag excepted. Why: a test keeps them equal."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    theirs = nnUNetTrainer.get_training_transforms(tuple(patch_size), rotation_range(tuple(patch_size)), None,
                                                   (0, 1), False).transforms
    ours = nnunet_2d_transforms(patch_size).transforms
    if len(theirs) != len(ours):
        return [f"{len(ours)} transforms here, {len(theirs)} in nnunetv2"]
    return [f"transform {i}: {d}" for i, (a, b) in enumerate(zip(ours, theirs)) for d in _differences(a, b)]


def _differences(a: Any, b: Any, where: str = "") -> list[str]:
    if type(a) is not type(b):
        return [f"{where or 'type'}: {type(a).__name__} here, {type(b).__name__} in nnunetv2"]
    if hasattr(a, "__dict__") and not isinstance(a, type):
        found: list[str] = []
        for key in sorted(set(vars(a)) | set(vars(b))):
            if key in ("benchmark", "benchmark_use_fft", "benchmark_num_runs", "_grid_cache"):
                continue
            found += _differences(vars(a).get(key), vars(b).get(key), f"{where}.{key}")
        return found
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{where}[{i}]")]
    if isinstance(a, (np.ndarray, torch.Tensor)) or isinstance(b, (np.ndarray, torch.Tensor)):
        same = bool(np.array_equal(np.asarray(a), np.asarray(b)))
    else:
        same = math.isclose(a, b) if isinstance(a, float) and isinstance(b, float) else bool(a == b)
    return [] if same else [f"{where}: {a!r} here, {b!r} in nnunetv2"]
