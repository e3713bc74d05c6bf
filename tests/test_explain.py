"""Explain: the auto layer, CAM energy where the model looks, figures, the command and bad input."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from medplan.errors import MedplanError
from medplan.explain import (
    CaseMaps,
    choose_layer,
    class_cams,
    energy_in_region,
    grid_figure,
    panel_figure,
    tile_count,
)
from medplan.io import atomic_write_json
from medplan.plan import make_plan

TINY = {"base_channels": 4, "depth": 2}
SIZE = 32


# ----------------------------------------------------------------------------- small models
class RegionModel(nn.Module):
    """Class 1's logit depends only on the image inside a known region: ``features`` keeps the
    image there (channel 0) and outside it (channel 1); ``head`` reads channel 0 only."""

    def __init__(self, region: np.ndarray):
        super().__init__()
        self.register_buffer("region", torch.as_tensor(region, dtype=torch.float32)[None, None])
        self.features = _Split(self.region)
        self.head = nn.Conv2d(2, 2, 1)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.copy_(torch.tensor([0.0, -1.0]))
            self.head.weight[1, 0] = 4.0

    def forward(self, x):
        return self.head(self.features(x))


class _Split(nn.Module):
    def __init__(self, region):
        super().__init__()
        self.region = region

    def forward(self, x):
        x = x[:, :1]
        return torch.cat([x * self.region, x * (1 - self.region)], dim=1)


class TokenNet(nn.Module):
    """A tiny ViT-like segmenter: patch tokens (B, N, C), transformer blocks, a linear head per token."""

    def __init__(self, in_ch=1, classes=3, dim=16, patch=4):
        super().__init__()
        self.patch, self.classes = patch, classes
        self.embed = nn.Conv2d(in_ch, dim, patch, stride=patch)
        self.blocks = nn.Sequential(*[nn.TransformerEncoderLayer(dim, 2, 32, batch_first=True, dropout=0.0)
                                      for _ in range(2)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes * patch * patch)

    def forward(self, x):
        b, _, h, w = x.shape
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = self.norm(self.blocks(t))
        out = self.head(t).reshape(b, h // self.patch, w // self.patch, self.classes, self.patch, self.patch)
        return out.permute(0, 3, 1, 4, 2, 5).reshape(b, self.classes, h, w)


def _region(top: bool) -> np.ndarray:
    r = np.zeros((SIZE, SIZE), dtype=bool)
    if top:
        r[2:12, 4:28] = True
    else:
        r[20:30, 4:28] = True
    return r


# ----------------------------------------------------------------------------- auto layer
def _auto(model, x):
    model.eval()
    return choose_layer(lambda t: model(t), model, x)


def test_auto_layer_is_the_last_spatial_map_before_the_logits_for_a_cnn():
    from medplan.architectures import build_model

    model = build_model("unet", 1, 3, **TINY)
    layer = _auto(model, torch.randn(1, 1, SIZE, SIZE))
    assert layer.layout == "nchw" and len(layer.shape) == 4 and min(layer.grid) > 1
    assert layer.shape[1] != 3  # not the logits layer
    # it is the module feeding the classifier: no later module (but the classifier) has a 4-D output
    names = [n for n, _ in model.named_modules()]
    head = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][-1]
    assert layer.name in names and layer.name != head
    # a model run at a smaller internal size (as the 224 models): the CAM comes back at the input size
    from medplan.trainers.base import Trainer

    adapter = Trainer.__new__(Trainer)
    adapter.internal_size = (16, 16)
    x = torch.randn(1, 1, SIZE, SIZE)
    small = choose_layer(lambda t: adapter.forward_logits(model, t), model, x)
    assert small.name == layer.name and max(small.grid) <= 16
    cams = class_cams(model, x, np.ones((2, SIZE, SIZE)), [1, 2], small, adapter.forward_logits)
    assert cams.shape == (2, SIZE, SIZE) and cams.max() > 0.5


def test_auto_layer_reshapes_token_outputs_of_a_transformer():
    model = TokenNet()
    layer = _auto(model, torch.randn(1, 1, SIZE, SIZE))
    assert layer.name == "norm" and layer.layout == "tokens" and layer.grid == (8, 8)
    cams = class_cams(model, torch.randn(1, 1, SIZE, SIZE), np.ones((2, SIZE, SIZE)), [1, 2], layer)
    assert cams.shape == (2, SIZE, SIZE) and np.isfinite(cams).all() and cams.max() > 0


def test_auto_layer_for_the_mamba_model():
    from medplan.architectures import build_model, list_models

    if "swin_umamba" not in list_models():
        pytest.skip("swin_umamba not registered")
    model = build_model("swin_umamba", 1, 2, dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), d_state=4,
                        stem_channels=8, pretrained=False)
    layer = _auto(model, torch.randn(1, 1, 64, 64))
    assert len(layer.shape) == 4 and min(layer.grid) > 1 and layer.name.startswith("decoder")


def test_unknown_layer_name_is_a_one_line_error():
    model = RegionModel(_region(True))
    with pytest.raises(MedplanError, match="unknown layer 'featurez'.*features"):
        choose_layer(model, model, torch.ones(1, 1, SIZE, SIZE), "featurez")
    pooled = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Conv2d(2, 2, 1))
    with pytest.raises(MedplanError, match="not a spatial"):
        choose_layer(pooled, pooled, torch.ones(1, 1, SIZE, SIZE), "1")
    assert choose_layer(model, model, torch.ones(1, 1, SIZE, SIZE), "features").how == "--layer"


# ----------------------------------------------------------------------------- pointing game
def test_cam_energy_concentrates_where_the_class_logit_looks():
    region = _region(top=True)
    model = RegionModel(region).eval()
    x = torch.ones(1, 1, SIZE, SIZE)
    layer = _auto(model, x)
    assert layer.name == "features"
    pred = (model(x).argmax(1)[0] == 1).numpy()
    assert pred[region].all() and not pred[~region].any()
    cam = class_cams(model, x, pred[None].astype(np.float32), [1], layer)[0]
    inside = energy_in_region(cam, region)
    elsewhere = energy_in_region(cam, _region(top=False))
    assert inside > 0.95
    assert elsewhere < 0.05
    assert energy_in_region(np.zeros_like(cam), region) == 0.0  # attends to nothing there
    assert np.isnan(energy_in_region(cam, np.zeros_like(region)))  # nothing to point at


# ----------------------------------------------------------------------------- figures
def _case(n_fg=2, gt=True, size=(24, 30)):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, n_fg + 1, size=size).astype(np.uint8)
    return CaseMaps("c1", rng.integers(0, 255, size=size, dtype=np.uint8), labels if gt else None, labels,
                    rng.random((n_fg, *size)).astype(np.float32), {"mDSC": 0.5})


def test_panel_and_grid_have_the_expected_tiles():
    names = ["background", "a", "b"]
    assert tile_count(panel_figure(_case(), names)) == 3 + 2          # image, GT, prediction, 2 CAMs
    assert tile_count(panel_figure(_case(gt=False), names)) == 2 + 2  # new image: no GT
    grid = grid_figure([("unet", _case()), ("tok", _case()), ("x", _case())], names)
    assert tile_count(grid) == 3 * (2 + 2)                             # rows x (GT, prediction, CAM per class)


# ----------------------------------------------------------------------------- the command
def _plan(raw):
    return make_plan(raw_dir=str(raw), labels={"background": 0, "a": 1, "b": 2}, split={"n_folds": 2, "seed": 1},
                     input_size=[SIZE, SIZE], batch_size=2, normalization={"mean": [100.0], "std": [50.0]}).to_json()


@pytest.fixture()
def results(medplan_env):
    """A raw TOY dataset (4 cases) and unet with 2 trained folds, each validating 2 cases."""
    from medplan.architectures import build_model
    from medplan.trainers.checkpoint import save_checkpoint

    raw = medplan_env / "raw" / "TOY"
    (raw / "images").mkdir(parents=True)
    (raw / "labels").mkdir()
    rng = np.random.default_rng(1)
    cases = [f"case{i}" for i in range(4)]
    for c in cases:
        Image.fromarray(rng.integers(0, 255, (40, 36), dtype=np.uint8)).save(raw / "images" / f"{c}.png")
        label = np.zeros((40, 36), np.uint8)
        label[5:20, 5:20], label[25:35, 10:30] = 1, 2
        Image.fromarray(label).save(raw / "labels" / f"{c}.png")
    plan = _plan(raw)
    model_dir = medplan_env / "results" / "TOY" / "unet"
    for k in (0, 1):
        torch.manual_seed(k)
        model = build_model("unet", 1, 3, **TINY)
        fold = model_dir / f"fold_{k}"
        save_checkpoint(fold / "checkpoint_best.pt", {"arch": "unet", "model": model.state_dict(),
                                                      "model_options": dict(TINY), "plan": plan})
        atomic_write_json(fold / "config.json", {"arch": "unet", "model_options": dict(TINY), "plan": plan})
        per_case = {c: {"mDSC": 0.1 * (i + 1), "dice": {"a": 0.1, "b": 0.2}}
                    for i, c in enumerate(cases[2 * k: 2 * k + 2])}
        atomic_write_json(fold / "validation" / "summary.json", {"mDSC": 0.5, "per_case": per_case})
    return medplan_env / "results"


def test_worst_cases_of_a_fold_give_panels_layer_index_and_pointing_game(results, capsys):
    from medplan.cli.explain import main

    assert main(["-d", "TOY", "-a", "unet", "-f", "0", "--worst", "1", "--no-progress"]) == 0
    out = results / "TOY" / "unet" / "fold_0" / "explain"
    assert (out / "case0.png").is_file() and not (out / "case1.png").exists()  # case0 has the lower mDSC
    layer = (out / "layer.json").read_text()
    assert '"how": "auto"' in layer
    pg = pd.read_csv(out / "pointing_game.csv")
    assert list(pg["class"]) == ["a", "b"] and pg["energy_in_gt"].between(0, 1).all()
    assert "case0" in (out / "index.md").read_text()
    summary = pd.read_csv(results / "TOY" / "unet" / "pointing_game.csv")
    assert set(summary["class"]) == {"a", "b"} and (summary["n_cases"] == 1).all()
    cams = np.load(out / "case0_cam.npz")["cams"]
    assert cams.shape == (2, 40, 36)  # the image's original size
    assert "Grad-CAM at layer" in capsys.readouterr().out


def test_named_case_across_architectures_gives_the_grid(results):
    import shutil

    from medplan.cli.explain import main

    shutil.copytree(results / "TOY" / "unet", results / "TOY" / "unet2")
    assert main(["-d", "TOY", "-a", "unet,unet2", "--case", "case3", "--no-progress"]) == 0
    assert (results / "TOY" / "unet" / "fold_1" / "explain" / "case3.png").is_file()  # its validating fold
    grid = results / "TOY" / "explain_grid"
    assert (grid / "case3.png").is_file() and "case3" in (grid / "index.md").read_text()
    assert np.asarray(Image.open(grid / "case3.png")).shape[0] > 100
    # --worst with several architectures: per fold the case hardest for all, in its own fold
    assert main(["-d", "TOY", "-a", "unet", "-a", "unet2", "--worst", "1", "--no-progress"]) == 0
    assert {p.name for p in grid.glob("*.png")} == {"case0.png", "case2.png", "case3.png"}
    assert (results / "TOY" / "unet2" / "fold_1" / "explain" / "case2.png").is_file()


def test_mean_over_folds_and_new_images(results, tmp_path):
    from medplan.cli.explain import main

    assert main(["-d", "TOY", "-a", "unet", "-f", "all", "--case", "case1", "--mean-over-folds", "--target", "gt",
                 "--no-progress"]) == 0
    layer = (results / "TOY" / "unet" / "explain_mean" / "layer.json").read_text()
    assert '"0"' in layer and '"1"' in layer and '"target": "gt"' in layer
    new = tmp_path / "new"
    new.mkdir()
    Image.fromarray(np.full((20, 20), 80, np.uint8)).save(new / "scan.png")
    assert main(["-d", "TOY", "-a", "unet", "-f", "0", "--images", str(new), "--no-progress"]) == 0
    assert (results / "TOY" / "unet" / "fold_0" / "explain" / "new" / "scan.png").is_file()


def test_report_gets_the_pointing_game_section(results):
    from medplan.cli.explain import main
    from medplan.evaluation.aggregate import gather_all_folds
    from medplan.evaluation.report import write_reports

    main(["-d", "TOY", "-a", "unet", "-f", "0", "--worst", "2", "--no-progress"])
    write_reports(gather_all_folds(results), results, plots=False)
    assert "pointing game" in (results / "summary.md").read_text()
    assert set(pd.read_csv(results / "pointing_game.csv")["arch"]) == {"unet"}


@pytest.mark.parametrize("argv, message", [
    (["--case", "nope"], "not a validation case"),
    (["-f", "0", "--case", "case3"], "not a validation case of fold_0"),
    (["-f", "0", "--worst", "1", "--layer", "no.such"], "unknown layer"),
    (["-f", "5", "--worst", "1"], "fold folder not found"),
])
def test_bad_input_is_one_line_and_exit_2(results, capsys, argv, message):
    from medplan.cli.explain import main

    assert main(["-d", "TOY", "-a", "unet", "--no-progress", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (results / "TOY" / "unet" / "fold_0" / "explain").exists()


def test_model_folder_without_checkpoints_is_an_error(results, capsys):
    from medplan.cli.explain import main

    for p in (results / "TOY" / "unet").glob("fold_*/checkpoint_best.pt"):
        p.unlink()
    assert main(["-d", "TOY", "-a", "unet", "--worst", "1", "--no-progress"]) == 2
    assert "checkpoint_best.pt" in capsys.readouterr().err
