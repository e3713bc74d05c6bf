"""The ops of TransNeXt's aggregated attention (:mod:`medplan.architectures.transnext`): the
sliding-window local attention (:func:`local_qk_rpb`, :func:`local_av`) and the position tables
of the pooled branch (:func:`relative_position_cpb`).

Local attention: a pure-PyTorch implementation (shifted views of a zero-padded map, no 9x
unfold copy) runs anywhere; when the authors' compiled ``swattention`` extension is importable
and the tensors are on CUDA, it is used instead (``core="auto"``), in float32 as the PyTorch
path computes.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

LOCAL_ATTENTION_CORES = ("auto", "pytorch", "cuda")
CUDA_NUM_THREADS = 128  # the reference's launch setting for the swattention kernels

try:  # the authors' compiled kernels (DaiShiResearch/TransNeXt/swattention_extension), optional
    import swattention as _SWATTENTION  # type: ignore[import-not-found]
except Exception:  # not installed, or built for another torch/CUDA
    _SWATTENTION = None


def swattention_available() -> bool:
    """Whether the compiled sliding-window attention kernels can be used (they need CUDA tensors)."""
    return _SWATTENTION is not None and torch.cuda.is_available()


# ------------------------------------------------------------------ sliding-window attention ops
def _window_offsets(window_size: int) -> list[tuple[int, int]]:
    """Taps in the kernels' order: row-major over the window (z = ki * window + kj)."""
    return [(ki, kj) for ki in range(window_size) for kj in range(window_size)]


def _padded_grid(t: torch.Tensor, height: int, width: int, window_size: int) -> torch.Tensor:
    """(B, h, N, d) -> (B, h, H + 2p, W + 2p, d), zero-padded by p = window // 2."""
    p = window_size // 2
    b, h, _, d = t.shape
    return F.pad(t.reshape(b, h, height, width, d), (0, 0, p, p, p, p))


def local_padding_mask(height: int, width: int, window_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(N, window**2) bool: True where a window tap falls outside the image (zero padding)."""
    p = window_size // 2
    ones = F.pad(torch.ones(height, width, dtype=torch.bool, device=device), (p, p, p, p))
    taps = [ones[i:i + height, j:j + width] for i, j in _window_offsets(window_size)]
    return ~torch.stack(taps, dim=-1).reshape(height * width, window_size * window_size)


def _local_qk_rpb_pytorch(q: torch.Tensor, k: torch.Tensor, rpb: torch.Tensor, height: int, width: int,
                          window_size: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    b, h, n, d = q.shape
    kp = _padded_grid(k, height, width, window_size)
    qg = q.reshape(b, h, height, width, d)
    # slices of the padded map are views: autograd keeps no per-tap copies of the keys
    attn = torch.stack([(qg * kp[:, :, i:i + height, j:j + width]).sum(-1) for i, j in _window_offsets(window_size)],
                       dim=-1).reshape(b, h, n, window_size * window_size)
    if mask is None:
        mask = local_padding_mask(height, width, window_size, q.device)
    return (attn + rpb.unsqueeze(1)).masked_fill(mask, float("-inf"))


def _local_av_pytorch(attn: torch.Tensor, v: torch.Tensor, height: int, width: int, window_size: int) -> torch.Tensor:
    b, h, n, d = v.shape
    vp = _padded_grid(v, height, width, window_size)
    a = attn.reshape(b, h, height, width, window_size * window_size)
    out = None
    for z, (i, j) in enumerate(_window_offsets(window_size)):
        term = a[..., z:z + 1] * vp[:, :, i:i + height, j:j + width]
        out = term if out is None else out + term
    return out.reshape(b, h, n, d)


class _SWQKRPBFunction(torch.autograd.Function):
    """Autograd wrapper of ``swattention.qk_rpb_forward/backward``."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, query, key, rpb, height, width, window_size):  # type: ignore[override]
        query, key, rpb = query.contiguous(), key.contiguous(), rpb.contiguous()
        ctx.save_for_backward(query, key)
        ctx.geometry = (height, width, window_size)
        return _SWATTENTION.qk_rpb_forward(query, key, rpb, height, width, window_size, CUDA_NUM_THREADS)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, d_attn):  # type: ignore[override]
        query, key = ctx.saved_tensors
        dq, dk, drpb = _SWATTENTION.qk_rpb_backward(d_attn.contiguous(), query, key, *ctx.geometry, CUDA_NUM_THREADS)
        return dq, dk, drpb, None, None, None


class _SWAVFunction(torch.autograd.Function):
    """Autograd wrapper of ``swattention.av_forward/backward``."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, attn, value, height, width, window_size):  # type: ignore[override]
        attn, value = attn.contiguous(), value.contiguous()
        ctx.save_for_backward(attn, value)
        ctx.geometry = (height, width, window_size)
        return _SWATTENTION.av_forward(attn, value, height, width, window_size, CUDA_NUM_THREADS)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, d_out):  # type: ignore[override]
        attn, value = ctx.saved_tensors
        d_attn, d_value = _SWATTENTION.av_backward(d_out.contiguous(), attn, value, *ctx.geometry, CUDA_NUM_THREADS)
        return d_attn, d_value, None, None, None


def _use_cuda(core: str, t: torch.Tensor) -> bool:
    if core not in LOCAL_ATTENTION_CORES:
        raise ValueError(f"local attention core must be one of {LOCAL_ATTENTION_CORES}, got {core!r}")
    if core == "pytorch":
        return False
    ok = swattention_available() and t.is_cuda
    if core == "cuda" and not ok:
        raise RuntimeError("local_attention='cuda' needs the swattention extension and CUDA tensors")
    return ok


def local_qk_rpb(q: torch.Tensor, k: torch.Tensor, rpb: torch.Tensor, height: int, width: int, window_size: int,
                 mask: torch.Tensor | None = None, core: str = "auto") -> torch.Tensor:
    """Sliding-window similarities: ``out[b, h, n, z] = q[b, h, n] . k[b, h, n + tap z] + rpb[h, z]``.

    ``q``, ``k``: (B, heads, H*W, d); ``rpb``: (heads, window**2). Taps outside the image
    (zero padding) are ``-inf``, so the softmax ignores them. ``mask`` is
    :func:`local_padding_mask` (computed when not given; the CUDA kernel needs none).
    """
    if _use_cuda(core, q):
        return _SWQKRPBFunction.apply(q, k, rpb, height, width, window_size)
    return _local_qk_rpb_pytorch(q, k, rpb, height, width, window_size, mask)


def local_av(attn: torch.Tensor, v: torch.Tensor, height: int, width: int, window_size: int,
             core: str = "auto") -> torch.Tensor:
    """Sliding-window aggregation: ``out[b, h, n] = sum_z attn[b, h, n, z] * v[b, h, n + tap z]``
    (taps outside the image contribute nothing). ``attn``: (B, heads, H*W, window**2)."""
    if _use_cuda(core, v):
        return _SWAVFunction.apply(attn, v, height, width, window_size)
    return _local_av_pytorch(attn, v, height, width, window_size)


# ------------------------------------------------------------------ position tables
def _log_spaced(coords: torch.Tensor) -> torch.Tensor:
    return torch.sign(coords) * torch.log2(coords.abs() + 1.0) / math.log2(8)


def _axis_offsets(query_len: int, key_len: int, pretrain_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct (query - pooled key) offsets along one axis, scaled as the reference, and their index."""
    axis_q = torch.arange(query_len, dtype=torch.float32)
    axis_k = F.adaptive_avg_pool1d(axis_q.unsqueeze(0), key_len).squeeze(0)
    rel = (axis_q[:, None] - axis_k[None, :]) / (pretrain_len - 1) * 8
    return torch.unique(rel.reshape(-1), return_inverse=True)


@torch.no_grad()
def relative_position_cpb(query_size: Sequence[int], key_size: Sequence[int], pretrain_size: Sequence[int],
                          device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(index (Nq*Nk,), coordinates (T, 2)) for the continuous position bias.

    Same tables as the reference's ``get_relative_position_cpb`` (up to the order of the rows):
    the pair of offsets (dy, dx) of each query/key pair, deduplicated and log-spaced. The 2-D
    offsets are the product of the 1-D ones, so they are deduplicated per axis, which avoids
    sorting Nq*Nk rows.
    """
    uh, ih = _axis_offsets(int(query_size[0]), int(key_size[0]), int(pretrain_size[0]))
    uw, iw = _axis_offsets(int(query_size[1]), int(key_size[1]), int(pretrain_size[1]))
    ih = ih.reshape(int(query_size[0]), int(key_size[0]))
    iw = iw.reshape(int(query_size[1]), int(key_size[1]))
    # (qh, qw, kh, kw) -> row of the (dy, dx) product table
    index = ih[:, None, :, None] * len(uw) + iw[None, :, None, :]
    table = torch.stack(torch.meshgrid(uh, uw, indexing="ij"), dim=-1).reshape(-1, 2)
    return index.reshape(-1).to(device), _log_spaced(table).to(device)


def pooled_size(height: int, width: int, sr_ratio: int) -> tuple[int, int]:
    """Size of the pooled map (at least 1x1; the reference needs inputs of 32 px or more)."""
    return max(1, height // sr_ratio), max(1, width // sr_ratio)
