"""DCNv3, the deformable convolution of InternImage (Wang et al., CVPR 2023), without mmcv.

Two parts:

* the operator :func:`dcnv3` - for every output pixel and group, a softmax-weighted sum of
  bilinear samples of the (projected) input at ``kernel_h*kernel_w`` points, each point a
  regular kernel tap moved by a learned offset. :func:`dcnv3_pytorch` is a pure-PyTorch
  version (one ``grid_sample`` over all groups and points) that runs anywhere; when the
  official compiled extension (the ``DCNv3`` package built from InternImage's ``ops_dcnv3``)
  is importable and the tensors are on CUDA, :func:`dcnv3` calls it instead. Both follow the
  CUDA kernel's conventions, so they agree within floating-point tolerance;
* the module :class:`DCNv3` with the official parameter names (``dw_conv``, ``offset``,
  ``mask``, ``input_proj``, ``output_proj``) so ImageNet checkpoints load unchanged.

Conventions of the reference (``ops_dcnv3/src/cuda/dcnv3_im2col_cuda.cuh``): tensors are
channels-last ``(N, H, W, C)``; offsets are ordered group, then kernel point, then (x, y);
kernel points run x-major (``p = ix * kernel_h + iy``); output pixel ``(i, j)`` centres its
kernel at input pixel ``(i*stride_h - pad_h + c_h, j*stride_w - pad_w + c_w)`` with
``c = dilation*(kernel-1)//2``; tap ``(ix, iy)`` samples at ``centre + (tap + offset) *
offset_scale`` where ``tap = ix*dilation_w - c_w``; samples outside the image read zeros.
"""
from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DCNv3", "build_norm_layer", "cuda_extension_available", "dcnv3", "dcnv3_pytorch", "kernel_taps"]


# --------------------------------------------------------------- optional compiled kernel
def _load_extension() -> tuple[Any, float]:
    try:
        ext = importlib.import_module("DCNv3")
    except Exception:  # not installed, or built for another torch/CUDA: use the PyTorch path
        return None, 0.0
    if not hasattr(ext, "dcnv3_forward"):
        return None, 0.0
    try:
        version = float(importlib.metadata.version("DCNv3"))
    except Exception:
        version = 1.0
    return ext, version


_EXT, _EXT_VERSION = _load_extension()


def cuda_extension_available() -> bool:
    """Whether the official compiled DCNv3 kernel can be used (it also needs CUDA tensors)."""
    return _EXT is not None and torch.cuda.is_available()


class DCNv3Function(torch.autograd.Function):
    """Autograd wrapper of the compiled kernel (``DCNv3.dcnv3_forward`` / ``dcnv3_backward``)."""

    @staticmethod
    def forward(ctx, value, offset, mask, kernel_h, kernel_w, stride_h, stride_w,  # type: ignore[override]
                pad_h, pad_w, dilation_h, dilation_w, group, group_channels, offset_scale, im2col_step, remove_center):
        ctx.args = (kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
                    group_channels, offset_scale)
        ctx.im2col_step = im2col_step
        ctx.remove_center = remove_center
        extra = [remove_center] if (remove_center or _EXT_VERSION > 1.0) else []
        out = _EXT.dcnv3_forward(value, offset, mask, *ctx.args, im2col_step, *extra)
        ctx.save_for_backward(value, offset, mask)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):  # type: ignore[override]
        value, offset, mask = ctx.saved_tensors
        extra = [ctx.remove_center] if (ctx.remove_center or _EXT_VERSION > 1.0) else []
        grads = _EXT.dcnv3_backward(value, offset, mask, *ctx.args, grad_output.contiguous(), ctx.im2col_step, *extra)
        return (grads[0], grads[1], grads[2]) + (None,) * 13


# ------------------------------------------------------------------------- the operator
def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def kernel_taps(kernel_size: tuple[int, int], dilation: tuple[int, int], remove_center: bool = False,
                device: torch.device | str | None = None) -> torch.Tensor:
    """(P, 2) tap positions (x, y) relative to the kernel centre, in the kernel's x-major order."""
    kh, kw = kernel_size
    dh, dw = dilation
    xs = torch.arange(kw, dtype=torch.float32, device=device) * dw - (dw * (kw - 1)) // 2
    ys = torch.arange(kh, dtype=torch.float32, device=device) * dh - (dh * (kh - 1)) // 2
    taps = torch.stack(torch.meshgrid(xs, ys, indexing="ij"), dim=-1).reshape(-1, 2)
    if remove_center:
        taps = torch.cat([taps[: len(taps) // 2], taps[len(taps) // 2 + 1:]])
    return taps


def _output_size(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


def dcnv3_pytorch(value: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, *,
                  kernel_size: int | tuple[int, int] = 3, stride: int | tuple[int, int] = 1,
                  pad: int | tuple[int, int] = 1, dilation: int | tuple[int, int] = 1, group: int = 1,
                  offset_scale: float = 1.0, remove_center: bool = False) -> torch.Tensor:
    """DCNv3 sampling in pure PyTorch.

    ``value`` (N, H, W, G*Cg), ``offset`` (N, Ho, Wo, G*P*2), ``mask`` (N, Ho, Wo, G*P), already
    normalised (softmax) by the caller; returns (N, Ho, Wo, G*Cg) in ``value``'s dtype. The
    sampling runs in at least float32 (positions in half precision would be off by a fraction
    of a pixel on large maps).
    """
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(stride)
    ph, pw = _pair(pad)
    dh, dw = _pair(dilation)
    n, h, w, c = value.shape
    if c % group:
        raise ValueError(f"channels {c} not divisible by group {group}")
    cg = c // group
    ho, wo = _output_size(h, kh, sh, ph, dh), _output_size(w, kw, sw, pw, dw)
    taps = kernel_taps((kh, kw), (dh, dw), remove_center, value.device)  # (P, 2)
    p = taps.shape[0]
    if offset.shape != (n, ho, wo, group * p * 2) or mask.shape != (n, ho, wo, group * p):
        raise ValueError(f"offset {tuple(offset.shape)} / mask {tuple(mask.shape)} do not fit "
                         f"value {tuple(value.shape)} with {group} groups of {p} points and output {ho}x{wo}")
    dtype = value.dtype
    ct = torch.promote_types(dtype, torch.float32)  # compute dtype: float32, or float64 for float64 input
    taps = taps.to(ct)
    # kernel centres of the output pixels, in input pixel coordinates (x, y)
    cy = torch.arange(ho, dtype=ct, device=value.device) * sh - ph + (dh * (kh - 1)) // 2
    cx = torch.arange(wo, dtype=ct, device=value.device) * sw - pw + (dw * (kw - 1)) // 2
    centre = torch.stack(torch.meshgrid(cx, cy, indexing="xy"), dim=-1)  # (Ho, Wo, 2)
    off = offset.to(ct).view(n, ho, wo, group, p, 2)
    loc = centre[None, :, :, None, None, :] + (taps + off) * offset_scale  # (N, Ho, Wo, G, P, 2) pixels
    # grid_sample with align_corners=False: pixel x maps to (2x + 1) / W - 1
    size = torch.tensor([w, h], dtype=ct, device=value.device)
    grid = (2 * loc + 1) / size - 1
    grid = grid.permute(0, 3, 1, 2, 4, 5).reshape(n * group, ho * wo, p, 2)
    v = value.to(ct).reshape(n, h * w, group, cg).permute(0, 2, 3, 1).reshape(n * group, cg, h, w)
    samples = F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # (NG, Cg, HoWo, P)
    weights = mask.to(ct).view(n, ho * wo, group, p).permute(0, 2, 1, 3).reshape(n * group, 1, ho * wo, p)
    out = (samples * weights).sum(-1)  # (NG, Cg, HoWo)
    return out.view(n, group * cg, ho, wo).permute(0, 2, 3, 1).contiguous().to(dtype)


def dcnv3(value: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, *, kernel_size: int | tuple[int, int] = 3,
          stride: int | tuple[int, int] = 1, pad: int | tuple[int, int] = 1, dilation: int | tuple[int, int] = 1,
          group: int = 1, offset_scale: float = 1.0, remove_center: bool = False, core: str = "auto",
          im2col_step: int = 256) -> torch.Tensor:
    """DCNv3 sampling: the compiled kernel for CUDA tensors when installed (``core="auto"``), else PyTorch.

    ``core`` is ``"auto"``, ``"pytorch"`` or ``"cuda"`` (the last fails if the kernel is absent).
    """
    if core not in ("auto", "pytorch", "cuda"):
        raise ValueError(f"core must be 'auto', 'pytorch' or 'cuda', got {core!r}")
    use_cuda = core == "cuda" or (core == "auto" and _EXT is not None and value.is_cuda)
    if not use_cuda:
        return dcnv3_pytorch(value, offset, mask, kernel_size=kernel_size, stride=stride, pad=pad,
                             dilation=dilation, group=group, offset_scale=offset_scale, remove_center=remove_center)
    if _EXT is None or not value.is_cuda:
        raise RuntimeError("the compiled DCNv3 kernel needs the DCNv3 package and CUDA tensors")
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(stride)
    ph, pw = _pair(pad)
    dh, dw = _pair(dilation)
    dtype = value.dtype
    return DCNv3Function.apply(value.contiguous(), offset.to(dtype).contiguous(), mask.to(dtype).contiguous(),
                               kh, kw, sh, sw, ph, pw, dh, dw, group, value.shape[-1] // group,
                               float(offset_scale), int(im2col_step), int(remove_center))


# ------------------------------------------------------------------------- the module
class ToChannelsFirst(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


class ToChannelsLast(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


def build_norm_layer(dim: int, kind: str, in_format: str = "channels_last", out_format: str = "channels_last",
                     eps: float = 1e-6) -> nn.Sequential:
    """BatchNorm or LayerNorm wrapped in the layout changes it needs.

    The layout modules sit at the same indices as in the reference (e.g. a channels-first
    LayerNorm is ``[ToChannelsLast, LayerNorm]``, so its weight is ``<name>.1.weight``), which
    is what the checkpoint keys depend on.
    """
    layers: list[nn.Module] = []
    if kind == "BN":
        if in_format == "channels_last":
            layers.append(ToChannelsFirst())
        layers.append(nn.BatchNorm2d(dim))
        if out_format == "channels_last":
            layers.append(ToChannelsLast())
    elif kind == "LN":
        if in_format == "channels_first":
            layers.append(ToChannelsLast())
        layers.append(nn.LayerNorm(dim, eps=eps))
        if out_format == "channels_first":
            layers.append(ToChannelsFirst())
    else:
        raise ValueError(f"norm layer must be 'BN' or 'LN', got {kind!r}")
    return nn.Sequential(*layers)


class DCNv3(nn.Module):
    """The DCNv3 block of InternImage on channels-last maps (N, H, W, C) -> (N, H, W, C).

    ``input_proj`` projects the values; a depth-wise 3x3 conv + LN + GELU of the input
    predicts per-group offsets (``offset``) and softmax-normalised point weights (``mask``);
    ``output_proj`` mixes the groups. ``core`` picks the sampling implementation (see :func:`dcnv3`).
    """

    def __init__(self, channels: int = 64, kernel_size: int = 3, stride: int = 1, pad: int = 1, dilation: int = 1,
                 group: int = 4, offset_scale: float = 1.0, remove_center: bool = False, core: str = "auto"):
        super().__init__()
        if channels % group:
            raise ValueError(f"channels must be divisible by group, got {channels} and {group}")
        self.channels = channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.pad = pad
        self.dilation = dilation
        self.group = group
        self.group_channels = channels // group
        self.offset_scale = offset_scale
        self.remove_center = bool(remove_center)
        self.core = core
        points = kernel_size * kernel_size - int(remove_center)
        self.dw_conv = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size, stride=1, padding=(kernel_size - 1) // 2, groups=channels),
            build_norm_layer(channels, "LN", "channels_first", "channels_last"),
            nn.GELU(),
        )
        self.offset = nn.Linear(channels, group * points * 2)
        self.mask = nn.Linear(channels, group * points)
        self.input_proj = nn.Linear(channels, channels)
        self.output_proj = nn.Linear(channels, channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Zero offsets and uniform point weights at start (a plain averaging conv), as the reference."""
        for layer in (self.offset, self.mask):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        for layer in (self.input_proj, self.output_proj):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, h, w, _ = x.shape
        value = self.input_proj(x)
        feat = self.dw_conv(x.permute(0, 3, 1, 2))
        offset = self.offset(feat)
        mask = F.softmax(self.mask(feat).view(n, h, w, self.group, -1), dim=-1).reshape(n, h, w, -1)
        out = dcnv3(value, offset, mask, kernel_size=self.kernel_size, stride=self.stride, pad=self.pad,
                    dilation=self.dilation, group=self.group, offset_scale=self.offset_scale,
                    remove_center=self.remove_center, core=self.core)
        return self.output_proj(out)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, group={self.group}, kernel_size={self.kernel_size}, "
                f"offset_scale={self.offset_scale}, core={self.core!r}")

