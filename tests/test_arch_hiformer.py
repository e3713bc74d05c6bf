"""HiFormer-B: what reaches the output, the fixed internal size, official key names, ImageNet weight
loading, a run at the internal size (shapes, size, weights errors: tests/test_model_contract.py)."""
import json
import re

import pytest
import timm
import torch

from medplan.architectures import build_model, count_parameters
from medplan.architectures.hiformer import RESNET_FILES, SWIN_T_FILENAME, HiFormer
from medplan.errors import MedplanError
from medplan.inference import load_fold
from medplan.io import read_image
from medplan.trainers import Trainer, get_trainer, train
from model_fixtures import full_size
from trainer_fixtures import FAST, make_dataset, use_roots

# widths 32/64/128, ResNet-18, a 64x64 internal size with 4x4 windows (16/8/4 token grids)
TINY = {"img_size": 64, "embed_dim": 32, "swin_heads": (1, 2, 4), "dlf_heads": (2, 4), "window_size": 4,
        "cnn_backbone": "resnet18"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(in_channels=3, num_classes=2, **options) -> HiFormer:
    torch.manual_seed(0)
    return build_model("hiformer_b", in_channels, num_classes, **{**TINY, **options})


# ------------------------------------------------------------------ model
def test_only_the_pyramid_and_dlf_embeddings_get_gradients_as_in_the_reference():
    model = tiny(1, 1)
    model(torch.randn(2, 1, 64, 64)).square().mean().backward()
    pyr = model.All2Cross.pyramid
    for grad in (pyr.resnet_layers[0].weight.grad, pyr.resnet_layers[6][0].conv2.weight.grad,
                 pyr.swin_transformer.layers[2].blocks[0].attn.qkv.weight.grad, pyr.p2_pm.reduction.weight.grad,
                 model.All2Cross.pos_embed[1].grad, model.All2Cross.norm[0].weight.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # as in the reference: the decoder drops the CLS tokens, the only tokens the single DLF stage changes,
    # and the DLF self-attention blocks are built but their output is discarded
    dlf = model.All2Cross.blocks[0]
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in dlf.fusion.parameters())
    assert all(p.grad is None for p in dlf.blocks.parameters())


def test_any_input_size_is_resized_to_the_fixed_resolution_and_back():
    model = tiny(1, 3).eval()
    seen = []
    model.All2Cross.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])))
    with torch.no_grad():
        assert model(torch.randn(1, 1, 37, 90)).shape == (1, 3, 37, 90)
        assert model(torch.randn(1, 1, 64, 64)).shape == (1, 3, 64, 64)
    assert seen == [(64, 64), (64, 64)]
    with pytest.raises(MedplanError, match="runs at 64x64"):  # the bare module needs its size
        HiFormer.forward(model, torch.randn(1, 1, 32, 32))


def test_full_size_configuration():
    model = full_size("hiformer_b", 3, 9)
    total = count_parameters(model)["total"]
    assert round(total / 1e6, 2) == 25.51  # the HiFormer paper's HiFormer-B size (9 Synapse classes)
    pyr = model.All2Cross.pyramid
    assert [len(s.blocks) for s in pyr.swin_transformer.layers] == [2, 2, 6]
    assert pyr.cnn_pyramid_fm == [256, 512, 1024]
    assert [tuple(p.shape) for p in model.All2Cross.pos_embed] == [(1, 1 + 56 * 56, 96), (1, 1 + 14 * 14, 384)]


def test_state_dict_keys_are_the_official_names():
    state = full_size("hiformer_b", 3, 9).state_dict()
    # keys and shapes of amirhossein-kz/HiFormer's HiFormer(get_hiformer_b_configs(), n_classes=9)
    expected = {
        "All2Cross.pyramid.swin_transformer.layers.0.blocks.0.attn.relative_position_bias_table": (169, 3),
        "All2Cross.pyramid.swin_transformer.layers.2.blocks.5.mlp.fc2.weight": (384, 1536),
        "All2Cross.pyramid.resnet_layers.0.weight": (64, 3, 7, 7),
        "All2Cross.pyramid.resnet_layers.1.running_var": (64,),
        "All2Cross.pyramid.resnet_layers.4.0.downsample.0.weight": (256, 64, 1, 1),
        "All2Cross.pyramid.resnet_layers.6.5.conv3.weight": (1024, 256, 1, 1),
        "All2Cross.pyramid.p1_ch.weight": (96, 256, 1, 1),
        "All2Cross.pyramid.p1_pm.reduction.weight": (192, 384),
        "All2Cross.pyramid.p2_pm.norm.weight": (768,),
        "All2Cross.pyramid.p3_ch.bias": (384,),
        "All2Cross.pyramid.norm_2.weight": (384,),
        "All2Cross.pos_embed.0": (1, 3137, 96),
        "All2Cross.blocks.0.blocks.1.1.mlp.fc1.weight": (768, 384),
        "All2Cross.blocks.0.projs.0.2.weight": (384, 96),
        "All2Cross.blocks.0.fusion.0.attn.wq.weight": (384, 384),
        "All2Cross.blocks.0.fusion.1.norm1.weight": (96,),
        "All2Cross.blocks.0.revert_projs.1.2.weight": (384, 96),
        "All2Cross.norm.1.bias": (384,),
        "ConvUp_s.convs_level.4.weight": (128, 128, 3, 3),
        "ConvUp_l.convs_level.1.weight": (128,),
        "conv_pred.0.weight": (16, 128, 1, 1),
        "segmentation_head.0.weight": (9, 16, 3, 3),
    }
    assert {k: tuple(state[k].shape) for k in expected if k in state} == expected


# ------------------------------------------------------------------ weights
def _official_layout(timm_state: dict) -> dict:
    """The reference's Swin checkpoint layout: each patch merging at the end of the previous stage,
    ``head.weight``, and the persistent buffers it saves."""
    state = {}
    for key, value in timm_state.items():
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", key)
        if m:
            key = f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
        state[key.replace("head.fc.", "head.")] = value
    state["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
    state["layers.0.blocks.1.attn_mask"] = torch.zeros(16, 16, 16)
    return state


@pytest.fixture(scope="module")
def weight_dirs(tmp_path_factory):
    """Folders holding a Swin file (official layout wrapped in {"model": ...}, or timm layout) with the tiny
    config's widths and a ResNet-18 file with torchvision's names."""
    torch.manual_seed(1)
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64, window_size=4,
                             embed_dim=32, num_heads=(1, 2, 4, 8)).state_dict()
    torch.manual_seed(2)
    resnet = timm.create_model("resnet18", pretrained=False).state_dict()
    dirs = {}
    for layout, state, saved in (("official", _official_layout(swin), None), ("timm", swin, swin)):
        folder = tmp_path_factory.mktemp(layout)
        torch.save({"model": state} if saved is None else saved, folder / SWIN_T_FILENAME)
        torch.save(resnet, folder / RESNET_FILES["resnet18"][0])
        dirs[layout] = (folder, state, resnet)
    return dirs


@pytest.mark.parametrize("layout", ["official", "timm"])
def test_imagenet_swin_and_resnet_load_into_the_pyramid(weight_dirs, layout):
    folder, swin, resnet = weight_dirs[layout]
    model = tiny(1, 2, pretrained=str(folder))
    pyr = model.All2Cross.pyramid
    merge1, merge2 = ("layers.0", "layers.1") if layout == "official" else ("layers.1", "layers.2")
    assert torch.equal(pyr.swin_transformer.layers[2].blocks[5].attn.qkv.weight,
                       swin["layers.2.blocks.5.attn.qkv.weight"])
    assert torch.equal(pyr.swin_transformer.layers[0].blocks[1].attn.relative_position_bias_table,
                       swin["layers.0.blocks.1.attn.relative_position_bias_table"])
    assert torch.equal(pyr.p1_pm.reduction.weight, swin[f"{merge1}.downsample.reduction.weight"])
    assert torch.equal(pyr.p2_pm.norm.bias, swin[f"{merge2}.downsample.norm.bias"])
    assert torch.equal(pyr.resnet_layers[0].weight, resnet["conv1.weight"].sum(1, keepdim=True))  # gray stem
    assert torch.equal(pyr.p3[1].conv2.weight, resnet["layer3.1.conv2.weight"])
    assert torch.equal(pyr.resnet_layers[1].running_mean, resnet["bn1.running_mean"])
    report = model.pretrained_report
    assert report["swin"]["missing"] == [] and report["resnet"]["missing"] == []
    assert report["swin"]["n_loaded"] == 2 * 3 + (2 + 2 + 6) * 13  # two merges (3 tensors), 10 blocks (13 each)
    assert "patch_embed.proj.weight" in report["swin"]["unexpected"] and "fc.weight" in report["resnet"]["unexpected"]
    assert not any("relative_position_index" in k or "attn_mask" in k for k in report["swin"]["unexpected"])


def test_reference_reinit_keeps_only_the_relative_position_tables(weight_dirs):
    folder, swin, _ = weight_dirs["official"]
    pyr = tiny(3, 2, pretrained=str(folder), reference_reinit=True).All2Cross.pyramid
    block = pyr.swin_transformer.layers[1].blocks[0]
    assert torch.equal(block.attn.relative_position_bias_table,
                       swin["layers.1.blocks.0.attn.relative_position_bias_table"])
    assert not torch.equal(block.attn.qkv.weight, swin["layers.1.blocks.0.attn.qkv.weight"])
    assert torch.all(block.norm1.weight == 1)


def test_a_missing_second_file_is_named_too(tmp_path, monkeypatch, weight_dirs):
    monkeypatch.setenv("MEDPLAN_WEIGHTS", str(tmp_path))
    (tmp_path / SWIN_T_FILENAME).write_bytes((weight_dirs["timm"][0] / SWIN_T_FILENAME).read_bytes())
    with pytest.raises(MedplanError, match=re.escape(RESNET_FILES["resnet18"][0])):
        tiny(3, 2, pretrained=True)


def test_whole_hiformer_checkpoint_with_official_keys_loads(tmp_path):
    source = tiny(3, 4)
    state = dict(source.state_dict())
    # the reference also stores layer2/layer3 under p2/p3 and the decoder convs under conv_tower
    state.update({f"All2Cross.pyramid.p2.{k}": v for k, v in source.All2Cross.pyramid.p2.state_dict().items()})
    torch.save(state, tmp_path / "hiformer-b_best.pth")
    torch.manual_seed(5)
    model = build_model("hiformer_b", 3, 4, pretrained=str(tmp_path / "hiformer-b_best.pth"), **TINY)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in source.state_dict().items())
    assert model.pretrained_report["hiformer"]["missing"] == []


def test_bad_options_are_errors():
    with pytest.raises(MedplanError, match="window"):
        build_model("hiformer_b", 3, 2, img_size=80, window_size=7)
    with pytest.raises(MedplanError, match="cnn_backbone"):
        build_model("hiformer_b", 3, 2, cnn_backbone="vgg16")


# ------------------------------------------------------------------ trainer
def test_a_run_uses_the_cards_internal_size(tmp_path, monkeypatch):
    assert get_trainer("hiformer_b") is Trainer  # the 224x224 deviation is a model card fact
    use_roots(monkeypatch, tmp_path)
    make_dataset(tmp_path, epochs={"lr_search": 1, "cv": 1}, lr=1e-3)  # planned size 32x32
    seen = []
    original = HiFormer.forward

    def spy(self, x):
        seen.append(tuple(x.shape[-2:]))
        return original(self, x)

    monkeypatch.setattr(HiFormer, "forward", spy)
    out = train("TOY", "hiformer_b", 0, overrides=FAST, model_options={**TINY, "pretrained": False})
    assert seen and set(seen) == {(64, 64)}  # the network never sees the planned 32x32
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["internal_size"] == [64, 64]
    assert any("64x64 internally" in d and "(32x32)" in d and "HiFormer" in d for d in cfg["deviations"])
    for case in cfg["val_cases"]:  # predictions at each case's original size
        assert read_image(out / "validation" / f"{case}.png").shape in ((36, 36), (40, 48))
    assert load_fold(out).internal_size == (64, 64)
