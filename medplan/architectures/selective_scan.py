"""Mamba's selective scan (S6) with a pure-PyTorch path, and mamba-ssm's CUDA kernel when present.

The recurrence, per batch ``b``, channel ``d`` and state ``n`` (Gu & Dao 2023, Alg. 2)::

    delta_t = softplus(delta_t + delta_bias)            (if delta_softplus)
    h_t     = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t     = sum_n C_t * h_t + D * u_t                 (then * silu(z_t) if z is given)

:func:`selective_scan_fn` has mamba-ssm's signature. On CUDA tensors it calls
``mamba_ssm.ops.selective_scan_interface.selective_scan_fn`` when that package imports
(``pip install medplan[cuda]``); everywhere else it runs :func:`selective_scan_chunked`, a
two-level scan that is exact (no approximation) and differentiable:

1. the sequence is cut into chunks of ``T`` (about sqrt(length)) steps; one Python step per
   position *inside* a chunk advances all chunks at once from a zero state;
2. the states entering each chunk are combined sequentially (one step per chunk) with the
   chunk's total decay ``exp(A * sum delta)`` (<= 1, never overflows);
3. a second in-chunk pass from those entering states gives every state, and ``y = C h``.

So a sequence of 16,384 tokens takes 3 x 128 small Python steps, not 16,384. The work runs
in blocks of channels (and groups and batch items) of about :data:`BLOCK_ELEMENTS` (batch,
length, state, channel) elements, so the state tensors stay cache-sized and memory is bounded;
on a GPU the blocks are :data:`GPU_BLOCK_ELEMENTS` large, since there every step is a kernel
launch (at 256x256, batch 8 a Swin-UMamba step went from 4.9 s to 0.31 s on an H200). The
backward is written by hand (two custom ops, opaque to ``torch.compile``): autograd keeps
only the inputs and one state per chunk, the backward recomputes the states block by block
and runs the adjoint recurrence backwards in time with the same chunked scan. (The earlier
version let autograd save every per-step (b, d, T, n) tensor: a Swin-UMamba training step
at 128x128, batch 8 held 14 GB and took 20x U-Net's time; now about 2.5x its memory and 2x
its CPU time, benchmarks/bench_swin_umamba.py.)
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


#: elements of one (batch, length, state, channel) block on the CPU: bounds memory, keeps the work
#: cache-sized
BLOCK_ELEMENTS = 1 << 21
#: the same on a GPU: few, large blocks (each Python step is one kernel launch; a block of 64M fp32
#: elements keeps the launches per call in the hundreds and the scratch memory near 1 GB)
GPU_BLOCK_ELEMENTS = 1 << 26


def _block_limit(device: torch.device) -> int:
    return BLOCK_ELEMENTS if device.type == "cpu" else GPU_BLOCK_ELEMENTS


def _blocks(b: int, g: int, e: int, lp: int, n: int, limit: int):
    """(batch, group, channel-within-group) slices whose state tensors hold about ``limit`` elements.

    Channels are the innermost (contiguous) axis of every block tensor, so a block takes as many
    channels of one group of one batch item as fit, several groups only when a whole group fits,
    and several batch items only when all groups fit.
    """
    per_channel = lp * n
    ce = max(1, min(e, limit // per_channel))
    cg = max(1, min(g, limit // (per_channel * e))) if ce == e else 1
    cb = max(1, min(b, limit // (per_channel * e * g))) if cg == g else 1
    for b0 in range(0, b, cb):
        for g0 in range(0, g, cg):
            for e0 in range(0, e, ce):
                yield slice(b0, min(b, b0 + cb)), slice(g0, min(g, g0 + cg)), slice(e0, min(e, e0 + ce))


def _grouped(w: torch.Tensor) -> torch.Tensor:
    """B or C of a block, (bb, gg, L, n), as (bb, L, n, gg, 1): broadcasts over the group's channels."""
    return w.permute(0, 2, 3, 1).unsqueeze(-1)


def _outer(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(bb, L, gg * ee) times a grouped (bb, L, n, gg, 1) -> a fresh contiguous (bb, L, n, gg * ee)."""
    bb, length, E = v.shape
    n, gg = w.shape[2], w.shape[3]
    out = v.new_empty(bb, length, n, E)
    torch.mul(v.view(bb, length, 1, gg, E // gg), w, out=out.view(bb, length, n, gg, E // gg))
    return out


def _contract_state(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum over the state of (bb, L, n, gg * ee) times a grouped (bb, L, n, gg, 1): (bb, L, gg * ee)."""
    bb, length, n, E = h.shape
    gg = w.shape[3]
    if gg == 1:  # one group: a batched matrix product, no (bb, L, n, E) temporary
        return torch.matmul(w.squeeze(-1).transpose(-1, -2), h).squeeze(-2)
    return (h.view(bb, length, n, gg, E // gg) * w).sum(2).reshape(bb, length, E)


def _contract_channels(h: torch.Tensor, v: torch.Tensor, gg: int) -> torch.Tensor:
    """sum over each group's channels of (bb, L, n, gg * ee) times (bb, L, gg * ee): (bb, gg, L, n)."""
    bb, length, n, E = h.shape
    prod = h.view(bb, length, n, gg, E // gg) * v.view(bb, length, 1, gg, E // gg)
    return prod.sum(-1).permute(0, 3, 1, 2)


def _scan_pass(a: torch.Tensor, x: torch.Tensor, h: torch.Tensor | None, out: torch.Tensor | None = None,
               reverse: bool = False) -> torch.Tensor:
    """``h = a * h + x`` along dim 2 of (bb, nc, T, n, E), every chunk at once, from ``h`` (None: 0).

    Returns the state after the chunk's last step; with ``out`` every state is written there.
    """
    steps = range(a.shape[2] - 1, -1, -1) if reverse else range(a.shape[2])
    for t in steps:
        if h is None:
            h = x[:, :, t] if out is None else out[:, :, t].copy_(x[:, :, t])
        elif out is None:
            h = torch.addcmul(x[:, :, t], a[:, :, t], h)
        else:
            h = torch.addcmul(x[:, :, t], a[:, :, t], h, out=out[:, :, t])
    return h


def _carry(local: torch.Tensor, prod: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """States entering each chunk from the chunk-local end states and the chunks' total decays."""
    nc = local.shape[1]
    h_in = torch.zeros_like(local)
    order = range(nc - 2, -1, -1) if reverse else range(1, nc)
    for c in order:
        p = c + 1 if reverse else c - 1
        torch.addcmul(local[:, p], prod[:, p], h_in[:, p], out=h_in[:, c])
    return h_in


def _decays(dtb: torch.Tensor, At: torch.Tensor, T: int, shifted: bool = False):
    """exp(dt A) per step as (bb, nc, T, n, E) and per whole chunk (bb, nc, n, E), never above 1.

    ``shifted``: also exp(dt_{t+1} A) (the adjoint's decay; 0 past the end) as a view one step
    ahead into the same buffer, and the chunk decays of that one instead.
    """
    bb, lp, E = dtb.shape
    nc = lp // T
    if shifted:
        dtb = F.pad(dtb, (0, 0, 0, 1))
    full = torch.mul(dtb.unsqueeze(2), At).exp_()  # (bb, L, n, E), fresh and contiguous
    a = full[:, :lp].view(bb, nc, T, -1, E)
    sums = (dtb[:, 1:] if shifted else dtb).reshape(bb, nc, T, E).sum(2)
    prod = torch.exp(sums.unsqueeze(2) * At)
    if shifted:
        return a, full[:, 1:].view(bb, nc, T, -1, E), prod
    return a, prod


# The core runs as two opaque custom ops: torch.compile sees one node each (no graph breaks, no
# unrolled loops), autograd saves only what the backward op takes.
@torch.library.custom_op("medplan::chunked_scan", mutates_args=())
def _chunked_scan(u: torch.Tensor, dt: torch.Tensor, At: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                  T: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The scan's core ``h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t``, ``y_t = C_t h_t``, block by block.

    Inputs (already padded to nc * T steps, dt = 0 on the padding): u, dt (b, L, d); At (n, d) (A
    transposed); B, C (b, g, L, n). Returns y (b, L, d), the last state (b, n, d) (not
    differentiated, as in mamba-ssm) and the state entering every chunk (b, nc, n, d), all the
    backward needs besides the inputs: it recomputes the (batch, length, state, channel) states
    block by block instead of autograd keeping them for every step.
    """
    b, lp, d = u.shape
    g, n = B.shape[1], At.shape[0]
    e, nc = d // g, lp // T
    y = u.new_empty(b, lp, d)
    h_in_all = u.new_empty(b, nc, n, d)
    last = u.new_empty(b, n, d)
    with _no_autocast(u.device.type):
        dtu = dt * u
        for bs, gs, es in _blocks(b, g, e, lp, n, _block_limit(u.device)):
            ch = slice(gs.start * e + es.start, (gs.stop - 1) * e + es.stop)
            Bg, Cg = _grouped(B[bs, gs]), _grouped(C[bs, gs])
            a, prod = _decays(dt[bs, :, ch], At[:, ch], T)
            x = _outer(dtu[bs, :, ch], Bg)
            x5 = x.view(a.shape)
            local = _scan_pass(a, x5, None)
            h_in = _carry(local, prod)
            h_in_all[bs, :, :, ch] = h_in
            torch.addcmul(local[:, -1], prod[:, -1], h_in[:, -1], out=last[bs, :, ch])
            _scan_pass(a, x5, h_in, out=x5)  # x is not needed again: the states overwrite it
            y[bs, :, ch] = _contract_state(x, Cg)
    return y, last, h_in_all


@_chunked_scan.register_fake
def _chunked_scan_fake(u, dt, At, B, C, T):
    b, lp, d = u.shape
    return u.new_empty(b, lp, d), u.new_empty(b, At.shape[0], d), u.new_empty(b, lp // T, At.shape[0], d)


@torch.library.custom_op("medplan::chunked_scan_backward", mutates_args=())
def _chunked_scan_backward(gy: torch.Tensor, u: torch.Tensor, dt: torch.Tensor, At: torch.Tensor, B: torch.Tensor,
                           C: torch.Tensor, h_in_all: torch.Tensor,
                           T: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`_chunked_scan`'s y for u, dt, At, B, C: states recomputed forwards, adjoint
    states ``G_t = C_t gy_t + exp(dt_{t+1} A) G_{t+1}`` run backwards with the same chunked scan."""
    b, lp, d = u.shape
    g, n = B.shape[1], At.shape[0]
    e = d // g
    with _no_autocast(u.device.type):
        gy = gy.to(u.dtype).contiguous()
        gu, gdt, gAt = torch.empty_like(u), torch.empty_like(dt), torch.zeros_like(At)
        gB, gC = torch.zeros_like(B), torch.zeros_like(C)
        dtu = dt * u
        for bs, gs, es in _blocks(b, g, e, lp, n, _block_limit(u.device)):
            ch = slice(gs.start * e + es.start, (gs.stop - 1) * e + es.stop)
            dtb, Atb, Bg, Cg = dt[bs, :, ch], At[:, ch], _grouped(B[bs, gs]), _grouped(C[bs, gs])
            a, a_next, prod = _decays(dtb, Atb, T, shifted=True)
            dtub = dtu[bs, :, ch]
            x = _outer(dtub, Bg)
            H = torch.empty_like(x)
            _scan_pass(a, x.view(a.shape), h_in_all[bs, :, :, ch], out=H.view(a.shape))
            gyb = gy[bs, :, ch]
            G = _outer(gyb, Cg)
            G5 = G.view(a.shape)
            local = _scan_pass(a_next, G5, None, reverse=True)
            _scan_pass(a_next, G5, _carry(local, prod, reverse=True), out=G5, reverse=True)
            # C and B are shared by the group's channels: contract the channels
            gg = gs.stop - gs.start
            gC[bs, gs] += _contract_channels(H, gyb, gg)
            gB[bs, gs] += _contract_channels(G, dtub, gg)
            gw = _contract_state(G, Bg)  # d y / d (dt u)
            # through the decay: d/d(dt A) of exp(dt A) h_{t-1} is G * (h_t - x_t)
            q = H.sub_(x).mul_(G)
            gdt[bs, :, ch] = gw * u[bs, :, ch] + (q * Atb).sum(2)
            gu[bs, :, ch] = gw * dtb
            gAt[:, ch] += (q * dtb.unsqueeze(2)).sum((0, 1))
    return gu, gdt, gAt, gB, gC


@_chunked_scan_backward.register_fake
def _chunked_scan_backward_fake(gy, u, dt, At, B, C, h_in_all, T):
    return torch.empty_like(u), torch.empty_like(dt), torch.empty_like(At), torch.empty_like(B), torch.empty_like(C)


def _setup_context(ctx, inputs, output):
    u, dt, At, B, C, T = inputs
    ctx.save_for_backward(u, dt, At, B, C, output[2])
    ctx.T = T
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, gy, _glast, _gh):
    u, dt, At, B, C, h_in_all = ctx.saved_tensors
    return (*_chunked_scan_backward(gy, u, dt, At, B, C, h_in_all, ctx.T), None)


_chunked_scan.register_autograd(_backward, setup_context=_setup_context)


def selective_scan_chunked(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                           C: torch.Tensor, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                           delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                           return_last_state: bool = False, chunk_size: int | None = None):
    """Exact selective scan in O(T + L/T) Python steps per block (see the module docstring); fp32 inside."""
    with _no_autocast(u.device.type):
        dtype_in, u, delta, A, B, C, g = _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        b, d, length = u.shape
        T = int(chunk_size) if chunk_size else _default_chunk(length)
        nc = -(-length // T)
        pad = nc * T - length
        # time-major layouts for the core; delta = 0 on the padding: decay 1 and no input, so the
        # last state passes through unchanged
        ut = F.pad(u, (0, pad)).transpose(1, 2).contiguous()
        dtt = F.pad(delta, (0, pad)).transpose(1, 2).contiguous()
        Bt = F.pad(B, (0, pad)).transpose(2, 3).contiguous()
        Ct = F.pad(C, (0, pad)).transpose(2, 3).contiguous()
        y, last, _ = _chunked_scan(ut, dtt, A.t().contiguous(), Bt, Ct, T)
        y = y[:, :length].transpose(1, 2)
        out = _finish(y, u, D, z, dtype_in)
    return (out, last.transpose(1, 2)) if return_last_state else out


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
