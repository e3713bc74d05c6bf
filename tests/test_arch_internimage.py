"""InternImage-T + UPerHead: DCNv3 against a direct reference, official key names, weights, the card's
parameter groups (shapes, size, weights errors, trainer step: tests/test_model_contract.py)."""
import math

import numpy as np
import pytest
import torch

from medplan.architectures import build_model, model_deviations, model_parameter_groups
from medplan.architectures.dcnv3 import DCNv3, cuda_extension_available, dcnv3, dcnv3_pytorch
from medplan.architectures.internimage import InternImage
from medplan.architectures.uperhead import UPerHead
from model_fixtures import full_size

TINY = {"channels": 16, "depths": [1, 1, 2, 1], "groups": [1, 2, 4, 8], "decoder_channels": 32}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------ DCNv3 operator
def _slow_dcnv3(value, offset, mask, k, stride, pad, dil, group, scale, remove_center):
    """Loop over every output pixel, group and kernel point; bilinear sample with zeros outside.

    Conventions of the official CUDA kernel: taps x-major, offsets (x, y) per group and point,
    kernel centre at ``i*stride - pad + dil*(k-1)//2``, position ``centre + (tap + offset) * scale``.
    """
    value, offset, mask = (t.double().numpy() for t in (value, offset, mask))
    n_, h, w, c = value.shape
    cg = c // group
    half = dil * (k - 1) // 2
    taps = [(ix * dil - half, iy * dil - half) for ix in range(k) for iy in range(k)]
    if remove_center:
        del taps[len(taps) // 2]
    p_ = len(taps)
    ho = (h + 2 * pad - (dil * (k - 1) + 1)) // stride + 1
    wo = (w + 2 * pad - (dil * (k - 1) + 1)) // stride + 1
    out = np.zeros((n_, ho, wo, c))
    for n in range(n_):
        for i in range(ho):
            for j in range(wo):
                cy, cx = i * stride - pad + half, j * stride - pad + half
                for g in range(group):
                    for p, (tx, ty) in enumerate(taps):
                        ox, oy = offset[n, i, j, (g * p_ + p) * 2: (g * p_ + p) * 2 + 2]
                        x, y = cx + (tx + ox) * scale, cy + (ty + oy) * scale
                        x0, y0 = math.floor(x), math.floor(y)
                        sample = np.zeros(cg)
                        for yy, xx, wt in ((y0, x0, (y0 + 1 - y) * (x0 + 1 - x)), (y0, x0 + 1, (y0 + 1 - y) * (x - x0)),
                                           (y0 + 1, x0, (y - y0) * (x0 + 1 - x)), (y0 + 1, x0 + 1, (y - y0) * (x - x0))):
                            if 0 <= yy < h and 0 <= xx < w:
                                sample += wt * value[n, yy, xx, g * cg:(g + 1) * cg]
                        out[n, i, j, g * cg:(g + 1) * cg] += mask[n, i, j, g * p_ + p] * sample
    return torch.from_numpy(out)


def _random_inputs(n, h, w, group, cg, k, stride, pad, dil, remove_center, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    p_ = k * k - int(remove_center)
    ho = (h + 2 * pad - (dil * (k - 1) + 1)) // stride + 1
    wo = (w + 2 * pad - (dil * (k - 1) + 1)) // stride + 1
    value = torch.randn(n, h, w, group * cg, generator=gen, dtype=dtype)
    offset = 2.5 * torch.randn(n, ho, wo, group * p_ * 2, generator=gen, dtype=dtype)  # many samples fall outside
    mask = torch.rand(n, ho, wo, group * p_, generator=gen, dtype=dtype)
    return value, offset, mask


@pytest.mark.parametrize("k,stride,pad,dil,group,scale,remove_center", [
    (3, 1, 1, 1, 2, 1.0, False),   # the InternImage setting
    (3, 2, 1, 2, 3, 0.5, False),   # stride, dilation, offset scale
    (3, 1, 2, 1, 1, 2.0, True),    # extra padding, centre tap removed
    (5, 1, 2, 1, 2, 1.0, False),   # larger kernel
])
def test_dcnv3_pytorch_matches_direct_loops(k, stride, pad, dil, group, scale, remove_center):
    value, offset, mask = _random_inputs(2, 5, 7, group, 3, k, stride, pad, dil, remove_center)
    got = dcnv3_pytorch(value, offset, mask, kernel_size=k, stride=stride, pad=pad, dilation=dil, group=group,
                        offset_scale=scale, remove_center=remove_center)
    want = _slow_dcnv3(value, offset, mask, k, stride, pad, dil, group, scale, remove_center)
    assert got.shape == want.shape
    assert got.dtype == value.dtype
    assert torch.allclose(got, want, atol=1e-10), (got - want).abs().max()
    got32 = dcnv3_pytorch(value.float(), offset.float(), mask.float(), kernel_size=k, stride=stride, pad=pad,
                          dilation=dil, group=group, offset_scale=scale, remove_center=remove_center)
    assert got32.dtype == torch.float32 and torch.allclose(got32.double(), want, atol=1e-5)
    assert want.abs().sum() > 0 and (want == 0).sum() < want.numel()


def test_dcnv3_pytorch_gradients_match_finite_differences():
    # the gradient reaching value, offsets and mask; double precision throughout for gradcheck
    value, offset, mask = _random_inputs(1, 3, 4, 2, 2, 3, 1, 1, 1, False, seed=1)
    offset = offset.clamp(-1.2, 1.2) + 0.37  # stay off integer pixel positions (bilinear kinks)

    def op(v, o, m):  # float64 in, float64 arithmetic (the op computes in float32 only for lower precisions)
        return dcnv3_pytorch(v, o, m, group=2)

    inputs = tuple(t.clone().requires_grad_(True) for t in (value, offset, mask))
    assert torch.autograd.gradcheck(op, inputs, eps=1e-6, atol=1e-5)


def test_dcnv3_module_starts_as_an_averaging_conv_and_rejects_bad_groups():
    torch.manual_seed(0)
    m = DCNv3(8, group=2, core="pytorch")
    assert torch.count_nonzero(m.offset.weight) == 0 and torch.count_nonzero(m.mask.weight) == 0
    x = torch.randn(2, 5, 6, 8)
    y = m(x)
    assert y.shape == x.shape
    # zero offsets, uniform weights: a 3x3 box filter (zero padded) of input_proj(x), then output_proj
    v = m.input_proj(x).permute(0, 3, 1, 2)
    box = torch.nn.functional.avg_pool2d(v, 3, 1, 1, count_include_pad=True).permute(0, 2, 3, 1)
    assert torch.allclose(y, m.output_proj(box), atol=1e-5)
    with pytest.raises(ValueError, match="divisible"):
        DCNv3(10, group=4)
    with pytest.raises(ValueError, match="core"):
        dcnv3(x, torch.zeros(2, 5, 6, 36), torch.zeros(2, 5, 6, 18), group=2, core="fast")


@pytest.mark.skipif(not cuda_extension_available(), reason="needs CUDA and the compiled DCNv3 extension")
def test_cuda_kernel_matches_pytorch():
    value, offset, mask = (t.float().cuda() for t in _random_inputs(2, 9, 11, 4, 8, 3, 1, 1, 1, False))
    outs, grads = [], []
    for core in ("cuda", "pytorch"):
        inputs = [t.clone().requires_grad_(True) for t in (value, offset, mask)]
        out = dcnv3(*inputs, group=4, core=core)
        out.backward(torch.ones_like(out))
        outs.append(out.detach())
        grads.append([t.grad for t in inputs])
    assert torch.allclose(outs[0], outs[1], atol=1e-4, rtol=1e-3)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-3, rtol=1e-3)


# ------------------------------------------------------------------ model
def test_offsets_start_at_zero_but_learn():
    torch.manual_seed(0)
    model = build_model("internimage_t", 1, 1, pretrained=False, **TINY)
    model(torch.randn(2, 1, 32, 32)).square().mean().backward()
    # the gradient reaches the offsets through the bilinear sampling
    assert model.backbone.levels[0].blocks[0].dcn.offset.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for with_cp in (False, True):
        torch.manual_seed(0)
        model = build_model("internimage_t", 3, 2, pretrained=False, with_cp=with_cp, drop_path_rate=0.0, **TINY)
        model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))).sum().backward()
        grads.append(model.backbone.levels[1].blocks[0].dcn.input_proj.weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_full_size_config_matches_the_paper():
    model = full_size("internimage_t")
    bb = model.backbone
    assert [len(level.blocks) for level in bb.levels] == [4, 4, 18, 4]
    assert [level.blocks[0].dcn.group for level in bb.levels] == [4, 8, 16, 32]
    assert bb.out_channels == [64, 128, 256, 512]
    assert bb.levels[3].blocks[-1].drop_path.drop_prob == pytest.approx(0.2)  # linear 0 -> 0.2
    assert bb.levels[0].blocks[0].gamma1.shape == (64,)  # layer_scale=1.0 in the segmentation config
    assert bb.levels[3].downsample is None
    assert model.decode_head.channels == 512


def test_backbone_keys_are_the_official_names():
    with torch.device("meta"):
        state = InternImage(3, layer_scale=None).state_dict()
    # per layer 20 tensors (2 LN, dw conv + LN, offset, mask, in/out proj, 2 MLP linears), stem 8,
    # 4 stage norms, 3 downsamples (conv without bias + LN); the ImageNet checkpoint has these 625
    # plus its classifier (conv_head.*, head.*)
    assert len(state) == 20 * 30 + 8 + 4 * 2 + 3 * 3
    expected = {
        "patch_embed.conv1.weight": (32, 3, 3, 3), "patch_embed.norm1.1.weight": (32,),
        "patch_embed.conv2.bias": (64,), "patch_embed.norm2.1.bias": (64,),
        "levels.0.blocks.0.norm1.0.weight": (64,), "levels.0.blocks.0.dcn.dw_conv.0.weight": (64, 1, 3, 3),
        "levels.0.blocks.0.dcn.dw_conv.1.1.weight": (64,), "levels.0.blocks.0.dcn.offset.weight": (72, 64),
        "levels.0.blocks.0.dcn.mask.weight": (36, 64), "levels.0.blocks.0.dcn.input_proj.weight": (64, 64),
        "levels.0.blocks.0.dcn.output_proj.bias": (64,), "levels.0.blocks.0.norm2.0.bias": (64,),
        "levels.0.blocks.0.mlp.fc1.weight": (256, 64), "levels.0.blocks.0.mlp.fc2.weight": (64, 256),
        "levels.0.norm.0.weight": (64,), "levels.0.downsample.conv.weight": (128, 64, 3, 3),
        "levels.0.downsample.norm.1.weight": (128,), "levels.2.blocks.17.dcn.offset.weight": (288, 256),
        "levels.3.norm.0.bias": (512,),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(".gamma" in k for k in state) and "levels.0.downsample.conv.bias" not in state


def test_uperhead_has_mmseg_names_and_predicts_at_the_finest_stride():
    head = UPerHead([8, 16, 32, 64], 24, 3)
    keys = set(head.state_dict())
    for key in ("psp_modules.3.1.conv.weight", "psp_modules.0.1.bn.running_mean", "bottleneck.conv.weight",
                "lateral_convs.2.conv.weight", "fpn_convs.0.bn.weight", "fpn_bottleneck.conv.weight",
                "conv_seg.weight", "conv_seg.bias"):
        assert key in keys, key
    assert "lateral_convs.3.conv.weight" not in keys and "bottleneck.conv.bias" not in keys
    assert head.bottleneck.conv.in_channels == 64 + 4 * 24 and head.fpn_bottleneck.conv.in_channels == 4 * 24
    feats = [torch.randn(2, c, 16 // 2 ** i, 20 // 2 ** i) for i, c in enumerate([8, 16, 32, 64])]
    assert head(feats).shape == (2, 3, 16, 20)
    with pytest.raises(TypeError, match="num_classes"):
        UPerHead([8, 16])


# ------------------------------------------------------------------ weights
def _official_checkpoint(path):
    """An ImageNet-style file: the official backbone keys (no layer scale) + the classifier, under 'model'."""
    torch.manual_seed(3)
    src = InternImage(3, TINY["channels"], TINY["depths"], TINY["groups"], layer_scale=None)
    state = dict(src.state_dict())
    feats = TINY["channels"] * 8
    state["conv_head.0.weight"] = torch.randn(int(feats * 1.5), feats, 1, 1)
    for name in ("weight", "bias", "running_mean", "running_var"):
        state[f"conv_head.1.0.{name}"] = torch.randn(int(feats * 1.5))
    state["head.weight"] = torch.randn(1000, int(feats * 1.5))
    state["head.bias"] = torch.randn(1000)
    torch.save({"model": state}, path)
    return src


def test_loads_an_official_style_checkpoint_with_gray_stem(tmp_path, monkeypatch):
    src = _official_checkpoint(tmp_path / "internimage_t_1k_224.pth")
    monkeypatch.setenv("MEDPLAN_WEIGHTS", str(tmp_path))
    model = build_model("internimage_t", 1, 2, pretrained=True, **TINY)
    report = model.pretrained_report
    assert report["missing"] == [] and report["mismatched"] == []  # layer scales are not in the file
    want = src.state_dict()
    assert report["n_loaded"] == len(want)
    assert all(k.startswith(("conv_head.", "head.")) for k in report["unexpected"]) and report["n_unexpected"] == 7
    got = model.backbone.state_dict()
    assert torch.allclose(got["patch_embed.conv1.weight"], want["patch_embed.conv1.weight"].sum(1, keepdim=True))
    assert all(torch.equal(got[k], want[k]) for k in want if k != "patch_embed.conv1.weight")
    assert torch.equal(got["levels.2.blocks.1.gamma2"], torch.ones(64))


# ------------------------------------------------------------------ parameter groups (model card)
def test_card_exempts_norms_biases_and_layer_scales_from_weight_decay():
    from medplan.trainers import Trainer, get_trainer

    assert get_trainer("internimage_t") is Trainer  # the groups are a model card fact
    model = build_model("internimage_t", 3, 2, pretrained=False, **TINY)
    decay, no_decay = model_parameter_groups("internimage_t", model, 1e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    assert no_decay["weight_decay"] == 0.0 and "weight_decay" not in decay  # the plan's value for the rest
    assert decay["lr"] == no_decay["lr"] == 1e-4  # layer_decay_rate=1.0: no layer-wise LR decay
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert {"backbone.levels.0.blocks.0.gamma1", "backbone.levels.0.blocks.0.norm1.0.weight",
            "backbone.levels.0.blocks.0.dcn.offset.bias", "decode_head.bottleneck.bn.weight"} <= exempt
    assert all(p.ndim > 1 for p in decay["params"])
    assert any("CustomLayerDecayOptimizerConstructor" in d for d in model_deviations("internimage_t"))
