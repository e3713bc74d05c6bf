"""The plan's augmentation as batched torch operations, on whatever device the batch is on.

One :class:`BatchAugmenter` serves both loader modes: on a GPU the main process augments
whole uint8 batches after the copy to the device; on a CPU the loader's workers call the very
same object on CPU tensors. Parameters are drawn per sample from exactly the ranges in
``plans.json["augmentation"]`` (see docs/formats.md) and nothing else: the augmenter reads the
plan's :class:`~medplan.plan.Augmentation` (the one table of augmentation keys, checked when the
plan was read).

Order: geometry (rotation, scale (s > 1 enlarges the content), flips and 90-degree turns
composed into one affine map per sample and resampled once: bilinear for the image, nearest
for the label, zeros = background outside), then brightness, contrast (around the image's
mean over all channels), gamma (on 0..1), saturation and hue (one 3x3 matrix in YIQ: luma
kept, chroma scaled and turned; hue in turns, 0.05 = +-18 degrees), gaussian noise (std on
0..1), gaussian blur, all on the 0..255 scale before normalization, then a clamp to 0..255.
Each op has its own draw of its probability per sample; flips and quarter turns are each
drawn with p = 0.5 when enabled, which with all three enabled gives the 8 orientations with
equal chance.

Speed (one CPU core, 512x512; benchmarks/bench_loader.py): the sampling grid is built by
broadcasting, not ``affine_grid``'s matmul (about 15x cheaper); samples whose map is a pure
flip/quarter turn move by exact index operations on the uint8 input, not by interpolation;
every op touches only the samples drawn for it (on the CPU sample by sample on views, with no
gather/scatter copies; on a GPU as one batched gather, op and scatter); brightness and
contrast are fused into one multiply-add, saturation and hue into one matrix; gamma is
``exp2(g * log2(x))`` (3x cheaper than ``pow``); the blur is a separable depthwise convolution
with a kernel of radius ceil(3 sigma) of the largest sigma drawn; ``out=`` lets a loader worker
augment in its shared-memory slot (no batch-sized allocation to page in each batch).

This is ``augmentation.backend = "medplan"`` (the default); ``"nnunet"`` swaps in nnU-Net v2's
pipeline (:mod:`medplan.data.nnunet_aug`), which ignores the keys above.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable

import torch
import torch.nn.functional as F

from medplan.errors import MedplanError
from medplan.plan import Augmentation

# RGB <-> YIQ (NTSC). Y is the ITU-R 601 luma, so scaling I and Q by s is exactly torchvision's
# saturation (a blend with the grey image), and turning the (I, Q) plane shifts the hue.
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114],
                         [0.595716, -0.274453, -0.321263],
                         [0.211456, -0.522591, 0.311135]], dtype=torch.float64)
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)

# Columns of the per-sample uniform draws; fixed, so a sample's parameters for one op do not
# depend on which other ops the plan enables.
_SLOTS = ("rot_gate", "rot", "scale_gate", "scale", "hflip", "vflip", "rot90",
          "bright_gate", "bright", "contrast_gate", "contrast", "gamma_gate", "gamma",
          "color_gate", "saturation", "hue", "noise_gate", "blur_gate", "blur")
_S = {name: i for i, name in enumerate(_SLOTS)}


@dataclass
class AugmentParams:
    """Per-sample parameters (CPU tensors of length B); the identity value where not drawn."""

    angle: torch.Tensor       # radians
    scale: torch.Tensor       # content magnification (> 1 enlarges)
    hflip: torch.Tensor       # bool
    vflip: torch.Tensor       # bool
    rot90: torch.Tensor       # bool: a quarter turn
    brightness: torch.Tensor  # multiplicative factor
    contrast: torch.Tensor    # factor around the image mean
    gamma: torch.Tensor       # exponent on the 0..1 scale
    saturation: torch.Tensor  # factor (1 = unchanged)
    hue: torch.Tensor         # shift in turns
    noise: torch.Tensor       # bool
    blur_sigma: torch.Tensor  # pixels; 0 = no blur

    def __getitem__(self, i: int) -> dict:
        return {f.name: getattr(self, f.name)[i].item() for f in fields(self)}


class BatchAugmenter:
    """``aug(images, segs, generator) -> (images, segs)`` for (B, C, H, W) 0..255 images and (B, H, W) labels.

    Images come back as float32 on the 0..255 scale, labels in their own dtype; the input
    tensors are not modified. With a ``generator`` the result is a function of its seed (and the
    device: the noise is drawn on the batch's device); parameters are always drawn on the CPU.
    """

    def __init__(self, config: Augmentation):
        self.config = config
        c = config
        self.do_rotation = c.p_rotation > 0 and c.rotation_deg > 0
        self.do_scale = c.p_scale > 0 and c.scale != (1.0, 1.0)
        self.do_brightness = c.p_intensity > 0 and c.brightness > 0
        self.do_contrast = c.p_intensity > 0 and c.contrast > 0
        self.do_gamma = c.p_gamma > 0 and c.gamma != (1.0, 1.0)
        self.do_color = c.p_color > 0 and (c.saturation > 0 or c.hue > 0)
        self.do_noise = c.p_noise > 0 and c.noise_std > 0
        self.do_blur = c.p_blur > 0

    def __repr__(self) -> str:
        return f"BatchAugmenter({self.config})"

    # ------------------------------------------------------------------ sampling
    def sample(self, batch: int, channels: int, generator: torch.Generator | None = None) -> AugmentParams:
        """Draw every sample's parameters; colour jitter only for 3-channel images."""
        c = self.config
        gen_device = generator.device if generator is not None else torch.device("cpu")
        u = torch.rand(batch, len(_SLOTS), generator=generator, dtype=torch.float64, device=gen_device).cpu()

        def gate(name: str, p: float, enabled: bool) -> torch.Tensor:
            return (u[:, _S[name]] < p) if enabled else torch.zeros(batch, dtype=torch.bool)

        def uniform(name: str, lo: float, hi: float) -> torch.Tensor:
            return lo + (hi - lo) * u[:, _S[name]]

        def where(mask: torch.Tensor, value: torch.Tensor, identity: float) -> torch.Tensor:
            return torch.where(mask, value, torch.full_like(value, identity))

        rot = gate("rot_gate", c.p_rotation, self.do_rotation)
        scl = gate("scale_gate", c.p_scale, self.do_scale)
        bright = gate("bright_gate", c.p_intensity, self.do_brightness)
        contrast = gate("contrast_gate", c.p_intensity, self.do_contrast)
        gamma = gate("gamma_gate", c.p_gamma, self.do_gamma)
        color = gate("color_gate", c.p_color, self.do_color and channels == 3)
        blur = gate("blur_gate", c.p_blur, self.do_blur)
        r = math.radians(c.rotation_deg)
        return AugmentParams(
            angle=where(rot, uniform("rot", -r, r), 0.0),
            scale=where(scl, uniform("scale", *c.scale), 1.0),
            hflip=(u[:, _S["hflip"]] < 0.5) & c.hflip,
            vflip=(u[:, _S["vflip"]] < 0.5) & c.vflip,
            rot90=(u[:, _S["rot90"]] < 0.5) & c.rot90,
            brightness=where(bright, uniform("bright", 1 - c.brightness, 1 + c.brightness), 1.0),
            contrast=where(contrast, uniform("contrast", 1 - c.contrast, 1 + c.contrast), 1.0),
            gamma=where(gamma, uniform("gamma", *c.gamma), 1.0),
            saturation=where(color, uniform("saturation", 1 - c.saturation, 1 + c.saturation), 1.0),
            hue=where(color, uniform("hue", -c.hue, c.hue), 0.0),
            noise=gate("noise_gate", c.p_noise, self.do_noise),
            blur_sigma=where(blur, uniform("blur", *c.blur_sigma), 0.0),
        )

    # ------------------------------------------------------------------ applying
    def __call__(self, images: torch.Tensor, segs: torch.Tensor, generator: torch.Generator | None = None,
                 out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        check_batch(images, segs)
        params = self.sample(images.shape[0], images.shape[1], generator)
        return self.apply(images, segs, params, generator, out)

    def apply(self, images: torch.Tensor, segs: torch.Tensor, params: AugmentParams,
              generator: torch.Generator | None = None,
              out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply drawn ``params``; ``generator`` is only used for the noise.

        ``out``: a float32 tensor shaped like ``images`` to work in and return (a loader
        worker's shared slot), instead of a fresh batch-sized allocation each call.
        """
        if out is not None and (out.shape != images.shape or out.dtype != torch.float32
                                or out.device != images.device):
            raise ValueError(f"out must be float32 {tuple(images.shape)} on {images.device}, got "
                             f"{out.dtype} {tuple(out.shape)} on {out.device}")
        x, segs = self._geometry(images, segs, params, out)  # x: a float32 tensor of our own (or out)
        dev = x.device

        def on(name: str, ix: torch.Tensor, shape: tuple = (-1, 1, 1, 1)) -> torch.Tensor:
            return getattr(params, name)[ix].to(dev, torch.float32).view(shape)

        def bright_contrast(sub: torch.Tensor, ix: torch.Tensor) -> torch.Tensor:
            # fused: c (b x - mean(b x)) + mean(b x) = (b c) x + (1 - c) b mean(x)
            b, c = on("brightness", ix), on("contrast", ix)
            beta = (1 - c) * b * sub.mean(dim=(1, 2, 3), keepdim=True)
            return sub.mul_(b * c).add_(beta)

        def gamma(sub: torch.Tensor, ix: torch.Tensor) -> torch.Tensor:
            # x^g as 2^(g log2 x) on 0..1: 3x faster than pow on CPU; log2(0) = -inf gives 0
            return sub.clamp_(0, 255).div_(255).log2_().mul_(on("gamma", ix)).exp2_().mul_(255)

        def colour(sub: torch.Tensor, ix: torch.Tensor) -> torch.Tensor:
            m = _color_matrices(params.saturation[ix], params.hue[ix]).to(dev, torch.float32)
            return torch.bmm(m, sub.flatten(2)).view_as(sub)

        noise_gen = _generator_on(dev, generator) if bool(params.noise.any()) else None
        std = 255.0 * self.config.noise_std

        def noise(sub: torch.Tensor, ix: torch.Tensor) -> torch.Tensor:
            return sub.add_(torch.randn(sub.shape, generator=noise_gen, device=dev), alpha=std)

        def blur(sub: torch.Tensor, ix: torch.Tensor) -> torch.Tensor:
            return _gaussian_blur(sub, params.blur_sigma[ix])

        steps = (
            (params.brightness.ne(1) | params.contrast.ne(1), bright_contrast),
            (params.gamma.ne(1), gamma),
            ((params.saturation.ne(1) | params.hue.ne(0)) & (x.shape[1] == 3), colour),
            (params.noise, noise),
            (params.blur_sigma.gt(0), blur),
        )
        touched = False
        for selected, fn in steps:
            if bool(selected.any()):
                x = _on_subset(x, selected.nonzero().flatten(), fn)
                touched = True
        if touched:
            x.clamp_(0, 255)
        if out is not None and x is not out:  # an op on every sample made a new tensor
            x = out.copy_(x)
        return x, segs

    def _geometry(self, images: torch.Tensor, segs: torch.Tensor, params: AugmentParams,
                  out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Move images and labels; one grid_sample (per kind) for every sample that needs one.

        Returns float32 images the caller may modify (never the input tensor) and the labels.
        Flips and quarter turns without interpolation run in the input dtype (uint8: 4x less
        memory traffic than float32) and are exact.
        """
        b, _, h, w = images.shape
        mats = _inverse_matrices(params)  # (B, 2, 2) output pixel offset -> input pixel offset
        interp = params.angle.ne(0) | params.scale.ne(1)
        if h != w:  # a quarter turn of a non-square image crops: needs resampling
            interp |= params.rot90
        exact = (~interp & (params.hflip | params.vflip | params.rot90)).nonzero().flatten().tolist()
        idx = interp.nonzero().flatten()
        x = images.to(torch.float32, copy=True) if out is None else out.copy_(images)
        if exact:
            segs = segs.clone()
            for i in exact:
                x[i] = _permute(images[i], mats[i])
                segs[i] = _permute(segs[i], mats[i])
        if len(idx):
            m = mats.clone()  # to normalized coordinates (align_corners=False): x_n = 2 x / W, y_n = 2 y / H
            m[:, 0, 1] *= h / w
            m[:, 1, 0] *= w / h
            m = m.to(x.device, torch.float32)

            def resample(sub: torch.Tensor, ix: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
                grid = _grid(m[ix.to(m.device)], h, w)
                return F.grid_sample(sub, grid, mode=mode, padding_mode="zeros", align_corners=False)

            x = _on_subset(x, idx, resample)
            # nearest returns input values exactly: labels come back as they were, no rounding needed
            lab = _on_subset(segs[:, None].to(torch.float32), idx, lambda sub, ix: resample(sub, ix, "nearest"))
            segs = lab[:, 0].to(segs.dtype)
        return x, segs


def check_batch(images: torch.Tensor, segs: torch.Tensor) -> None:
    """Every augmenter's input contract: images (B, C, H, W) and labels (B, H, W) of one size."""
    if images.ndim != 4 or segs.ndim != 3 or images.shape[0] != segs.shape[0] \
            or images.shape[-2:] != segs.shape[-2:]:
        raise ValueError(f"expected images (B, C, H, W) and segs (B, H, W), got {tuple(images.shape)} "
                         f"and {tuple(segs.shape)}")


def build_augmentation(augmentation: Augmentation) -> BatchAugmenter:
    """The :class:`BatchAugmenter` for a plan's augmentation (``plan.augmentation``).

    Refuses ``backend == "nnunet"``: that plan asks for nnU-Net's augmentation
    (:func:`medplan.data.loader.make_augmenter` picks by backend), and running medplan's instead
    would change the experiment without a word.
    """
    if augmentation.backend != "medplan":
        raise MedplanError(f"augmentation.backend={augmentation.backend} is not medplan's BatchAugmenter; "
                           "build it with medplan.data.loader.make_augmenter(plan)")
    return BatchAugmenter(augmentation)


# ---------------------------------------------------------------------- helpers
def _on_subset(x: torch.Tensor, idx: torch.Tensor,
               fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """x[idx] = fn(x[idx], idx), leaving the other samples alone; returns x (or its replacement).

    On the CPU a partial subset is done sample by sample on views (no gather/scatter copies);
    on other devices as one batched gather, op and scatter.
    """
    if len(idx) == x.shape[0]:
        return fn(x, idx)
    if x.device.type == "cpu":
        for k in range(len(idx)):
            i = int(idx[k])
            view = x[i:i + 1]
            out = fn(view, idx[k:k + 1])
            if out is not view:
                view.copy_(out)
        return x
    dev_idx = idx.to(x.device)
    x.index_copy_(0, dev_idx, fn(x.index_select(0, dev_idx), idx))
    return x


def _inverse_matrices(p: AugmentParams) -> torch.Tensor:
    """Per sample, the 2x2 map from output to input pixel offsets (about the image centre).

    Forward: hflip, then vflip, then a quarter turn, then rotation, then scaling; this is its
    inverse, built in float64 so flips and quarter turns stay exact 0/+-1 entries.
    """
    n = len(p.angle)
    eye = torch.eye(2, dtype=torch.float64).expand(n, 2, 2)
    cos, sin = torch.cos(-p.angle), torch.sin(-p.angle)
    rot_inv = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    rot_inv = torch.where(p.angle.eq(0).view(n, 1, 1), eye, rot_inv)  # exact identity when not rotated
    quarter_inv = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)  # inverse of [[0, -1], [1, 0]]
    q = torch.where(p.rot90.view(n, 1, 1), quarter_inv.expand(n, 2, 2), eye)
    flips = torch.diag_embed(torch.stack([1.0 - 2.0 * p.hflip.double(), 1.0 - 2.0 * p.vflip.double()], -1))
    m = flips @ q @ rot_inv
    return m / p.scale.view(n, 1, 1)


def _grid(m: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Sampling grid (n, H, W, 2) for normalized 2x2 maps, by broadcasting (no affine_grid bmm)."""
    xs = torch.linspace(-1 + 1 / w, 1 - 1 / w, w, device=m.device).view(1, 1, w)
    ys = torch.linspace(-1 + 1 / h, 1 - 1 / h, h, device=m.device).view(1, h, 1)
    grid = torch.empty(m.shape[0], h, w, 2, device=m.device)
    a = m.view(-1, 4, 1, 1)
    torch.add(xs * a[:, 0], ys * a[:, 1], out=grid[..., 0])
    torch.add(xs * a[:, 2], ys * a[:, 3], out=grid[..., 1])
    return grid


def _permute(t: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Exact resampling for a signed-permutation map ``m`` (flips and quarter turns) of (..., H, W)."""
    if m[0, 1] == 0:  # diagonal: out(x, y) = in(m00 x, m11 y)
        dims = [d for d, s in ((-1, m[0, 0]), (-2, m[1, 1])) if s < 0]
        return t.flip(dims) if dims else t.clone()
    # anti-diagonal: out(x, y) = in(m01 y, m10 x) = in^T(m10 x, m01 y)
    tt = t.transpose(-1, -2)
    dims = [d for d, s in ((-1, m[1, 0]), (-2, m[0, 1])) if s < 0]
    return tt.flip(dims) if dims else tt.clone()


def _color_matrices(saturation: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """(n, 3, 3) RGB maps: scale chroma by ``saturation`` and turn it by ``hue`` turns, luma kept."""
    n = len(saturation)
    theta = 2 * math.pi * hue.double()
    s = saturation.double()
    k = torch.zeros(n, 3, 3, dtype=torch.float64)
    k[:, 0, 0] = 1
    k[:, 1, 1] = s * torch.cos(theta)
    k[:, 1, 2] = -s * torch.sin(theta)
    k[:, 2, 1] = s * torch.sin(theta)
    k[:, 2, 2] = s * torch.cos(theta)
    return _YIQ2RGB @ k @ _RGB2YIQ


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable gaussian blur, one sigma per sample; kernel radius ceil(3 sigma) of the largest."""
    n, c, h, w = x.shape
    radius = max(1, math.ceil(3 * float(sigma.max())))
    radius = min(radius, h - 1, w - 1)  # reflect padding needs radius < size
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (offsets.view(1, -1) / sigma.double().view(-1, 1)) ** 2)
    k = (k / k.sum(1, keepdim=True)).to(x.device, torch.float32).repeat_interleave(c, 0)  # (n*c, 2r+1)
    y = F.pad(x.reshape(1, n * c, h, w), (radius, radius, 0, 0), mode="reflect")
    y = F.conv2d(y, k.view(n * c, 1, 1, -1), groups=n * c)
    y = F.pad(y, (0, 0, radius, radius), mode="reflect")
    y = F.conv2d(y, k.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, h, w)


def _generator_on(device: torch.device, generator: torch.Generator | None) -> torch.Generator | None:
    """A generator on ``device``: the given one, or one seeded from it (deterministic)."""
    if generator is None or generator.device == device or (device.type == "cpu" and generator.device.type == "cpu"):
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    return torch.Generator(device=device).manual_seed(seed)
