"""The pure-PyTorch selective scan against the token-by-token recurrence, and against mamba-ssm's kernel on CUDA."""
import pytest
import torch

from medplan.architectures import selective_scan as ss
from medplan.architectures.selective_scan import (selective_scan_chunked, selective_scan_fn,
                                                  selective_scan_reference)


def _inputs(b=2, d=6, n=4, length=37, groups=2, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    B_shape = (b, groups, n, length) if groups else (b, n, length)
    return dict(u=r(b, d, length), delta=r(b, d, length, scale=0.5),
                A=-torch.exp(r(d, n, scale=0.5)).to(torch.float32 if dtype != torch.float64 else dtype),
                B=r(*B_shape), C=r(*B_shape), D=r(d), z=r(b, d, length), delta_bias=r(d, scale=0.5))


@pytest.mark.parametrize("chunk_size", [None, 1, 4, 8, 64])
@pytest.mark.parametrize("groups", [0, 1, 3])
def test_chunked_scan_equals_the_sequential_recurrence(chunk_size, groups):
    x = _inputs(groups=groups)  # length 37: never a multiple of the chunk size, so padding is exercised
    ref, ref_state = selective_scan_reference(**x, delta_softplus=True, return_last_state=True)
    out, state = selective_scan_chunked(**x, delta_softplus=True, return_last_state=True, chunk_size=chunk_size)
    assert out.shape == (2, 6, 37) and state.shape == (2, 6, 4)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, ref_state, rtol=1e-10, atol=1e-10)


def test_optional_terms_can_be_left_out():
    x = _inputs(groups=0)
    for drop in ({"D": None, "z": None, "delta_bias": None}, {"z": None}):
        y = {**x, **drop}
        torch.testing.assert_close(selective_scan_chunked(**y, chunk_size=8), selective_scan_reference(**y))


def test_gradients_equal_the_sequential_recurrence():
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    grads = []
    for fn in (selective_scan_reference, lambda **k: selective_scan_chunked(**k, chunk_size=4)):
        x = {k: v.clone().requires_grad_(True) for k, v in _inputs(length=19, groups=2).items()}
        out = fn(**x, delta_softplus=True)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append([x[k].grad for k in names])
    for name, g_ref, g in zip(names, *grads):
        assert g is not None and torch.isfinite(g).all(), name
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9, msg=f"gradient of {name}")


def test_long_decays_stay_finite_in_float32():
    # a strong decay over a long chunk: exp(-cumsum) would overflow, exp(cumsum) may not
    x = _inputs(d=4, n=3, length=300, groups=0, dtype=torch.float32)
    x["delta"] = x["delta"].abs() * 20
    out = selective_scan_chunked(**x, delta_softplus=True, chunk_size=300)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, selective_scan_reference(**x, delta_softplus=True), rtol=1e-4, atol=1e-4)


def test_input_dtype_is_kept_and_cpu_never_calls_a_kernel(monkeypatch):
    monkeypatch.setattr(ss, "_load_cuda_kernel", lambda: pytest.fail("kernel looked up for CPU tensors"))
    x = _inputs(groups=1, dtype=torch.bfloat16)
    x["A"] = x["A"].float()
    out = selective_scan_fn(**x, delta_softplus=True)
    assert out.dtype == torch.bfloat16
    ref = selective_scan_reference(**{k: v.double() for k, v in x.items()}, delta_softplus=True)
    torch.testing.assert_close(out.double(), ref, rtol=0.05, atol=0.1)


def _mamba_kernel():
    if not torch.cuda.is_available():
        return None
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as kernel
    except Exception:
        return None
    return kernel


@pytest.mark.skipif(_mamba_kernel() is None, reason="needs CUDA and mamba-ssm (pip install medplan[cuda])")
def test_cuda_kernel_matches_the_pytorch_scan(monkeypatch):
    x = _inputs(b=2, d=64, n=16, length=1000, groups=4, dtype=torch.float32, device="cuda")
    x = {k: v.contiguous() for k, v in x.items()}
    assert ss.cuda_kernel_available()
    results = []
    for backend in ("auto", "torch"):  # auto: the kernel; torch: the chunked scan on the GPU
        monkeypatch.setenv("MEDPLAN_SELECTIVE_SCAN", backend)
        y = {k: v.clone().requires_grad_(True) for k, v in x.items()}
        out = selective_scan_fn(**y, delta_softplus=True)
        out.square().mean().backward()
        results.append((out.detach(), {k: v.grad for k, v in y.items()}))
    (out_k, g_k), (out_t, g_t) = results
    torch.testing.assert_close(out_k, out_t, rtol=1e-3, atol=1e-3)
    for name in x:
        torch.testing.assert_close(g_k[name], g_t[name], rtol=2e-3, atol=2e-3, msg=f"gradient of {name}")


@pytest.mark.parametrize("block", [1, 40, 200, 1000])
def test_blocks_of_channels_and_batch_items_give_the_same_scan(monkeypatch, block):
    # a tiny block budget splits the work by channel (40: several per block; 1: one channel and one
    # batch item per block; 200: both groups of one batch item; 1000: several batch items), forward and
    # gradients
    monkeypatch.setattr(ss, "BLOCK_ELEMENTS", block)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    results = []
    for fn in (selective_scan_reference, lambda **k: selective_scan_chunked(**k, chunk_size=4)):
        x = {k: v.clone().requires_grad_(True) for k, v in _inputs(b=3, d=6, n=2, length=11, groups=2).items()}
        out, state = fn(**x, delta_softplus=True, return_last_state=True)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        results.append((out, state, [x[k].grad for k in names]))
    (ref, ref_state, ref_grads), (out, state, grads) = results
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, ref_state, rtol=1e-10, atol=1e-10)
    for name, g_ref, g in zip(names, ref_grads, grads):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9, msg=f"gradient of {name}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_blocks_give_the_cpu_scan():
    # on a GPU the chunked scan takes several groups and batch items per block (GPU_BLOCK_ELEMENTS);
    # forward and gradients must equal the CPU's small blocks, in float64
    results = []
    for device in ("cpu", "cuda"):
        x = {k: v.clone().requires_grad_(True) for k, v in _inputs(b=3, d=32, n=8, length=300, groups=4,
                                                                     device=device).items()}
        out, state = selective_scan_chunked(**x, delta_softplus=True, return_last_state=True)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=device).view_as(out)).sum().backward()
        results.append([t.detach().cpu() for t in (out, state, *(x[k].grad for k in sorted(x)))])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)


def test_autograd_keeps_no_per_step_states():
    # one (batch, dim, length, state) tensor of states is 16x u here, and the token loop or a scan
    # that lets autograd keep its steps saves several; what is saved must stay under 3/4 of one
    x = {k: v.requires_grad_(True) for k, v in _inputs(b=2, d=64, n=16, length=64, groups=1).items()}
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        selective_scan_chunked(**x, delta_softplus=True).sum().backward()
    assert sum(saved) < 12 * x["u"].numel(), (sum(saved), x["u"].numel())
    assert x["A"].grad is not None and torch.isfinite(x["A"].grad).all()


def test_compiles_without_graph_breaks():
    x = _inputs(groups=2)
    explained = torch._dynamo.explain(lambda **k: selective_scan_chunked(**k, delta_softplus=True))(**x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
