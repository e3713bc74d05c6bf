"""SyncSAM: box prompts, frozen SAM encoder, trainable vs frozen sizes, official SAM key names, the
trainer (shapes, size, weights errors, trainer step: tests/test_model_contract.py)."""

import pytest
import torch

from medplan.architectures import build_model
from medplan.architectures.syncsam import SAM_FILENAME, SyncSAM, parameter_counts, sam_key_map
from medplan.errors import MedplanError
from medplan.plan import make_plan
from model_fixtures import full_size

# ViT width 32, 8 blocks in four (windowed, global) stages, 4x4 windows, ResNet-18, decoder width 32
TINY = {"embed_dim": 32, "depth": 8, "num_heads": 2, "window_size": 4, "global_attn_indexes": [1, 3, 5, 7],
        "prompt_embed_dim": 32, "decoder_mlp_dim": 64, "decoder_heads": 2, "img_size": 128}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(in_channels=1, num_classes=1, **options) -> SyncSAM:
    torch.manual_seed(0)
    return build_model("syncsam", in_channels, num_classes, sam_config=dict(TINY), resnet="resnet18", **options)


def test_forward_backward_with_and_without_boxes():
    in_channels, num_classes = 3, 4
    model = tiny(in_channels, num_classes)
    x = torch.randn(2, in_channels, 64, 64)
    y = model(x)
    assert y.shape == (2, num_classes, 64, 64)
    boxes = torch.tensor([[4.0, 8.0, 40.0, 30.0], [0.0, 0.0, 20.0, 20.0]])
    yb = model(x, boxes)
    assert yb.shape == (2, num_classes, 64, 64)
    assert not torch.allclose(y, yb)  # the prompt matters
    yb.square().mean().backward()
    for grad in (model.cnn.conv1.weight.grad, model.cnn.layer4[0].conv1.weight.grad,
                 model.fusion_convs[0].weight.grad, model.mask_decoder.med_token.weight.grad,
                 model.mask_decoder.ms_vit_feat[0].weight.grad, model.prompt_encoder.point_embeddings[2].weight.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert all(p.grad is None for p in model.image_encoder.parameters())


def test_odd_input_size_and_default_box_option():
    model = tiny(1, 2).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 37, 90)).shape == (1, 2, 37, 90)
        x = torch.randn(1, 1, 64, 64)
        boxed = tiny(1, 2, box=(4, 4, 30, 30)).eval()
        assert torch.allclose(boxed(x), model(x, torch.tensor([[4.0, 4, 30, 30]])), atol=1e-5)
        assert not torch.allclose(boxed(x), model(x), atol=1e-4)
    with pytest.raises(MedplanError, match="boxes"):
        model(torch.randn(2, 1, 32, 32), torch.zeros(1, 4))


def test_frozen_encoder_unchanged_after_optimizer_step():
    model = tiny(1, 1)
    before = {k: v.clone() for k, v in model.image_encoder.state_dict().items()}
    cnn_before = model.cnn.conv1.weight.clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model(torch.randn(2, 1, 32, 32)).mean().backward()
    opt.step()
    after = model.image_encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(cnn_before, model.cnn.conv1.weight)
    counts = parameter_counts(model)
    assert counts["frozen"] == sum(p.numel() for p in model.image_encoder.parameters()) > 0
    assert counts["trainable"] == counts["total"] - counts["frozen"] > 0


def test_full_size_counts_near_the_paper():
    model = full_size("syncsam")
    c = parameter_counts(model)
    assert c["frozen"] == pytest.approx(89.67e6, rel=0.005)  # SAM ViT-B image encoder incl. neck
    # total: paper ~138M, we 144.1M (the card's paper size, checked by the contract test)
    # paper: ~48M trainable; ours 54.5M: the fusion/decoder layer sizes are not published (module docstring)
    assert c["trainable"] == pytest.approx(48e6, rel=0.15)
    blocks = model.image_encoder.blocks
    assert [b.window_size for b in blocks].count(0) == 4 and blocks[2].window_size == 0
    assert tuple(model.image_encoder.pos_embed.shape) == (1, 64, 64, 768)
    assert tuple(blocks[2].attn.rel_pos_h.shape) == (127, 64)  # SAM's 1024 shapes: the checkpoint loads as is


def _official_sam_checkpoint(model: SyncSAM, path):
    """Our state dict written under SAM's names (plus parts SyncSAM drops), as sam_vit_b_01ec64.pth has them."""
    inverse = {}
    for k, v in model.state_dict().items():
        if k.startswith("image_encoder."):
            inverse[k.replace(".mlp.fc1.", ".mlp.lin1.").replace(".mlp.fc2.", ".mlp.lin2.")] = v.clone()
        elif k.startswith("prompt_encoder.") or k.startswith(("mask_decoder.transformer.",
                                                                "mask_decoder.output_upscaling.")):
            inverse[k] = v.clone()
    inverse["mask_decoder.iou_token.weight"] = torch.zeros(1, 32)
    inverse["mask_decoder.mask_tokens.weight"] = torch.zeros(4, 32)
    inverse["prompt_encoder.mask_downscaling.0.weight"] = torch.zeros(4, 1, 2, 2)
    torch.save({k: v for k, v in inverse.items()}, path)
    return inverse


def test_loads_a_checkpoint_with_official_sam_names(tmp_path):
    source = tiny(3, 1)
    for p in source.parameters():
        torch.nn.init.normal_(p.data)
    official = _official_sam_checkpoint(source, tmp_path / SAM_FILENAME)
    assert "image_encoder.blocks.0.attn.qkv.weight" in official
    assert "image_encoder.blocks.0.mlp.lin1.weight" in official and "image_encoder.neck.0.weight" in official
    assert "mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight" in official
    assert sam_key_map("mask_decoder.iou_prediction_head.layers.0.weight") is None

    model = tiny(1, 1, pretrained=str(tmp_path / SAM_FILENAME))  # gray input: patch embedding summed over RGB
    got = model.state_dict()
    assert torch.allclose(got["image_encoder.patch_embed.proj.weight"],
                          source.image_encoder.patch_embed.proj.weight.sum(1, keepdim=True))
    for key in ("image_encoder.blocks.0.attn.qkv.weight", "image_encoder.blocks.3.mlp.fc1.weight",
                "image_encoder.blocks.7.attn.rel_pos_h", "image_encoder.pos_embed", "image_encoder.neck.2.weight",
                "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
                "mask_decoder.transformer.norm_final_attn.weight", "mask_decoder.output_upscaling.0.weight"):
        assert torch.equal(got[key], source.state_dict()[key]), key
    report = model.pretrained_report
    assert report["sam"]["n_loaded"] == len(official) - 3 and report["sam"]["missing"] == []
    assert all(not p.requires_grad for p in model.image_encoder.parameters())

    # a SAM checkpoint missing encoder tensors is an error unless allow_partial
    del official["image_encoder.blocks.1.attn.proj.weight"]
    torch.save(official, tmp_path / "partial.pth")
    with pytest.raises(MedplanError, match="part of the model"):
        tiny(1, 1, pretrained=str(tmp_path / "partial.pth"))
    report = tiny(1, 1, pretrained=str(tmp_path / "partial.pth"), allow_partial=True).pretrained_report
    assert report["sam"]["missing"] == ["image_encoder.blocks.1.attn.proj.weight"]
    assert report["resnet"].startswith("random init")  # a SAM file alone leaves the ResNet random


def test_boxes_from_labels():
    from medplan.trainers.syncsam import boxes_from_labels

    seg = torch.zeros(3, 20, 30, dtype=torch.long)
    seg[0, 5:9, 10:21] = 1
    seg[1, 2, 3] = 2
    seg[1, 15, 25] = 1
    boxes = boxes_from_labels(seg)
    assert boxes.tolist() == [[10, 5, 20, 8], [3, 2, 25, 15], [0, 0, 29, 19]]
    g = torch.Generator().manual_seed(0)
    jittered = boxes_from_labels(seg, jitter=3, generator=g)
    assert (jittered - boxes)[:2].abs().max() <= 3 and not torch.equal(jittered, boxes)
    assert jittered[2].tolist() == [0, 0, 29, 19]  # empty label: whole image, no jitter
    assert (jittered[:, 0] <= jittered[:, 2]).all() and (jittered[:, 1] <= jittered[:, 3]).all()
    assert jittered.min() >= 0 and (jittered[:, [0, 2]] <= 29).all() and (jittered[:, [1, 3]] <= 19).all()


def test_dice_focal_loss():
    from medplan.trainers.syncsam import DiceFocalLoss

    seg = torch.zeros(1, 8, 8, dtype=torch.long)
    seg[0, 2:6, 2:6] = 1
    good = (seg.float() * 20 - 10).unsqueeze(1)
    loss = DiceFocalLoss(1)
    assert loss(good, seg) < 0.05 < loss(-good, seg)
    assert loss(-good, seg) > 15  # the Dice term carries weight 20
    multi = DiceFocalLoss(3)
    logits = torch.nn.functional.one_hot(seg, 3).permute(0, 3, 1, 2).float() * 20
    assert multi(logits, seg) < 0.05 * 20 + 1e-3 < multi(-logits, seg)


def test_trainer_prompts_with_label_boxes_in_training_only(tmp_path, monkeypatch):
    from medplan.trainers import TrainSettings, get_trainer
    from medplan.trainers import syncsam as trainer_mod

    assert get_trainer("syncsam") is trainer_mod.SyncSAMTrainer
    plan = make_plan(epochs={"cv": 1, "lr_search": 1}, batch_size=2, input_size=[32, 32])  # binary: 1 output
    options = {"sam_config": dict(TINY), "resnet": "resnet18", "pretrained": False}
    trainer = trainer_mod.SyncSAMTrainer("TOY", "syncsam", 0, plan=plan, splits=[{"train": ["a", "b"], "val": ["c"]}],
                                         output_dir=tmp_path, settings=TrainSettings(device="cpu"),
                                         model_options=options, lr=1e-3, lr_source="test")
    assert any("Dice + focal" in d for d in trainer.notes) and any("bounding box" in d for d in trainer.notes)
    torch.manual_seed(0)
    model = trainer.build_network()  # checks that SAM's encoder is frozen
    seen = []
    original = SyncSAM.forward

    def spy(self, images, boxes=None):
        seen.append((self.training, None if boxes is None else boxes.clone()))
        return original(self, images, boxes)

    monkeypatch.setattr(SyncSAM, "forward", spy)
    seg = torch.zeros(2, 32, 32, dtype=torch.long)
    seg[0, 4:10, 6:20] = 1
    batch = {"image": torch.randn(2, 1, 32, 32), "seg": seg, "case_ids": ["a", "b"]}
    with torch.no_grad():
        trainer.forward_batch(model.train(), batch)
        trainer.forward_batch(model.eval(), batch)  # validation / prediction: no labels to prompt from
    (training, boxes), (evaluating, none) = seen
    assert training and boxes.shape == (2, 4) and (boxes[1] == torch.tensor([0.0, 0.0, 31.0, 31.0])).all()
    assert abs(boxes[0] - torch.tensor([6.0, 4.0, 19.0, 9.0])).max() <= trainer.box_jitter  # around the label
    assert not evaluating and none is None


def test_folder_with_sam_and_resnet_files_loads_both(tmp_path):
    source = tiny(3, 1)
    for p in source.parameters():
        torch.nn.init.normal_(p.data)
    _official_sam_checkpoint(source, tmp_path / SAM_FILENAME)
    resnet = {k: v.clone() for k, v in source.cnn.state_dict().items()}  # torchvision/timm ResNet names
    resnet["fc.weight"], resnet["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    torch.save(resnet, tmp_path / "resnet18-f37072fd.pth")
    model = tiny(3, 1, pretrained=str(tmp_path))
    assert torch.equal(model.cnn.layer3[1].conv2.weight, source.cnn.layer3[1].conv2.weight)
    assert torch.equal(model.cnn.bn1.running_var, source.cnn.bn1.running_var)
    assert torch.equal(model.image_encoder.blocks[5].attn.qkv.weight, source.image_encoder.blocks[5].attn.qkv.weight)
    assert model.pretrained_report["resnet"]["missing"] == []
