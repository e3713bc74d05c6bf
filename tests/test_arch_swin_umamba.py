"""Swin-UMamba: deep supervision, the four-direction scan, official VMamba-T key names, the authors'
trainer (shapes, size, weights errors, trainer step: tests/test_model_contract.py)."""
import json

import pytest
import torch

from medplan.architectures import build_model, count_flops
from medplan.architectures import swin_umamba as sum_mod
from medplan.architectures.selective_scan import selective_scan_reference
from medplan.errors import MedplanError
from medplan.plan import make_plan
from model_fixtures import full_size
from trainer_fixtures import FAST, limit_threads, make_dataset, use_roots

limit_threads()

TINY = dict(dims=(16, 32, 64, 128), depths=(1, 1, 2, 1), d_state=4, stem_channels=8, pretrained=False)


def tiny(in_channels=3, num_classes=1, **kw):
    torch.manual_seed(0)
    return build_model("swin_umamba", in_channels, num_classes, **{**TINY, **kw})


def test_every_parameter_gets_a_gradient():
    model = tiny(1, 1)
    model(torch.randn(2, 1, 64, 64)).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"


def test_deep_supervision_returns_four_heads_full_resolution_first():
    model = tiny(3, 2, deep_supervision=True)
    outs = model(torch.randn(1, 3, 64, 64))
    assert [tuple(o.shape[-2:]) for o in outs] == [(64, 64), (32, 32), (16, 16), (8, 8)]
    outs = model(torch.randn(1, 3, 50, 70))  # padded to 64 x 96; each head cropped to its share
    assert [tuple(o.shape[-2:]) for o in outs] == [(50, 70), (25, 35), (13, 18), (7, 9)]


def test_full_size_encoder():
    model = full_size("swin_umamba")
    encoder = sum(p.numel() for p in model.vssm_encoder.parameters())
    assert 21e6 < encoder < 23e6  # VMamba-T without its classifier
    assert count_flops(model, 3, (64, 64), "meta") > 0  # the scan runs on the meta device too


def test_ss2d_scans_the_map_in_four_directions():
    """forward_core against an explicit per-direction reference: each direction is a token order
    (row-major, column-major, both reversed) scanned by its own parameters, mapped back and summed."""
    torch.manual_seed(0)
    ss2d = sum_mod.SS2D(d_model=8, d_state=3).double()
    x = torch.randn(2, ss2d.d_inner, 3, 5, dtype=torch.float64)
    b, d, h, w = x.shape
    grid = torch.arange(h * w).view(h, w)
    orders = [grid.flatten(), grid.t().flatten(), grid.flatten().flip(0), grid.t().flatten().flip(0)]
    A = -torch.exp(ss2d.A_logs).view(4, d, -1)
    total = torch.zeros(b, d, h * w, dtype=torch.float64)
    for k, order in enumerate(orders):
        seq = x.flatten(2)[:, :, order]                                    # (b, d, l) in scan order
        proj = torch.einsum("bdl,cd->bcl", seq, ss2d.x_proj_weight[k])
        dts, Bs, Cs = torch.split(proj, [ss2d.dt_rank, ss2d.d_state, ss2d.d_state], dim=1)
        dts = torch.einsum("brl,dr->bdl", dts, ss2d.dt_projs_weight[k])
        y = selective_scan_reference(seq, dts, A[k], Bs, Cs, ss2d.Ds.view(4, d)[k],
                                     delta_bias=ss2d.dt_projs_bias[k], delta_softplus=True)
        back = torch.empty_like(y)
        back[:, :, order] = y                                              # to row-major positions
        total += back
    with torch.no_grad():
        torch.testing.assert_close(ss2d.forward_core(x), total.transpose(1, 2), rtol=1e-9, atol=1e-9)


def _official_checkpoint(encoder, path):
    """An ImageNet VMamba checkpoint as published: {'model': ...}, downsamples under layers.i.downsample,
    a 4x4 RGB patch embedding and a classifier head the segmentation model does not use."""
    state = {}
    for key, value in encoder.state_dict().items():
        if key.startswith("downsamples."):
            i, rest = key.split(".", 2)[1:]
            key = f"layers.{i}.downsample.{rest}"
        if key.startswith("patch_embed.proj."):
            continue
        state[key] = value.clone() + 0.5  # distinguishable from the model's own initial values
    dim = encoder.dims[0]
    state.update({"patch_embed.proj.weight": torch.randn(dim, 3, 4, 4), "patch_embed.proj.bias": torch.zeros(dim),
                  "norm.weight": torch.ones(encoder.dims[-1]), "norm.bias": torch.zeros(encoder.dims[-1]),
                  "head.weight": torch.zeros(1000, encoder.dims[-1]), "head.bias": torch.zeros(1000)})
    torch.save({"model": state}, path)
    return state


@pytest.mark.parametrize("in_channels", [1, 3])
def test_official_vmamba_checkpoint_loads_into_the_encoder(tmp_path, in_channels):
    path = tmp_path / sum_mod.WEIGHTS_FILE
    source = tiny(in_channels, 2)
    state = _official_checkpoint(source.vssm_encoder, path)
    assert "layers.0.blocks.0.self_attention.A_logs" in state and "layers.2.downsample.reduction.weight" in state
    model = tiny(in_channels, 2, pretrained=str(path))
    enc = model.vssm_encoder.state_dict()
    for key, value in state.items():
        mapped = sum_mod.vmamba_key_map(key)
        if mapped is None:
            continue
        assert torch.equal(enc[mapped], value), key
    # skipped as the authors skip them: new 2x2 patch embedding (and its LayerNorm weight) stays fresh
    assert not torch.equal(enc["patch_embed.norm.weight"], state["patch_embed.norm.weight"])
    report = model.pretrained_report
    assert report["missing"] == [] and report["mismatched"] == []
    assert report["n_loaded"] == len(enc) - 3  # all but patch_embed.proj.{weight,bias}, patch_embed.norm.weight
    assert model(torch.randn(1, in_channels, 64, 64)).shape == (1, 2, 64, 64)


def test_incomplete_official_weights_are_clear_errors(tmp_path):
    path = tmp_path / "partial.pth"
    state = _official_checkpoint(tiny().vssm_encoder, path)
    torch.save({"model": {k: v for k, v in state.items() if not k.startswith("layers.3.")}}, path)
    with pytest.raises(MedplanError, match="only part of the model"):
        tiny(pretrained=str(path))
    assert tiny(pretrained=str(path), allow_partial=True).pretrained_report["missing"]


def test_freeze_encoder_keeps_the_patch_embedding_trainable():
    model = tiny()
    model.freeze_encoder()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("vssm_encoder.") and "patch_embed" not in n for n in frozen)
    assert any(n.startswith("vssm_encoder.layers.") for n in frozen)
    model(torch.randn(1, 3, 32, 32)).sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)
    model.unfreeze_encoder()
    assert all(p.requires_grad for p in model.parameters())


def test_no_warm_up_from_scratch(tmp_path):
    from medplan.trainers import TrainSettings
    from medplan.trainers import swin_umamba as trainer_mod

    plan = make_plan(epochs={"cv": 2, "lr_search": 1}, batch_size=2, input_size=[32, 32])  # binary: 1 output
    trainer = trainer_mod.SwinUMambaTrainer("TOY", "swin_umamba", 0, plan=plan,
                                            splits=[{"train": ["a", "b"], "val": ["c"]}], output_dir=tmp_path,
                                            settings=TrainSettings(device="cpu"), model_options=dict(TINY),
                                            lr=1e-3, lr_source="test")
    optimizer = trainer.configure_optimizers(trainer.build_network())
    assert [(g["weight_decay"], g["eps"]) for g in optimizer.param_groups] == [(0.05, 1e-5)]
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["foreach"]  # not the for-loop
    assert not trainer.encoder_frozen(1) and not trainer.find_unused_parameters
    assert any("no frozen-encoder warm-up" in d for d in trainer.notes)
    assert any("weight_decay 0.05" in d for d in trainer.notes)


@pytest.mark.parametrize("pretrained", [True])
def test_trainer_uses_the_authors_optimizer_and_warm_up(tmp_path, monkeypatch, pretrained):
    from medplan.trainers import swin_umamba as trainer_mod  # registers the trainer
    from medplan.trainers import get_trainer, train

    assert get_trainer("swin_umamba") is trainer_mod.SwinUMambaTrainer
    use_roots(monkeypatch, tmp_path)
    make_dataset(tmp_path, n_cases=6, n_folds=2, epochs={"lr_search": 1, "cv": 2}, lr=1e-3, batch_size=2)
    options = {**TINY, "depths": [1, 1, 1, 1], "pretrained": False}
    if pretrained:
        _official_checkpoint(tiny(1, 1, depths=[1, 1, 1, 1]).vssm_encoder, tmp_path / "vmamba.pth")
        options["pretrained"] = str(tmp_path / "vmamba.pth")
    monkeypatch.setattr(trainer_mod.SwinUMambaTrainer, "freeze_encoder_epochs", 1)
    seen = []
    monkeypatch.setattr(trainer_mod.SwinUMambaTrainer, "on_epoch_end", lambda self, record: seen.append(
        (self.optimizer.param_groups[0]["weight_decay"], self.optimizer.param_groups[0]["eps"],
         all(p.requires_grad for p in self.model.vssm_encoder.parameters()))))
    out = train("TOY", "swin_umamba", 0, overrides=FAST, model_options=options)
    cfg = json.loads((out / "config.json").read_text())
    assert any("weight_decay 0.05" in d for d in cfg["deviations"])
    if pretrained:
        assert seen == [(0.05, 1e-5, False), (0.05, 1e-5, True)]  # frozen in epoch 1 only
        assert any("frozen" in d for d in cfg["deviations"])
        assert "VMamba encoder frozen" in (out / "training.log").read_text()
    else:
        assert seen == [(0.05, 1e-5, True), (0.05, 1e-5, True)]
        assert any("no frozen-encoder warm-up" in d for d in cfg["deviations"])
