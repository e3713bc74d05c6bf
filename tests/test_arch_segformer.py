"""SegFormer-B3 (smp's MiT-B3 + all-MLP decoder): configuration, official key names, weight
resolution (weights folder, Hugging Face cache), the authors' parameter groups (model card) and the
training command's weight flags (shapes, size, weights errors, trainer step: tests/test_model_contract.py)."""
from pathlib import Path

import pytest
import torch

from medplan.architectures import build_model, model_parameter_groups
from medplan.architectures.segformer import build_mit
from medplan.errors import MedplanError
from model_fixtures import full_size

TINY = {"embed_dims": [8, 16, 32, 32], "depths": [1, 1, 2, 1], "num_heads": [1, 1, 2, 2], "decoder_channels": 16}
TINY_MIT = {k: v for k, v in TINY.items() if k != "decoder_channels"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    """Empty weights folder and Hugging Face cache."""
    (tmp_path / "weights").mkdir()
    (tmp_path / "hub").mkdir()
    monkeypatch.setenv("MEDPLAN_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path


# ------------------------------------------------------------------ model
def test_full_size_configuration():
    model = full_size("segformer_b3")
    assert model.decoder.fuse_stage[0].weight.shape == (768, 4 * 768, 1, 1)  # the 768-channel head
    assert model.encoder.block4[-1].drop_path.drop_prob == pytest.approx(0.1)  # reference drop path 0.1
    assert [len(getattr(model.encoder, f"block{i}")) for i in range(1, 5)] == [3, 4, 18, 3]
    assert model.encoder.norm1.eps == 1e-6


def test_encoder_keys_are_the_official_mit_b3_names():
    with torch.device("meta"):
        state = build_mit(3).state_dict()
    # NVIDIA's MiT-B3: 20 tensors per block with spatial reduction (stages 1-3), 16 without
    # (stage 4), four patch embeddings (conv + LayerNorm) and four stage LayerNorms
    assert len(state) == 20 * (3 + 4 + 18) + 16 * 3 + 4 * 4 + 4 * 2
    expected = {
        "patch_embed1.proj.weight": (64, 3, 7, 7), "patch_embed1.norm.weight": (64,),
        "patch_embed4.proj.weight": (512, 320, 3, 3), "block1.0.norm1.weight": (64,),
        "block1.0.attn.q.weight": (64, 64), "block1.0.attn.kv.weight": (128, 64),
        "block1.0.attn.proj.bias": (64,), "block1.0.attn.sr.weight": (64, 64, 8, 8),
        "block1.0.attn.norm.weight": (64,), "block2.3.attn.sr.weight": (128, 128, 4, 4),
        "block3.17.attn.sr.weight": (320, 320, 2, 2), "block3.17.mlp.fc1.weight": (1280, 320),
        "block3.17.mlp.dwconv.dwconv.weight": (1280, 1, 3, 3), "block4.2.mlp.fc2.weight": (512, 2048),
        "block4.0.attn.kv.weight": (1024, 512), "norm3.weight": (320,), "norm4.bias": (512,),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(k.startswith("block4.0.attn.sr") for k in state)  # SR ratio 1 in stage 4


def _official_mit(path, *, mmseg=False):
    """An NVlabs-style ImageNet checkpoint (plain state dict + classifier) or an mmseg segmentation
    checkpoint (``state_dict`` with ``backbone.``/``decode_head.`` keys) for the tiny encoder."""
    torch.manual_seed(1)
    src = build_mit(3, **TINY_MIT)
    for p in src.parameters():
        p.data.uniform_(-1, 1)
    state = dict(src.state_dict())
    if mmseg:
        state = {f"backbone.{k}": v for k, v in state.items()}
        state["decode_head.linear_c4.proj.weight"] = torch.randn(768, 32)
        torch.save({"meta": {}, "state_dict": state}, path)
    else:
        state["head.weight"], state["head.bias"] = torch.randn(1000, 32), torch.randn(1000)
        torch.save(state, path)
    return src


def test_loads_official_checkpoints_with_gray_stem(no_weights):
    src = _official_mit(no_weights / "weights" / "mit_b3.pth")
    model = build_model("segformer_b3", 1, 2, pretrained=True, **TINY)
    report = model.pretrained_report
    assert report["missing"] == [] and report["mismatched"] == []
    assert report["n_loaded"] == len(src.state_dict()) and set(report["unexpected"]) == {"head.weight", "head.bias"}
    got, want = model.encoder.state_dict(), src.state_dict()
    assert torch.allclose(got["patch_embed1.proj.weight"], want["patch_embed1.proj.weight"].sum(1, keepdim=True))
    assert all(torch.equal(got[k], want[k]) for k in want if k != "patch_embed1.proj.weight")
    # the mmseg segmentation checkpoint (segformer.b3.512x512.ade.160k.pth layout) loads its backbone
    _official_mit(no_weights / "ade.pth", mmseg=True)
    model = build_model("segformer_b3", 3, 2, pretrained=str(no_weights / "ade.pth"), **TINY)
    assert model.pretrained_report["n_loaded"] == len(src.state_dict())
    assert model.pretrained_report["unexpected"] == ["decode_head.linear_c4.proj.weight"]
    assert torch.equal(model.encoder.block3[1].attn.kv.weight, src.block3[1].attn.kv.weight)


def test_weights_from_a_filled_hugging_face_cache(no_weights):
    from safetensors.torch import save_file

    src = build_mit(3, **TINY_MIT)
    snapshot = no_weights / "hub" / "models--smp-hub--mit_b3.imagenet" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(snapshot / "model.safetensors"))
    model = build_model("segformer_b3", 3, 2, pretrained=True, **TINY)
    assert model.pretrained_report["path"].endswith("model.safetensors")
    assert model.pretrained_report["missing"] == [] and model.pretrained_report["unexpected"] == []
    # smp downloads a pinned revision: no "main" ref, the snapshot is still found
    (snapshot.parents[1] / "refs" / "main").unlink()
    assert build_model("segformer_b3", 3, 2, pretrained=True, **TINY).pretrained_report["n_loaded"] > 0


def test_missing_weights_name_the_hugging_face_repo_too(no_weights):
    with pytest.raises(MedplanError, match=r"mit_b3\.pth.*NVlabs/SegFormer.*--no-pretrained.*smp-hub/mit_b3"):
        build_model("segformer_b3", 3, 2, pretrained=True, **TINY)
    with pytest.raises(MedplanError, match="num_heads"):
        build_model("segformer_b3", 3, 2, embed_dims=[8, 16, 32, 32], num_heads=[1, 2, 5, 8])


# ------------------------------------------------------------------ parameter groups (model card)
def test_parameter_groups_head_lr_x10_and_no_decay_on_norms():
    from medplan.trainers import Trainer, get_trainer

    assert get_trainer("segformer_b3") is Trainer  # the groups are a model card fact
    model = build_model("segformer_b3", 3, 2, pretrained=False, **TINY)
    groups = model_parameter_groups("segformer_b3", model, 1e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    by_name = {g["name"]: [names[id(p)] for p in g["params"]] for g in groups}
    assert groups[0]["lr"] == 1e-4 and groups[0]["name"] == "decay"  # the logged LR is the base LR
    assert sum(len(v) for v in by_name.values()) == len(names)
    head = next(g for g in groups if g["name"] == "head")
    assert head["lr"] == pytest.approx(1e-3) and "weight_decay" not in head  # the plan's weight decay
    assert set(by_name["head"]) == {n for n in names.values() if not n.startswith("encoder.")}
    no_decay = next(g for g in groups if g["name"] == "no_decay")
    assert no_decay["weight_decay"] == 0.0 and no_decay["lr"] == 1e-4
    assert set(by_name["no_decay"]) == {n for n in names.values() if "norm" in n}
    assert "encoder.block1.0.attn.norm.weight" in by_name["no_decay"]
    assert "encoder.block1.0.attn.q.bias" in by_name["decay"]
    optimizer = torch.optim.AdamW(groups, lr=1e-4, weight_decay=0.01)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0, 0.01]


# ------------------------------------------------------------------ command line
def test_train_command_needs_the_weights_or_a_flag(tmp_path, monkeypatch, capsys, no_weights):
    from trainer_fixtures import make_dataset, use_roots

    from medplan.cli.train import main
    from medplan.io import read_json

    make_dataset(tmp_path, n_cases=6, n_folds=2, epochs={"lr_search": 1, "cv": 1})
    use_roots(monkeypatch, tmp_path)
    common = ["TOY", "segformer_b3", "0", "--device", "cpu", "--num-workers", "0", "--no-progress"]
    tiny = [f"--model-opt={k}={v}".replace(" ", "") for k, v in TINY.items()]
    assert main(common + tiny) == 2
    err = capsys.readouterr().err
    assert "medplan_train: error:" in err and "mit_b3.pth" in err and str(no_weights / "weights") in err
    assert "MEDPLAN_WEIGHTS" in err and "--no-pretrained" in err and "Traceback" not in err
    with pytest.raises(SystemExit):  # argparse: the two flags exclude each other
        main(common + ["--pretrained", "a.pth", "--no-pretrained"])
    # a weights file given on the command line: loaded, recorded with its report
    _official_mit(tmp_path / "mine.pth")
    assert main(common + tiny + ["--pretrained", str(tmp_path / "mine.pth")]) == 0
    cfg = read_json(tmp_path / "results" / "TOY" / "segformer_b3" / "fold_0" / "config.json")
    assert cfg["pretrained"] == str(tmp_path / "mine.pth") and cfg["model_options"]["pretrained"] == cfg["pretrained"]
    assert cfg["pretrained_report"]["n_loaded"] > 0 and cfg["pretrained_report"]["missing"] == []
    assert any("head LR x10" in d for d in cfg["deviations"])


def test_weight_flags_become_model_options():
    from medplan.cli.train import build_parser, weight_options

    def options(*flags, arch="segformer_b3", **model_options):
        return weight_options(build_parser().parse_args(["D", arch, "0", *flags]), arch, model_options)

    assert options() == {}  # left to the library default ...
    from medplan.trainers import default_model_options

    assert default_model_options("segformer_b3", options()) == {"pretrained": True}  # ... the ImageNet weights
    assert default_model_options("segformer_b3", options("--no-pretrained")) == {"pretrained": False}
    assert default_model_options("unet", {}) == {}
    assert options("--no-pretrained") == {"pretrained": False}
    assert options("--pretrained", "w.pth", "--allow-partial") == {"pretrained": str(Path("w.pth").resolve()),
                                                                    "allow_partial": True}
    assert options(pretrained=False) == {"pretrained": False}  # --model-opt pretrained=false is kept
    assert options(arch="unet") == {}  # no weights to default to
    with pytest.raises(MedplanError, match="allow-partial.*'unet'"):
        options("--allow-partial", arch="unet")
    with pytest.raises(MedplanError, match="contradicts"):
        options("--no-pretrained", pretrained=True)
