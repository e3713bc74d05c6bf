"""nnunet_2d: planned topology, deep supervision, nnU-Net's Dice + CE/BCE loss, and its trainer
(shapes at any size, state dict round trip, trainer step: tests/test_model_contract.py)."""
import json
import math

import pytest
import torch

from medplan.architectures import build_model, count_parameters, model_info
from medplan.architectures.nnunet import PlainConvUNet, plan_2d_topology
from medplan.errors import MedplanError
from medplan.inference import load_fold
from medplan.trainers import get_trainer, train
from medplan.trainers.nnunet import (DeepSupervisionLoss, DiceCELoss, NNUNet2DTrainer, deep_supervision_weights,
                                     downsample_seg)
from trainer_fixtures import FAST, limit_threads, make_dataset, use_roots

TINY = {"features_base": 4, "max_features": 16}


@pytest.fixture(autouse=True)
def _one_thread():
    limit_threads()


def test_topology_for_512_has_8_stages_capped_at_512_features():
    topo = plan_2d_topology((512, 512))
    assert topo["n_stages"] == 8
    assert topo["features_per_stage"] == [32, 64, 128, 256, 512, 512, 512, 512]
    assert topo["strides"] == [(1, 1)] + [(2, 2)] * 7
    assert topo["bottleneck_size"] == [4, 4]
    with torch.device("meta"):
        model = build_model("nnunet_2d", 1, 2, input_size=[512, 512])
    assert [s[0].convs[0].conv.out_channels for s in model.encoder.stages] == topo["features_per_stage"]
    assert len(model.decoder.transpconvs) == len(model.decoder.seg_layers) == 7
    assert all(len(s[0].convs) == 2 for s in model.encoder.stages)
    n = count_parameters(model)["total"]
    assert 40e6 < n < 50e6  # 46.3M measured: plan-dependent, no Table 1 figure


def test_topology_for_64_and_anisotropic_inputs():
    topo = plan_2d_topology((64, 64))
    assert topo["n_stages"] == 5 and topo["features_per_stage"] == [32, 64, 128, 256, 512]
    wide = plan_2d_topology((16, 64))  # the short axis stops pooling at 4 px, the long one goes on
    assert wide["strides"] == [(1, 1), (2, 2), (2, 2), (1, 2), (1, 2)] and wide["bottleneck_size"] == [4, 4]
    with pytest.raises(MedplanError, match="input_size"):
        build_model("nnunet_2d", 1, 2, input_size=[64])
    with pytest.raises(MedplanError, match="too small"):
        build_model("nnunet_2d", 1, 2, input_size=[6, 6])
    with pytest.raises(MedplanError, match="pretrained"):
        build_model("nnunet_2d", 1, 2, pretrained=True)
    assert model_info("nnunet_2d")["pretrained"] is False


def test_deep_supervision_outputs_at_each_scale_and_backward():
    in_channels, num_classes = 3, 4
    model = build_model("nnunet_2d", in_channels, num_classes, input_size=[64, 64], deep_supervision=True, **TINY)
    assert isinstance(model, PlainConvUNet)
    x = torch.randn(2, in_channels, 64, 64)
    outs = model.train()(x)
    assert [tuple(o.shape) for o in outs] == [(2, num_classes, 64 // 2 ** i, 64 // 2 ** i) for i in range(4)]
    sum(o.float().pow(2).mean() for o in outs).backward()
    assert all(p.grad is not None for p in model.decoder.seg_layers.parameters())
    assert model.encoder.stages[0][0].convs[0].conv.weight.grad.abs().sum() > 0


def test_eval_returns_one_tensor_at_input_size_even_for_odd_sizes():
    model = build_model("nnunet_2d", 1, 3, input_size=[64, 64], deep_supervision=True, **TINY).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, 64, 64))
        odd = model(torch.randn(1, 1, 60, 50))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 3, 64, 64)
    assert odd.shape == (1, 3, 60, 50)
    # padded to the total stride by the card's input contract, then cropped per scale: ceil(60/2^i) x ceil(50/2^i)
    train_outs = model.train()(torch.randn(1, 1, 60, 50))
    assert [tuple(o.shape[-2:]) for o in train_outs] == [(math.ceil(60 / 2 ** i), math.ceil(50 / 2 ** i))
                                                         for i in range(4)]


def test_state_dict_uses_dynamic_network_architectures_names():
    keys = build_model("nnunet_2d", 1, 2, input_size=[32, 32], **TINY).state_dict().keys()
    for key in ("encoder.stages.0.0.convs.0.conv.weight", "encoder.stages.0.0.convs.1.norm.weight",
                "encoder.stages.0.0.convs.0.all_modules.0.weight", "decoder.transpconvs.0.weight",
                "decoder.stages.0.convs.0.conv.weight", "decoder.seg_layers.2.bias",
                "decoder.encoder.stages.3.0.convs.1.conv.weight"):
        assert key in keys, key
    # deep supervision changes the outputs, not the weights: checkpoints load either way
    other = build_model("nnunet_2d", 1, 2, input_size=[32, 32], deep_supervision=True, **TINY)
    other.load_state_dict(build_model("nnunet_2d", 1, 2, input_size=[32, 32], **TINY).state_dict())


def test_dice_ce_matches_a_hand_computation():
    s = 1e-5
    logits = torch.zeros(1, 3, 1, 2)  # softmax 1/3 everywhere
    seg = torch.tensor([[[0, 1]]])
    # CE = ln 3; Dice class 1: 2*(1/3) / (2/3 + 1); class 2: 0 / (2/3 + 0); background excluded
    dice = ((2 / 3 + s) / (5 / 3 + s) + s / (2 / 3 + s)) / 2
    assert DiceCELoss("ce", 3)(logits, seg).item() == pytest.approx(math.log(3) - dice, abs=1e-6)
    # binary: BCE = ln 2; sigmoid 1/2; Dice = 2*(1/2) / (1 + 1)
    bce = DiceCELoss("bce", 1)(torch.zeros(1, 1, 1, 2), seg)
    assert bce.item() == pytest.approx(math.log(2) - (1 + s) / (2 + s), abs=1e-6)
    # per-sample Dice (batch_dice False): a sample without foreground counts on its own
    two = DiceCELoss("ce", 2)(torch.tensor([[[[5.0]], [[-5.0]]], [[[-5.0]], [[5.0]]]]), torch.tensor([[[0]], [[1]]]))
    p = torch.softmax(torch.tensor([5.0, -5.0]), 0)[1].item()  # sample 0: predicted fg prob, gt fg 0
    ce = -math.log(1 - p)
    d0, d1 = s / (p + s), (2 * (1 - p) + s) / (1 - p + 1 + s)
    assert two.item() == pytest.approx(ce - (d0 + d1) / 2, abs=1e-5)


def test_deep_supervision_weights_and_nearest_targets():
    assert deep_supervision_weights(4) == pytest.approx([4 / 7, 2 / 7, 1 / 7, 0.0])
    assert deep_supervision_weights(1) == [1.0]
    seg = torch.arange(16).reshape(1, 4, 4) % 3
    assert torch.equal(downsample_seg(seg, (2, 2)), seg[:, ::2, ::2])
    torch.manual_seed(0)
    outs = [torch.randn(1, 3, 4, 4), torch.randn(1, 3, 2, 2), torch.randn(1, 3, 1, 1)]
    base = DiceCELoss("ce", 3)
    expected = 2 / 3 * base(outs[0], seg) + 1 / 3 * base(outs[1], seg[:, ::2, ::2])
    assert DeepSupervisionLoss(base)(outs, seg).item() == pytest.approx(expected.item(), abs=1e-6)
    assert DeepSupervisionLoss(base)(outs[0], seg).item() == pytest.approx(base(outs[0], seg).item())


def test_trainer_trains_with_deep_supervision_and_records_deviations(tmp_path, monkeypatch):
    assert get_trainer("nnunet_2d") is NNUNet2DTrainer
    use_roots(monkeypatch, tmp_path)
    make_dataset(tmp_path, num_classes=3, n_cases=6, n_folds=3, batch_size=2,
                 epochs={"lr_search": 1, "cv": 1}, lr=1e-3)  # planned size 32x32
    seen = []
    original = DeepSupervisionLoss.forward

    def spy(self, outputs, seg):
        seen.append(len(outputs) if isinstance(outputs, (list, tuple)) else 1)
        return original(self, outputs, seg)

    monkeypatch.setattr(DeepSupervisionLoss, "forward", spy)
    out = train("TOY", "nnunet_2d", 0, overrides=FAST, model_options=dict(TINY))
    assert 3 in seen and 1 in seen  # training: 3 decoder outputs (32 -> 4 px, 4 stages); validation: one
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_options"]["input_size"] == [32, 32] and cfg["model_options"]["deep_supervision"] is True
    text = " ".join(cfg["deviations"])
    assert "Dice + CE" in text and "deep supervision" in text and "not adopted" in text
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and math.isfinite(metrics[0]["train_loss"])
    assert (out / "validation" / "summary.json").is_file()
    fold = load_fold(out)  # rebuilds the same topology from the recorded options
    with torch.no_grad():
        logits = fold.model(torch.randn(1, 1, 32, 32))
    assert isinstance(logits, torch.Tensor) and logits.shape == (1, 3, 32, 32)
