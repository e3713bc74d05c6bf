"""The plan's augmentation: exactly the plan's ops and ranges, images and labels moved together."""
from __future__ import annotations

import math

import pytest
import torch

from medplan.data import build_augmentation
from medplan.errors import MedplanError
from medplan.plan import make_plan


def make(**aug) -> "object":
    return build_augmentation(make_plan(augmentation=aug).augmentation)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def left_heavy(b: int = 2, c: int = 1, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """An asymmetric pattern: bright block in the top-left, labels 1 there and 2 in a stripe."""
    x = torch.full((b, c, size, size), 20.0)
    x[:, :, 2:12, 3:20] = 230.0
    seg = torch.zeros(b, size, size, dtype=torch.uint8)
    seg[:, 2:12, 3:20] = 1
    seg[:, 20:24, 5:9] = 2
    x[:, :, 20:24, 5:9] = 120.0
    return x, seg


def test_all_probabilities_zero_is_exact_identity():
    aug = make(rotation_deg=30.0, scale=[0.8, 1.2], brightness=0.3, contrast=0.3, saturation=0.2, hue=0.1,
               gamma=[0.7, 1.5], noise_std=0.1, blur_sigma=[0.5, 2.0])  # every p stays 0, no flips
    x = torch.rand(4, 3, 32, 32, generator=gen(1)) * 255
    seg = torch.randint(0, 4, (4, 32, 32), generator=gen(2), dtype=torch.uint8)
    out, out_seg = aug(x, seg, gen(3))
    assert torch.equal(out, x) and out.dtype == torch.float32
    assert torch.equal(out_seg, seg) and out_seg.dtype == torch.uint8
    x_u8 = (x).to(torch.uint8)
    assert torch.equal(aug(x_u8, seg, gen(3))[0], x_u8.float())


def test_hflip_moves_image_and_label_together():
    aug = make(hflip=True)
    x, seg = left_heavy(b=32)
    out, out_seg = aug(x, seg, gen(0))
    flipped = 0
    for i in range(32):
        if torch.equal(out[i], x[i]):
            assert torch.equal(out_seg[i], seg[i])
        else:
            assert torch.equal(out[i], x[i].flip(-1)) and torch.equal(out_seg[i], seg[i].flip(-1))
            flipped += 1
    assert 4 <= flipped <= 28  # p = 0.5, both outcomes occur
    assert torch.equal(x, left_heavy(b=32)[0])  # the input is untouched


def test_rotation_keeps_labels_on_the_bright_square_and_label_values_nearest():
    aug = make(rotation_deg=90.0, p_rotation=1.0)
    x, seg = left_heavy(b=2)
    params = aug.sample(2, 1, gen(0))
    params.angle[:] = torch.tensor([math.radians(90.0), math.radians(33.0)], dtype=params.angle.dtype)
    out, out_seg = aug.apply(x, seg, params)
    assert set(out_seg.unique().tolist()) <= {0, 1, 2}
    for i in range(2):
        inside = out[i, 0][out_seg[i] == 1]
        assert inside.numel() > 100 and inside.mean() > 200  # the label sits on the bright square
    # a quarter turn by interpolation lands where the exact turn does
    ref = torch.rot90(seg[0], k=1, dims=(-2, -1))
    alt = torch.rot90(seg[0], k=-1, dims=(-2, -1))
    match = max((out_seg[0] == ref).float().mean(), (out_seg[0] == alt).float().mean())
    assert match > 0.98 and not torch.equal(out_seg[0], seg[0])


def test_exact_flip_and_quarter_turn_path_matches_resampling():
    aug = make(hflip=True, vflip=True, rot90=True)
    x = torch.rand(8, 2, 16, 16, generator=gen(4)) * 255
    seg = torch.randint(0, 3, (8, 16, 16), generator=gen(5), dtype=torch.uint8)
    params = aug.sample(8, 2, gen(6))
    params.hflip[:] = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1], dtype=torch.bool)
    params.vflip[:] = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1], dtype=torch.bool)
    params.rot90[:] = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1], dtype=torch.bool)
    exact, exact_seg = aug.apply(x, seg, params)
    params.angle[:] = 1e-9  # forces the grid_sample path with (numerically) the same map
    resampled, resampled_seg = aug.apply(x, seg, params)
    assert torch.allclose(exact, resampled, atol=1e-2)
    assert torch.equal(exact_seg, resampled_seg)
    assert len({exact[i].sum().item() for i in range(8)}) > 1
    assert len({tuple(exact[i].flatten()[:5].tolist()) for i in range(8)}) == 8  # 8 distinct D4 elements


def test_vflip_disabled_never_turns_a_cone_upside_down():
    aug = make(rotation_deg=15.0, p_rotation=0.5, scale=[0.85, 1.15], p_scale=0.5, hflip=True,
               brightness=0.2, contrast=0.2, p_intensity=0.5)
    x = torch.zeros(64, 1, 32, 32)
    x[:, :, :12, 8:24] = 200.0  # top-heavy, like an echo sector with its apex on top
    seg = (x[:, 0] > 0).to(torch.uint8)
    out, out_seg = aug(x, seg, gen(7))
    top, bottom = out[:, 0, :16].mean(dim=(1, 2)), out[:, 0, 16:].mean(dim=(1, 2))
    assert bool((top > 3 * bottom).all())
    assert bool((out_seg[:, :16].sum(dim=(1, 2)) > 3 * out_seg[:, 16:].sum(dim=(1, 2))).all())


def test_colour_jitter_never_touches_gray_images():
    aug = make(saturation=0.5, hue=0.2, p_color=1.0)
    gray = torch.rand(8, 1, 16, 16, generator=gen(8)) * 255
    seg = torch.zeros(8, 16, 16, dtype=torch.uint8)
    assert torch.equal(aug(gray, seg, gen(9))[0], gray)
    params = aug.sample(8, 1, gen(9))
    assert bool((params.saturation == 1).all() and (params.hue == 0).all())
    rgb = torch.rand(8, 3, 16, 16, generator=gen(8)) * 255
    out = aug(rgb, seg, gen(9))[0]
    assert not torch.allclose(out, rgb, atol=1.0)
    # luma is kept by saturation and hue (up to the final clamp)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    inside = ((out > 0.5) & (out < 254.5)).all(dim=1)
    assert torch.allclose((out * luma).sum(1)[inside], (rgb * luma).sum(1)[inside], atol=1e-2)


def test_saturation_zero_factor_gives_luma_gray():
    aug = make(saturation=1.0, p_color=1.0)
    params = aug.sample(1, 3, gen(0))
    params.saturation[:] = 0.0
    rgb = torch.tensor([200.0, 100.0, 50.0]).view(1, 3, 1, 1).expand(1, 3, 4, 4).clone()
    out, _ = aug.apply(rgb, torch.zeros(1, 4, 4, dtype=torch.uint8), params)
    expected = 0.299 * 200 + 0.587 * 100 + 0.114 * 50
    assert torch.allclose(out, torch.full_like(out, expected), atol=1e-3)


def test_brightness_and_gamma_stay_in_the_plans_ranges():
    seg = torch.zeros(64, 8, 8, dtype=torch.uint8)
    const = torch.full((64, 1, 8, 8), 100.0)
    out = make(brightness=0.2, p_intensity=1.0)(const, seg, gen(10))[0]
    factors = out[:, 0, 0, 0] / 100.0
    assert bool((out == out[:, :, :1, :1]).all())  # a multiplicative factor per sample
    assert bool(((factors >= 0.8 - 1e-6) & (factors <= 1.2 + 1e-6)).all()) and factors.std() > 0.05
    # contrast works around the image's mean: a constant image is left as it is
    assert torch.allclose(make(contrast=0.5, p_intensity=1.0)(const, seg, gen(11))[0], const)
    half = torch.full((64, 1, 8, 8), 127.5)
    out = make(gamma=[0.8, 1.25], p_gamma=1.0)(half, seg, gen(12))[0]
    gammas = torch.log(out[:, 0, 0, 0] / 255.0) / math.log(0.5)
    assert bool(((gammas >= 0.8 - 1e-4) & (gammas <= 1.25 + 1e-4)).all()) and gammas.std() > 0.05


def test_probability_is_per_sample():
    aug = make(brightness=0.2, p_intensity=0.5)
    const = torch.full((200, 1, 4, 4), 100.0)
    out = aug(const, torch.zeros(200, 4, 4, dtype=torch.uint8), gen(13))[0]
    changed = (out[:, 0, 0, 0] != 100.0).float().mean()
    assert 0.35 < changed < 0.65


def test_noise_has_the_plans_std_and_blur_smooths():
    seg = torch.zeros(4, 64, 64, dtype=torch.uint8)
    const = torch.full((4, 1, 64, 64), 128.0)
    out = make(noise_std=0.05, p_noise=1.0)(const, seg, gen(14))[0]
    assert abs(float((out - 128).std()) - 0.05 * 255) < 0.1 * 0.05 * 255
    checker = ((torch.arange(64).view(-1, 1) + torch.arange(64)) % 2).float().expand(4, 1, 64, 64) * 255
    blurred, blurred_seg = make(blur_sigma=[1.0, 2.0], p_blur=1.0)(checker, seg, gen(15))
    assert blurred.std() < 0.2 * checker.std() and abs(float(blurred.mean() - checker.mean())) < 1.0
    assert torch.allclose(make(blur_sigma=[1.0, 2.0], p_blur=1.0)(const, seg, gen(15))[0], const, atol=1e-3)
    assert torch.equal(blurred_seg, seg)


def test_same_seed_same_result_other_seed_other_result():
    aug = make(rotation_deg=20.0, p_rotation=0.8, scale=[0.8, 1.2], p_scale=0.8, hflip=True,
               brightness=0.2, contrast=0.2, p_intensity=0.8, gamma=[0.8, 1.25], p_gamma=0.5,
               noise_std=0.03, p_noise=0.5, blur_sigma=[0.5, 1.0], p_blur=0.5)
    x, seg = left_heavy(b=4, c=3)
    a, sa = aug(x, seg, gen(42))
    b, sb = aug(x, seg, gen(42))
    c, _ = aug(x, seg, gen(43))
    assert torch.equal(a, b) and torch.equal(sa, sb)
    assert not torch.equal(a, c)
    assert float(a.min()) >= 0 and float(a.max()) <= 255


def test_bad_augmentation_settings_are_one_line_errors():
    with pytest.raises(MedplanError, match="unknown key in 'augmentation': 'rotation'; did you mean"):
        make(rotation=10)
    with pytest.raises(MedplanError, match="augmentation.scale"):
        make(scale=[1.2, 0.8])
    with pytest.raises(MedplanError, match="augmentation.p_blur"):
        make(p_blur=1.5)
    with pytest.raises(MedplanError, match="augmentation.hflip"):
        make(hflip="yes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_the_gpu_with_a_cpu_generator():  # pragma: no cover - no GPU in CI
    aug = make(rotation_deg=20.0, p_rotation=1.0, noise_std=0.03, p_noise=1.0, hflip=True)
    x, seg = left_heavy(b=4, c=3)
    a, sa = aug(x.cuda(), seg.cuda(), gen(1))
    b, sb = aug(x.cuda(), seg.cuda(), gen(1))
    assert a.is_cuda and torch.equal(a, b) and torch.equal(sa, sb)


def test_quarter_turn_of_a_non_square_image_keeps_its_shape_and_labels():
    aug = make(rot90=True)
    x = torch.rand(16, 1, 12, 20, generator=gen(16)) * 255
    seg = torch.randint(0, 3, (16, 12, 20), generator=gen(17), dtype=torch.uint8)
    out, out_seg = aug(x, seg, gen(18))
    assert out.shape == x.shape and out_seg.shape == seg.shape
    assert set(out_seg.unique().tolist()) <= {0, 1, 2}
    turned = [i for i in range(16) if not torch.equal(out[i], x[i])]
    assert 2 <= len(turned) <= 14
    for i in turned:  # turned about the centre: the middle 12x12 square is an exact quarter turn
        centre = out_seg[i, :, 4:16]
        assert torch.equal(centre, torch.rot90(seg[i, :, 4:16], 1, (-2, -1))) or \
            torch.equal(centre, torch.rot90(seg[i, :, 4:16], -1, (-2, -1)))


@pytest.mark.parametrize("p", [0.5, 1.0])  # some samples (work in views of out) / every sample (new tensors)
def test_out_buffer_gives_the_same_batch_and_is_what_comes_back(p):
    """A loader worker augments straight into its shared slot: same result as a fresh tensor."""
    aug = make(rotation_deg=30.0, p_rotation=p, hflip=True, rot90=True, brightness=0.2, p_intensity=p,
               saturation=0.2, hue=0.05, p_color=p, noise_std=0.03, p_noise=p, blur_sigma=[0.5, 1.0], p_blur=p)
    x = (torch.rand(6, 3, 32, 32, generator=gen(1)) * 255).to(torch.uint8)
    seg = torch.randint(0, 3, (6, 32, 32), generator=gen(2), dtype=torch.uint8)
    fresh, fresh_seg = aug(x, seg, gen(5))
    out = torch.full((6, 3, 32, 32), -1.0)
    got, got_seg = aug(x, seg, gen(5), out=out)
    assert got is out and torch.equal(got, fresh) and torch.equal(got_seg, fresh_seg)
    with pytest.raises(ValueError, match="out must be float32"):
        aug(x, seg, gen(5), out=torch.empty(6, 3, 32, 32, dtype=torch.float16))


def test_backend_medplan_is_the_default_and_the_batch_augmenter_refuses_nnunet():
    """augmentation.backend: "medplan" (default) is this augmenter, unchanged; a plan asking for
    nnU-Net's augmentation must not silently get medplan's (medplan.data.loader.make_augmenter picks)."""
    x, seg = left_heavy(b=8)
    default = make(hflip=True, rotation_deg=20.0, p_rotation=1.0)
    explicit = make(hflip=True, rotation_deg=20.0, p_rotation=1.0, backend="medplan")
    a, a_seg = default(x, seg, gen(4))
    b, b_seg = explicit(x, seg, gen(4))
    assert torch.equal(a, b) and torch.equal(a_seg, b_seg) and not torch.equal(a, x)
    with pytest.raises(MedplanError, match="augmentation.backend=nnunet .*make_augmenter"):
        make(backend="nnunet")
