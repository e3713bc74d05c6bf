"""VWFormer on MiT-B3 and ConvNeXt-S: configuration, the reference's head names, varying-window
attention against slow direct loops, ConvNeXt checkpoints in three key layouts, the cards' parameter
groups (shapes, size, weights errors, trainer step: tests/test_model_contract.py)."""
import math

import pytest
import torch

from medplan.architectures import build_model, count_parameters, model_parameter_groups
from medplan.architectures.segformer import build_mit
from medplan.architectures.vwformer import (
    VWA, ConvNeXtBackbone, fold_neighbourhoods, from_windows, to_windows, varying_context_windows,
)
from model_fixtures import full_size

TINY_HEAD = {"channels": 64}
TINY = {
    "vwformer_mit_b3": {"embed_dims": [8, 16, 32, 32], "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], **TINY_HEAD},
    "vwformer_convnext_s": {"dims": [8, 16, 32, 32], "depths": [1, 1, 2, 1], **TINY_HEAD},
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------ model
@pytest.mark.parametrize("arch", sorted(TINY))
def test_the_context_path_learns_once_its_zero_initialised_norm_is_set(arch):
    torch.manual_seed(0)
    model = build_model(arch, 3, 2, pretrained=False, **TINY[arch])
    for attn in model.decode_head.attn:  # NonLocal2d's zero-initialised output norm (zeros_init=True) ...
        assert attn.conv_out.bn.weight.eq(0).all()
        torch.nn.init.constant_(attn.conv_out.bn.weight, 0.5)  # ... would hide the context path's gradient
    model(torch.randn(2, 3, 64, 64)).square().mean().backward()
    head = model.decode_head
    for p in (next(model.backbone.parameters()), head.attn[2].conv_out.bn.weight, head.ds[1].conv.weight,
              head.image_pool[1].conv.weight, head.linear_c1.proj.weight, head.conv_seg.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert model.input_contract.multiple == (64, 64)  # the 8 x 8 query windows on the stride-8 map


@pytest.mark.parametrize("arch,backbone", [("vwformer_mit_b3", 44.07), ("vwformer_convnext_s", 49.46)])
def test_full_size_configuration(arch, backbone):
    model = full_size(arch)
    assert count_parameters(model.backbone)["total"] / 1e6 == pytest.approx(backbone, abs=0.01)
    head = model.decode_head
    assert head.channels == 512 and head.short_cut and all(a.head == 1 for a in head.attn)  # the paper's choice


def test_head_keys_are_the_reference_names():
    with torch.device("meta"):
        state = build_model("vwformer_mit_b3", 3, 4, pretrained=False).decode_head.state_dict()
    expected = {  # VWHead of vw_head.py with channels 512 on MiT-B3 (64, 128, 320, 512)
        "linear_c4.proj.weight": (512, 512), "linear_c3.proj.weight": (512, 320), "linear_c2.proj.bias": (512,),
        "linear_c1.proj.weight": (48, 64), "linear_fuse.conv.weight": (512, 1536, 1, 1),
        "linear_fuse.bn.running_var": (512,), "attn.0.g.conv.weight": (512, 512, 1, 1), "attn.0.g.conv.bias": (512,),
        "attn.1.theta.conv.bias": (512,), "attn.2.phi.conv.weight": (512, 512, 1, 1),
        "attn.2.conv_out.conv.weight": (512, 512, 1, 1), "attn.2.conv_out.bn.weight": (512,),
        "ds.0.conv.weight": (128, 512, 2, 2), "ds.1.conv.weight": (32, 512, 4, 4), "ds.2.conv.weight": (8, 512, 8, 8),
        "ds.2.bn.bias": (8,), "short_path.conv.weight": (512, 512, 1, 1), "image_pool.1.conv.weight": (512, 512, 1, 1),
        "image_pool.1.bn.weight": (512,), "cat.conv.weight": (512, 2560, 1, 1),
        "low_level_fuse.conv.weight": (512, 560, 1, 1), "conv_seg.weight": (4, 512, 1, 1), "conv_seg.bias": (4,),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    # conv + BN modules have no conv bias (mmcv's bias='auto'); NonLocal's g/theta/phi have one
    assert "attn.0.conv_out.conv.bias" not in state and "cat.conv.bias" not in state
    assert len(state) == 6 + 6 + 3 * (6 + 6) + 3 * 6 + 6 + 6 + 6 + 2 + 6 + 2


# ------------------------------------------------------------------ varying-window attention
def test_vwa_matches_slow_attention_loops():
    torch.manual_seed(0)
    for heads in (1, 2):
        attn = VWA(4, head=heads).double().eval()
        for p in attn.parameters():
            p.data.uniform_(-1, 1)
        q, k, v = (torch.randn(3, 4, 2, 3, dtype=torch.float64) for _ in range(3))
        got = attn(q, k, v)
        conv = lambda m, x: torch.einsum("oc,nchw->nohw", m.conv.weight[:, :, 0, 0], x) + (  # noqa: E731
            m.conv.bias.view(1, -1, 1, 1) if m.conv.bias is not None else 0)
        theta, phi, g = conv(attn.theta, q), conv(attn.phi, k), conv(attn.g, v)
        theta, phi, g = theta.detach(), phi.detach(), g.detach()
        y = torch.zeros_like(theta)
        d = 4 // heads
        for n in range(3):
            for h in range(heads):
                ch = slice(h * d, (h + 1) * d)
                tq, tk, tv = (t[n, ch].reshape(d, -1) for t in (theta, phi, g))
                for i in range(6):
                    logits = [float(tq[:, i] @ tk[:, j]) / math.sqrt(d) for j in range(6)]
                    w = [math.exp(x - max(logits)) for x in logits]
                    y[n, ch].view(d, -1)[:, i] = sum(wj / sum(w) * tv[:, j] for j, wj in enumerate(w))
        with torch.no_grad():
            want = attn.conv_out.bn(conv(attn.conv_out, y))
        assert torch.allclose(got, want, atol=1e-10)


def _padded_index(q, size, r, p):
    """Source row of padded row ``q``: copies of [lo, hi) on the left, of [size-hi, size-lo) on the right."""
    lo, hi = (r + 1) * p // 2, r * p
    pad = hi - lo
    if q < pad:
        return lo + q
    if q < pad + size:
        return q - pad
    return size - hi + (q - pad - size)


@pytest.mark.parametrize("r,size", [(2, 16), (4, 16), (8, 16), (2, 24), (4, 8)])
def test_varying_context_windows_match_direct_indexing(r, size):
    torch.manual_seed(0)
    n_win = 8
    x = torch.randn(2, 3, size, size)
    p = size // n_win
    got = fold_neighbourhoods(varying_context_windows(x, r, r, n_win, n_win), r, r)
    assert got.shape == (2 * n_win * n_win, r * r * 3, p, p)
    got_np, x_np = got.numpy(), x.numpy()
    for b in range(2):
        for i in range(n_win):
            for j in range(n_win):
                win = got_np[(b * n_win + i) * n_win + j]
                for a in range(r):
                    for bb in range(r):
                        for c in range(3):
                            for y in range(p):
                                for xx in range(p):
                                    src_y = _padded_index(i * p + y * r + a, size, r, p)
                                    src_x = _padded_index(j * p + xx * r + bb, size, r, p)
                                    assert win[(a * r + bb) * 3 + c, y, xx] == x_np[b, c, src_y, src_x]
    # interior windows see exactly the surrounding region of the map (r x their size, centred)
    if p % 2 == 0 and r < n_win:
        pad = r * p - (r + 1) * p // 2
        windows = varying_context_windows(x, r, r, n_win, n_win).reshape(2, n_win, n_win, 3, r * p, r * p)
        i = n_win // 2
        top = i * p - pad
        assert torch.equal(windows[:, i, i], x[:, :, top:top + r * p, top:top + r * p])


def test_query_windows_round_trip():
    x = torch.arange(2 * 3 * 16 * 24, dtype=torch.float32).reshape(2, 3, 16, 24)
    w = to_windows(x, 8, 8)
    assert w.shape == (128, 3, 2, 3) and torch.equal(w[8 * 1 + 2], x[0, :, 2:4, 6:9])
    assert torch.equal(from_windows(w, 2, 8, 8), x)


# ------------------------------------------------------------------ weights
def _tiny_convnext():
    torch.manual_seed(1)
    src = ConvNeXtBackbone(3, dims=(8, 16, 32, 32), depths=(1, 1, 2, 1))
    for p in src.parameters():
        p.data.uniform_(-1, 1)
    return src


def _layout(state, layout):
    """timm-named backbone tensors -> a classification checkpoint in ``layout`` (timm, fb, mmcls)."""
    out = {}
    for k, v in state.items():
        if k.startswith(("norm0", "norm1", "norm2")):
            continue  # segmentation-only modules
        if layout == "timm":
            out[k.replace("norm3.", "head.norm.")] = v
            continue
        k = k.replace("stem.", "downsample_layers.0.").replace("norm3.", "norm." if layout == "fb" else "norm3.")
        k = k.replace(".downsample.", ".X.")
        parts = k.split(".")
        if parts[0] == "stages" and parts[2] == "X":
            k = ".".join(["downsample_layers", parts[1]] + parts[3:])
        elif parts[0] == "stages":  # stages.i.blocks.j.rest -> stages.i.j.rest
            names = {"fb": ("dwconv", "pwconv1", "pwconv2"), "mmcls": ("depthwise_conv", "pointwise_conv1",
                                                                       "pointwise_conv2")}[layout]
            rest = ".".join(parts[4:]).replace("conv_dw", names[0]).replace("mlp.fc1", names[1])
            k = ".".join(parts[:2] + [parts[3], rest.replace("mlp.fc2", names[2])])
        out[("backbone." if layout == "mmcls" else "") + k] = v
    head = {"timm": "head.fc.", "fb": "head.", "mmcls": "head.fc."}[layout]
    out[head + "weight"], out[head + "bias"] = torch.randn(1000, 32), torch.randn(1000)
    return out


@pytest.mark.parametrize("layout", ["timm", "fb", "mmcls"])
def test_convnext_checkpoints_in_three_layouts(tmp_path, monkeypatch, layout):
    src = _tiny_convnext()
    state = _layout(src.state_dict(), layout)
    if layout == "fb":
        assert "stages.2.1.pwconv1.weight" in state and "downsample_layers.2.1.weight" in state
    torch.save({"state_dict": state} if layout == "mmcls" else state, tmp_path / "convnext_small_1k_224_ema.pth")
    monkeypatch.setenv("MEDPLAN_WEIGHTS", str(tmp_path))
    model = build_model("vwformer_convnext_s", 1, 2, pretrained=True, **TINY["vwformer_convnext_s"])
    report = model.pretrained_report
    assert report["missing"] == [] and report["mismatched"] == []
    assert len(report["unexpected"]) == 2 and all(k.startswith("head.") for k in report["unexpected"])
    got, want = model.backbone.state_dict(), src.state_dict()
    assert report["n_loaded"] == len(want) - 6  # all but the new norm0..norm2
    assert torch.allclose(got["stem.0.weight"], want["stem.0.weight"].sum(1, keepdim=True))
    for k in want:
        if k != "stem.0.weight" and not k.startswith(("norm0", "norm1", "norm2")):
            assert torch.equal(got[k], want[k]), k  # norm3 from the classifier's final norm, as mmcls


def test_mit_backbone_loads_official_names(tmp_path, monkeypatch):
    torch.manual_seed(2)
    src = build_mit(3, embed_dims=[8, 16, 32, 32], depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2])
    torch.save({**src.state_dict(), "head.weight": torch.randn(10, 32)}, tmp_path / "mit_b3.pth")
    monkeypatch.setenv("MEDPLAN_WEIGHTS", str(tmp_path))
    model = build_model("vwformer_mit_b3", 3, 2, pretrained=True, **TINY["vwformer_mit_b3"])
    assert model.pretrained_report["missing"] == [] and model.pretrained_report["unexpected"] == ["head.weight"]
    assert all(torch.equal(model.backbone.state_dict()[k], v) for k, v in src.state_dict().items())


def test_missing_convnext_weights_name_file_and_sources(tmp_path, monkeypatch):
    from medplan.errors import MedplanError

    monkeypatch.setenv("MEDPLAN_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    expected = r"convnext_small_1k_224_ema\.pth.*dl\.fbaipublicfiles.*convnext_small\.fb_in1k"
    with pytest.raises(MedplanError, match=expected):
        build_model("vwformer_convnext_s", 3, 2, pretrained=True, **TINY["vwformer_convnext_s"])


# ------------------------------------------------------------------ parameter groups (model cards)
def test_cards_parameter_groups():
    from medplan.trainers import Trainer, get_trainer

    assert get_trainer("vwformer_convnext_s") is Trainer and get_trainer("vwformer_mit_b3") is Trainer
    model = build_model("vwformer_convnext_s", 3, 2, pretrained=False, **TINY["vwformer_convnext_s"])
    groups = model_parameter_groups("vwformer_convnext_s", model, 1.0)
    lr_of = {n: g["lr"] for g in groups for n, p in model.named_parameters() if any(p is q for q in g["params"])}
    wd_of = {n: g.get("weight_decay") for g in groups for n, p in model.named_parameters()
             if any(p is q for q in g["params"])}
    assert len(lr_of) == len(list(model.parameters()))
    assert groups[0]["lr"] == 1.0  # the base LR is logged
    assert lr_of["backbone.stem.0.weight"] == pytest.approx(0.9 ** 13)
    assert lr_of["backbone.stages.2.downsample.1.weight"] == pytest.approx(0.9 ** 13)
    assert lr_of["backbone.stages.0.blocks.0.conv_dw.weight"] == pytest.approx(0.9 ** 12)
    assert lr_of["backbone.stages.3.blocks.0.mlp.fc1.weight"] == pytest.approx(0.9 ** 9)
    assert lr_of["backbone.norm2.weight"] == 1.0 and lr_of["decode_head.conv_seg.weight"] == 1.0
    assert wd_of["backbone.stages.1.blocks.0.gamma"] == 0.0 and wd_of["decode_head.cat.conv.weight"] is None
    assert wd_of["decode_head.attn.0.g.conv.bias"] == 0.0
    mit = build_model("vwformer_mit_b3", 3, 2, pretrained=False, **TINY["vwformer_mit_b3"])
    head = next(g for g in model_parameter_groups("vwformer_mit_b3", mit, 1.0) if g["name"] == "head")
    assert head["lr"] == 10.0 and len(head["params"]) == len(list(mit.decode_head.parameters()))
