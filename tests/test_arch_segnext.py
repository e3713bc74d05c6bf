"""SegNeXt-L: MSCAN encoder + LightHamHead with NMF; official key names; the fp32 trainer (shapes,
size, weights errors, trainer step: tests/test_model_contract.py)."""
import itertools

import pytest
import torch

from medplan.architectures import build_model
from medplan.architectures.segnext import (
    MSCAN, NMF2D, nmf_factorize, nmf_init_coef, nmf_update_bases, nmf_update_coef,
)
from medplan.errors import MedplanError
from medplan.plan import make_plan
from model_fixtures import full_size

TINY = {"embed_dims": [8, 16, 32, 32], "depths": [1, 1, 2, 1], "channels": 32}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------ model
def test_the_gradient_reaches_through_the_nmf():
    torch.manual_seed(0)
    model = build_model("segnext_l", 1, 1, pretrained=False, **TINY)
    model(torch.randn(2, 1, 32, 32)).square().mean().backward()
    assert model.decode_head.hamburger.ham_in.conv.weight.grad.abs().sum() > 0


def test_full_size_configuration():
    model = full_size("segnext_l")
    # the reference's stochastic depth: linear from 0 to 0.3 over the 38 blocks
    assert model.backbone.block1[0].drop_path.__class__.__name__ == "Identity"
    assert model.backbone.block4[-1].drop_path.drop_prob == pytest.approx(0.3)
    assert [len(getattr(model.backbone, f"block{i}")) for i in range(1, 5)] == [3, 5, 27, 3]


def test_encoder_keys_are_the_official_mscan_l_names():
    with torch.device("meta"):
        state = MSCAN(3).state_dict()
    # counted from the reference's structure: 38 keys per block (2 BN x 5, 13 conv weight+bias
    # pairs, 2 layer scales), stem 14, three patch embeds 7 each, four LayerNorms 2 each
    assert len(state) == 38 * (3 + 5 + 27 + 3) + 14 + 3 * 7 + 4 * 2
    expected = {
        "patch_embed1.proj.0.weight": (32, 3, 3, 3), "patch_embed1.proj.1.running_var": (32,),
        "patch_embed1.proj.3.weight": (64, 32, 3, 3), "patch_embed3.proj.weight": (320, 128, 3, 3),
        "patch_embed4.norm.weight": (512,), "block1.0.norm1.weight": (64,),
        "block1.0.attn.proj_1.weight": (64, 64, 1, 1),
        "block1.0.attn.spatial_gating_unit.conv0.weight": (64, 1, 5, 5),
        "block2.4.attn.spatial_gating_unit.conv0_1.weight": (128, 1, 1, 7),
        "block3.26.attn.spatial_gating_unit.conv1_2.weight": (320, 1, 11, 1),
        "block3.0.attn.spatial_gating_unit.conv2_1.weight": (320, 1, 1, 21),
        "block4.2.attn.spatial_gating_unit.conv3.weight": (512, 512, 1, 1),
        "block1.2.mlp.fc1.weight": (512, 64, 1, 1), "block3.0.mlp.fc1.weight": (1280, 320, 1, 1),
        "block1.0.mlp.dwconv.dwconv.weight": (512, 1, 3, 3), "block4.0.mlp.fc2.weight": (512, 2048, 1, 1),
        "block3.5.layer_scale_1": (320,), "block4.2.layer_scale_2": (512,),
        "norm1.weight": (64,), "norm4.bias": (512,),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key


def _official_checkpoint(path, dims, depths):
    """An ImageNet-style checkpoint: MSCAN keys wrapped in ``state_dict`` plus a classifier head."""
    torch.manual_seed(1)
    src = MSCAN(3, dims, (8, 8, 4, 4), depths)
    for p in src.parameters():
        p.data.uniform_(-1, 1)
    state = dict(src.state_dict())
    state["head.weight"] = torch.randn(1000, dims[-1])
    state["head.bias"] = torch.randn(1000)
    torch.save({"state_dict": state}, path)
    return src


def test_loads_an_official_style_checkpoint_with_gray_stem(tmp_path, monkeypatch):
    src = _official_checkpoint(tmp_path / "mscan_l.pth", TINY["embed_dims"], TINY["depths"])
    monkeypatch.setenv("MEDPLAN_WEIGHTS", str(tmp_path))
    model = build_model("segnext_l", 1, 2, pretrained=True, **TINY)
    report = model.pretrained_report
    assert report["missing"] == [] and report["mismatched"] == []
    assert report["n_loaded"] == len(src.state_dict()) and set(report["unexpected"]) == {"head.weight", "head.bias"}
    got, want = model.backbone.state_dict(), src.state_dict()
    assert torch.allclose(got["patch_embed1.proj.0.weight"], want["patch_embed1.proj.0.weight"].sum(1, keepdim=True))
    assert all(torch.equal(got[k], want[k]) for k in want if k != "patch_embed1.proj.0.weight")


def test_bad_options_are_errors():
    with pytest.raises(MedplanError, match="embed_dims"):
        build_model("segnext_l", 3, 2, embed_dims=[8, 16, 32])


# ------------------------------------------------------------------ NMF
def _slow_nmf(x, bases, steps, eps=1e-6):
    """Element-by-element multiplicative updates (Lee & Seung) for one matrix x (D, N) ~ W (D, R) H^T (N, R)."""
    D, N = len(x), len(x[0])
    R = len(bases[0])
    W = [row[:] for row in bases]
    dot = lambda a, b: sum(p * q for p, q in zip(a, b))  # noqa: E731
    col = lambda m, j: [m[i][j] for i in range(len(m))]  # noqa: E731
    H = []
    for n in range(N):  # softmax over r of sum_d x[d][n] W[d][r]
        logits = [dot(col(x, n), col(W, r)) for r in range(R)]
        exps = [2.718281828459045 ** (v - max(logits)) for v in logits]
        H.append([e / sum(exps) for e in exps])

    def update_h(W, H):
        WtW = [[dot(col(W, a), col(W, b)) for b in range(R)] for a in range(R)]
        return [[H[n][r] * dot(col(x, n), col(W, r)) / (dot(H[n], col(WtW, r)) + eps) for r in range(R)]
                for n in range(N)]

    def update_w(W, H):
        HtH = [[dot(col(H, a), col(H, b)) for b in range(R)] for a in range(R)]
        return [[W[d][r] * dot(x[d], col(H, r)) / (dot(W[d], col(HtH, r)) + eps) for r in range(R)]
                for d in range(D)]

    for _ in range(steps):
        H = update_h(W, H)
        W = update_w(W, H)
    return W, update_h(W, H)


def test_nmf_matches_a_slow_elementwise_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 4, 6, generator=g, dtype=torch.float64)
    bases = torch.nn.functional.normalize(torch.rand(2, 4, 3, generator=g, dtype=torch.float64), dim=1)
    W, H = nmf_factorize(x, bases, steps=3)
    for b in range(2):
        w_ref, h_ref = _slow_nmf(x[b].tolist(), bases[b].tolist(), steps=3)
        assert torch.allclose(W[b], torch.tensor(w_ref, dtype=torch.float64), rtol=1e-9, atol=1e-12)
        assert torch.allclose(H[b], torch.tensor(h_ref, dtype=torch.float64), rtol=1e-9, atol=1e-12)


def test_multiplicative_updates_decrease_the_reconstruction_error():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(3, 16, 40, generator=g, dtype=torch.float64)
    bases = torch.nn.functional.normalize(torch.rand(3, 16, 4, generator=g, dtype=torch.float64), dim=1)
    coef = nmf_init_coef(x, bases)
    err = lambda w, h: (x - w @ h.transpose(1, 2)).square().sum(dim=(1, 2))  # noqa: E731
    errors = [err(bases, coef)]
    for _ in range(7):
        coef = nmf_update_coef(x, bases, coef)
        errors.append(err(bases, coef))
        bases = nmf_update_bases(x, bases, coef)
        errors.append(err(bases, coef))
    for a, b in itertools.pairwise(errors):
        assert (b <= a * (1 + 1e-9)).all()
    assert (errors[-1] < 0.5 * errors[0]).all()
    assert (bases >= 0).all() and (coef >= 0).all()


def test_nmf2d_module_steps_random_bases_and_fp32_under_autocast():
    ham = NMF2D(MD_S=1, MD_R=4)
    x = torch.rand(2, 8, 5, 6)
    for training, steps in ((True, 6), (False, 7)):
        ham.train(training)
        torch.manual_seed(5)
        out = ham(x)
        torch.manual_seed(5)
        bases = torch.nn.functional.normalize(torch.rand(2, 8, 4), dim=1)
        w, h = nmf_factorize(x.reshape(2, 8, 30), bases, steps)
        assert torch.allclose(out, (w @ h.transpose(1, 2)).reshape(2, 8, 5, 6), atol=1e-6)
        assert out.shape == x.shape and (out >= 0).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the decomposition stays in float32
        torch.manual_seed(5)
        out_amp = ham(x)
    assert out_amp.dtype == torch.float32 and torch.equal(out_amp, out)


# ------------------------------------------------------------------ trainer
def test_segnext_trainer_turns_mixed_precision_off(tmp_path):
    from medplan.trainers import TrainSettings, get_trainer
    from medplan.trainers.segnext import AMP_DEVIATION, SegNeXtTrainer

    assert get_trainer("segnext_l") is SegNeXtTrainer
    settings = TrainSettings(device="cpu", amp=True)
    plan = make_plan(epochs={"cv": 1, "lr_search": 1}, batch_size=2)
    trainer = SegNeXtTrainer("TOY", "segnext_l", 0, plan=plan, splits=[{"train": ["a", "b"], "val": ["c"]}],
                             output_dir=tmp_path, settings=settings, model_options={**TINY, "pretrained": False},
                             lr=1e-3, lr_source="test")
    assert trainer.settings.amp is False and AMP_DEVIATION in trainer.notes  # config.json: settings.amp false
    assert settings.amp is True  # the caller's settings are not changed
