"""Mamba's selective scan (S6) with a pure-PyTorch path, and mamba-ssm's CUDA kernel when present.

The recurrence, per batch ``b``, channel ``d`` and state ``n`` (Gu & Dao 2023, Alg. 2)::

    delta_t = softplus(delta_t + delta_bias)            (if delta_softplus)
    h_t     = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t     = sum_n C_t * h_t + D * u_t                 (then * silu(z_t) if z is given)

:func:`selective_scan_fn` has mamba-ssm's signature. On CUDA tensors it calls
``mamba_ssm.ops.selective_scan_interface.selective_scan_fn`` when that package imports
(``pip install medplan[cuda]``); everywhere else it runs :func:`selective_scan_chunked`, a
two-level scan that is exact (no approximation) and differentiable by autograd:

1. the sequence is cut into chunks of ``T`` steps; one Python step per position *inside* a
   chunk advances all chunks at once (states start at zero in every chunk);
2. the decay inside each chunk is a cumulative sum of ``delta * A`` in log space
   (``exp`` of it is <= 1, so it never overflows);
3. chunk states are combined sequentially (one step per chunk), and each position gets
   its chunk's incoming state times its in-chunk decay.

So a sequence of 16,384 tokens takes 2 x 128 small Python steps, not 16,384.
:func:`selective_scan_reference` is the direct token-by-token loop, kept for tests.
``MEDPLAN_SELECTIVE_SCAN=torch`` forces the PyTorch path even when the kernel is importable.
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["selective_scan_fn", "selective_scan_chunked", "selective_scan_reference", "cuda_kernel_available"]

_CUDA_FN: Callable | None = None
_CUDA_CHECKED = False


def _load_cuda_kernel() -> Callable | None:
    """mamba-ssm's fused kernel, imported once; None when the optional package is absent or broken."""
    global _CUDA_FN, _CUDA_CHECKED
    if not _CUDA_CHECKED:
        _CUDA_CHECKED = True
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as fn
        except ImportError:
            fn = None
        except Exception as exc:  # a wheel built for another torch/CUDA raises OSError, RuntimeError, ...
            warnings.warn(f"mamba-ssm is installed but failed to import ({type(exc).__name__}: {exc}); "
                          "using the pure-PyTorch selective scan", RuntimeWarning, stacklevel=3)
            fn = None
        _CUDA_FN = fn
    return _CUDA_FN


def cuda_kernel_available() -> bool:
    """Whether mamba-ssm's CUDA selective scan can be used (package importable and a GPU present)."""
    return torch.cuda.is_available() and _load_cuda_kernel() is not None


def _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    if A.is_complex():
        raise NotImplementedError("the pure-PyTorch selective scan supports real A only")
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (batch, dim, length), "
                         f"got {tuple(u.shape)} and {tuple(delta.shape)}")
    dtype_in = u.dtype
    work = torch.float64 if u.dtype == torch.float64 else torch.float32  # fp32 inside, as the kernel
    u, delta, A = u.to(work), delta.to(work), A.to(work)
    if delta_bias is not None:
        delta = delta + delta_bias.to(work)[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    b, d, length = u.shape
    # B, C: (b, n, l) shared by every channel, or (b, g, n, l) with d // g channels per group
    if B.dim() == 3:
        B = B.unsqueeze(1)
    if C.dim() == 3:
        C = C.unsqueeze(1)
    g = B.shape[1]
    if d % g or C.shape[1] != g:
        raise ValueError(f"B/C groups ({B.shape[1]}, {C.shape[1]}) must divide the {d} channels")
    return dtype_in, u, delta, A, B.to(work), C.to(work), g


def _finish(y, u, D, z, dtype_in):
    if D is not None:
        y = y + u * D.to(u.dtype)[None, :, None]
    if z is not None:
        y = y * F.silu(z.to(u.dtype))
    return y.to(dtype_in)


def selective_scan_reference(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                             C: torch.Tensor, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                             delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                             return_last_state: bool = False):
    """The recurrence one token at a time: slow, obviously right; the yardstick for tests."""
    dtype_in, u, delta, A, B, C, g = _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    b, d, length = u.shape
    e = d // g
    Bx = B.repeat_interleave(e, dim=1)  # (b, d, n, l)
    Cx = C.repeat_interleave(e, dim=1)
    h = u.new_zeros(b, d, A.shape[1])
    ys = []
    for t in range(length):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * Bx[..., t]
        ys.append((h * Cx[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    out = _finish(y, u, D, z, dtype_in)
    return (out, h) if return_last_state else out


def _no_autocast(device_type: str):
    """Autocast off (the scan runs in fp32); devices without autocast (meta) need nothing."""
    if device_type in ("cpu", "cuda", "mps", "xpu"):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _default_chunk(length: int) -> int:
    """About sqrt(length), a power of two: balances the in-chunk and the across-chunk steps."""
    return max(1, 2 ** round(math.log2(max(1.0, math.sqrt(length)))))


def selective_scan_chunked(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                           C: torch.Tensor, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                           delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                           return_last_state: bool = False, chunk_size: int | None = None):
    """Exact selective scan in O(T + L/T) Python steps (see the module docstring); fp32 inside."""
    with _no_autocast(u.device.type):
        dtype_in, u, delta, A, B, C, g = _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        b, d, length = u.shape
        n = A.shape[1]
        e = d // g
        T = int(chunk_size) if chunk_size else _default_chunk(length)
        nc = -(-length // T)
        pad = nc * T - length
        if pad:  # delta = 0 there: decay 1 and no input, so the last state passes through unchanged
            u_p, delta_p = F.pad(u, (0, pad)), F.pad(delta, (0, pad))
            B_p, C_p = F.pad(B, (0, pad)), F.pad(C, (0, pad))
        else:
            u_p, delta_p, B_p, C_p = u, delta, B, C
        # layout (b, g, e, nc, T[, n]): channels split into B/C groups, time into chunks
        dt = delta_p.view(b, g, e, nc, T)
        log_a = dt.unsqueeze(-1) * A.view(g, e, 1, 1, n)                        # (b,g,e,nc,T,n), <= 0
        Bt = B_p.view(b, g, n, nc, T).permute(0, 1, 3, 4, 2).unsqueeze(2)      # (b,g,1,nc,T,n)
        Ct = C_p.view(b, g, n, nc, T).permute(0, 1, 3, 4, 2).unsqueeze(2)
        bu = (dt * u_p.view(b, g, e, nc, T)).unsqueeze(-1) * Bt                # (b,g,e,nc,T,n)
        a = torch.exp(log_a)
        # 1) every chunk from a zero state, all chunks advanced together
        h = torch.zeros(b, g, e, nc, n, dtype=u.dtype, device=u.device)
        y_local = []
        for t in range(T):
            h = a[:, :, :, :, t] * h + bu[:, :, :, :, t]
            y_local.append((h * Ct[:, :, :, :, t]).sum(-1))
        y = torch.stack(y_local, dim=-1)                                         # (b,g,e,nc,T)
        # 2) in-chunk decay from the chunk start, in log space
        decay = torch.exp(torch.cumsum(log_a, dim=4))                            # (b,g,e,nc,T,n)
        # 3) states entering each chunk, combined sequentially
        states = [torch.zeros_like(h[:, :, :, 0])]
        for c in range(nc):
            states.append(decay[:, :, :, c, -1] * states[-1] + h[:, :, :, c])
        last = states.pop()
        h_in = torch.stack(states, dim=3)                                        # (b,g,e,nc,n)
        y = y + (decay * h_in.unsqueeze(4) * Ct).sum(-1)
        y = y.reshape(b, d, nc * T)[:, :, :length]
        out = _finish(y, u, D, z, dtype_in)
    return (out, last.reshape(b, d, n)) if return_last_state else out


def selective_scan_fn(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                      D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                      delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                      return_last_state: bool = False):
    """mamba-ssm's ``selective_scan_fn``: its CUDA kernel on CUDA tensors when importable, else PyTorch.

    Shapes: u, delta, z (batch, dim, length); A (dim, state); B, C (batch, state, length) or
    (batch, groups, state, length); D, delta_bias (dim,). Returns (batch, dim, length)
    [, last state (batch, dim, state)].
    """
    if u.is_cuda and os.environ.get("MEDPLAN_SELECTIVE_SCAN", "auto").lower() != "torch":
        fn = _load_cuda_kernel()
        if fn is not None:
            return fn(u, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                      return_last_state=return_last_state)
    return selective_scan_chunked(u, delta, A, B, C, D, z=z, delta_bias=delta_bias,
                                  delta_softplus=delta_softplus, return_last_state=return_last_state)
