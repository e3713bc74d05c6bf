"""MISSFormer: unused parameters, official key names, the bridge's bookkeeping, the 224x224 deviation
(shapes, size, trainer step: tests/test_model_contract.py)."""
import pytest
import torch

from medplan.architectures import build_model, count_parameters, model_deviations, model_info, model_internal_size
from medplan.architectures.missformer import MISSFormer, _expand, _level_lengths
from medplan.errors import MedplanError
from medplan.trainers import Trainer, get_trainer
from model_fixtures import full_size

# widths 8/16/40/64 keep the reference's ratios (1, 2, 5, 8) and head widths of 8
TINY = {"dims": (8, 16, 40, 64), "layers": (1, 1, 1, 1)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(in_channels=3, num_classes=2) -> MISSFormer:
    torch.manual_seed(0)
    return build_model("missformer", in_channels, num_classes, **TINY)


def test_unused_reference_parameters_get_no_gradient():
    model = tiny(1, 1)
    y = MISSFormer.forward(model, torch.randn(2, 1, 64, 64))  # natively at 64 (no 224 round trip)
    y.square().mean().backward()
    for p in (model.backbone.patch_embed1.proj.weight, model.backbone.block4[0].attn.kv.weight,
              model.bridge.bridge_layer1.attn.scale_reduce.sr0.weight, model.bridge.bridge_layer4.mixffn4.fc2.weight,
              model.decoder_2.concat_linear.weight, model.decoder_0.last_layer.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    # parameters the reference builds but never uses: decoder_3 gets no skip, ReMix-FFN's spare norms
    assert all(p.grad is None for p in model.decoder_3.layer_former_1.parameters())
    assert model.decoder_3.concat_linear.weight.grad is None
    assert model.backbone.block1[0].mlp.norm2.weight.grad is None


def test_runs_at_224_and_the_bare_module_at_multiples_of_32():
    model = tiny(1, 3).eval()
    seen = []
    model.backbone.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])))
    with torch.no_grad():
        assert model(torch.randn(1, 1, 50, 70)).shape == (1, 3, 50, 70)  # the card: the paper's 224x224
        assert MISSFormer.forward(model, torch.randn(1, 1, 50, 70)).shape == (1, 3, 50, 70)
        assert MISSFormer.forward(model, torch.randn(1, 1, 96, 64)).shape == (1, 3, 96, 64)
    assert seen == [(224, 224), (64, 96), (96, 64)]  # next multiples of 32; non-square multiples run natively


def test_full_size_configuration():
    model = full_size("missformer", 3, 9)
    total = count_parameters(model)["total"]
    assert round(total / 1e6, 2) == 42.46  # the reference built for Synapse's 9 classes
    assert [len(getattr(model.backbone, f"block{i}")) for i in range(1, 5)] == [2, 2, 2, 2]
    assert model_info("missformer")["pretrained"] is False  # trained from scratch, as the reference


def test_state_dict_keys_are_the_official_names():
    state = full_size("missformer", 3, 9).state_dict()
    # keys and shapes of ZhifangDeng/MISSFormer's MISSFormer(num_classes=9)
    expected = {
        "backbone.patch_embed1.proj.weight": (64, 3, 7, 7),
        "backbone.patch_embed4.norm.bias": (512,),
        "backbone.block1.0.attn.sr.weight": (64, 64, 8, 8),
        "backbone.block3.1.attn.kv.weight": (640, 320),
        "backbone.block2.0.mlp.dwconv.dwconv.weight": (512, 1, 3, 3),
        "backbone.block4.1.mlp.norm3.weight": (2048,),
        "backbone.norm4.weight": (512,),
        "bridge.bridge_layer1.attn.q.weight": (64, 64),
        "bridge.bridge_layer2.attn.scale_reduce.sr0.weight": (64, 64, 8, 8),
        "bridge.bridge_layer3.attn.scale_reduce.sr1.weight": (128, 128, 4, 4),
        "bridge.bridge_layer4.attn.scale_reduce.sr2.weight": (320, 320, 2, 2),
        "bridge.bridge_layer4.attn.scale_reduce.norm.weight": (64,),
        "bridge.bridge_layer1.mixffn3.fc1.weight": (1280, 320),
        "bridge.bridge_layer2.mixffn4.dwconv.dwconv.weight": (2048, 1, 3, 3),
        "decoder_3.concat_linear.weight": (512, 1024),
        "decoder_3.layer_up.expand.weight": (1024, 512),
        "decoder_2.concat_linear.weight": (320, 576),
        "decoder_2.layer_former_1.attn.sr.weight": (320, 320, 2, 2),
        "decoder_1.concat_linear.weight": (128, 288),
        "decoder_1.layer_up.norm.weight": (64,),
        "decoder_0.concat_linear.weight": (64, 128),
        "decoder_0.layer_former_2.attn.sr.weight": (64, 64, 8, 8),
        "decoder_0.layer_up.expand.weight": (1024, 64),
        "decoder_0.last_layer.weight": (9, 64, 1, 1),
    }
    assert {k: tuple(state[k].shape) for k in expected if k in state} == expected
    assert not any(k.startswith("decoder_3.last_layer") for k in state)


def test_bridge_token_offsets_are_the_references_at_224():
    sizes = [(56, 56), (28, 28), (14, 14), (7, 7)]
    lengths = _level_lengths(sizes, [1, 2, 5, 8])
    assert lengths == [3136, 1568, 980, 392]  # the reference's cut points 3136/4704/5684/6076
    model = tiny()
    feats = [torch.randn(1, c, h, w) for c, (h, w) in zip(TINY["dims"], sizes)]
    x = torch.cat([f.permute(0, 2, 3, 1).reshape(1, -1, 8) for f in feats], dim=1)
    kv_tokens = model.bridge.bridge_layer1.attn.scale_reduce(x, sizes)
    assert kv_tokens.shape == (1, 49 + 98 + 245 + 392, 8)  # 784 keys/values, as the reference at 224
    # the bridge hands back the encoder's maps unchanged in shape
    assert [tuple(o.shape) for o in model.bridge(feats)] == [tuple(f.shape) for f in feats]


@pytest.mark.parametrize("p", [2, 4])
def test_patch_expand_matches_a_direct_loop(p):
    B, H, W, C = 2, 3, 2, 5
    x = torch.randn(B, H * W, p * p * C)
    out = _expand(x, H, W, p)
    ref = torch.empty(B, H * p, W * p, C)
    for h in range(H):  # 'b h w (p1 p2 c) -> b (h p1) (w p2) c', element by element
        for w in range(W):
            for i in range(p):
                for j in range(p):
                    ref[:, h * p + i, w * p + j] = x[:, h * W + w, (i * p + j) * C:(i * p + j + 1) * C]
    assert torch.equal(out, ref.reshape(B, -1, C))


def test_no_pretrained_weights_and_bad_options_are_errors():
    with pytest.raises(MedplanError, match="no pretrained weights"):
        build_model("missformer", 3, 2, pretrained=True)
    assert isinstance(build_model("missformer", 3, 2, pretrained=False, **TINY), MISSFormer)
    with pytest.raises(MedplanError, match="dims"):
        build_model("missformer", 3, 2, dims=(8, 12, 40, 64))
    with pytest.raises(MedplanError, match="img_size"):
        build_model("missformer", 3, 2, img_size=100)


def test_the_224_deviation_is_a_card_fact():
    assert get_trainer("missformer") is Trainer
    notes = model_deviations("missformer", dict(TINY), (32, 32))
    assert any("224x224 internally" in n and "(32x32)" in n and "MISSFormer" in n for n in notes)
    assert model_internal_size("missformer", {}) == (224, 224)
    assert model_internal_size("missformer", {"img_size": 64}) == (64, 64)
    assert any("from scratch" in n for n in notes)
