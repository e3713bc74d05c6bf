"""Architecture registry, U-Net, and the medplan_models command."""
from __future__ import annotations

import importlib.metadata
import json
import sys
import types

import pytest
import torch
from torch import nn

from medplan.architectures import (
    build_model,
    count_flops,
    count_parameters,
    list_models,
    model_info,
    register_model,
)
from medplan.architectures import registry
from medplan.architectures.unet import UNet
from medplan.cli.models import main as models_main
from medplan.errors import MedplanError

PAPER_UNET = 31.0e6


def test_unet_small_odd_size_pads_bottom_right_and_crops():
    torch.manual_seed(0)
    model = build_model("unet_small", 3, 2).eval()
    x = torch.randn(1, 3, 33, 47)
    with torch.no_grad():
        y = model(x)
        # same as zero-padding to a multiple of 16 (48x48) by hand and cropping the logits
        padded = model(torch.nn.functional.pad(x, (0, 1, 0, 15)))
    assert y.shape == (1, 2, 33, 47) and model.input_contract.multiple == (16, 16)
    torch.testing.assert_close(y, padded[..., :33, :47])


def test_input_contract_keeps_the_module_and_its_keys():
    """build_model binds the contract to forward: same class, same state-dict keys, no wrapper."""
    model = build_model("unet", 1, 2, base_channels=4, depth=2)
    bare = UNet(1, 2, base_channels=4, depth=2)
    assert type(model) is UNet and list(model.state_dict()) == list(bare.state_dict())
    copy = __import__("copy").deepcopy(model)
    assert copy(torch.zeros(1, 1, 5, 7)).shape == (1, 2, 5, 7)  # the copy's forward is bound to the copy
    info = model_info("unet")
    assert info["paper_params_m"] == 31.0 and info["source"] == "medplan"
    assert info["module"] == "medplan.architectures.unet"
    assert info["options"] == {"base_channels": 64, "depth": 4}
    assert model_info("segformer_b3")["weights"] == ["mit_b3.pth"]
    assert model_info("hiformer_b")["internal_size"] == (224, 224)


def test_build_model_takes_num_outputs():
    assert build_model("unet_small", 1, num_outputs=3, depth=1)(torch.zeros(1, 1, 4, 4)).shape == (1, 3, 4, 4)
    assert build_model("unet_small", 1, num_classes=3, depth=1)(torch.zeros(1, 1, 4, 4)).shape == (1, 3, 4, 4)


def test_count_parameters_frozen_and_flops():
    model = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1, bias=False), nn.Conv2d(1, 2, 1))
    model[0].weight.requires_grad_(False)
    assert count_parameters(model) == {"total": 9 + 4, "trainable": 4, "frozen": 9}
    # one 3x3 conv on 8x8: 9 * 64 multiply-adds = 1152 FLOPs; the 1x1 conv 2 * 64 MACs
    assert count_flops(model, 1, (8, 8)) == 2 * (9 * 64 + 2 * 64)


def test_registry_errors_are_medplan_errors():
    with pytest.raises(MedplanError, match=r"unknown architecture 'unet_tiny' \(did you mean .*unet_small"):
        build_model("unet_tiny", 3, 1)
    with pytest.raises(MedplanError, match="'unet' has no option 'widht'"):
        build_model("unet", 3, 1, widht=4)
    with pytest.raises(MedplanError, match="no pretrained weights"):
        build_model("unet_small", 3, 1, pretrained=True)
    assert isinstance(build_model("unet_small", 3, 1, pretrained=False, depth=2), nn.Module)
    with pytest.raises(MedplanError, match="num_outputs"):
        build_model("unet_small", 3, 0)
    with pytest.raises(MedplanError, match="depth"):
        build_model("unet_small", 3, 1, depth=0)
    with pytest.raises(MedplanError, match="unknown architecture"):
        model_info("nope")


class _Dist:
    def __init__(self, name: str):
        self.name = name


class _FakeEntryPoint:
    """Stands in for importlib.metadata.EntryPoint: name, value, dist, load()."""

    def __init__(self, name: str, value: str, loader, dist: str = "fake-medplan-plugin"):
        self.name, self.value, self._loader, self.dist = name, value, loader, _Dist(dist)

    def load(self):
        return self._loader()


@pytest.fixture
def clean_registry():
    with registry.MODELS.sandbox():
        yield


def test_entry_point_plugins(clean_registry, monkeypatch):
    def build_tiny(in_channels: int, num_classes: int, *, width: int = 4) -> nn.Module:
        """A 1x1 conv net (plug-in)."""
        return nn.Conv2d(in_channels, num_classes, 1)

    def import_zoo():  # a module that registers on import
        mod = types.ModuleType("fake_zoo")

        @register_model("zoo_net", description="from a zoo module", paper_params_m=1.0)
        def zoo_net(in_channels: int, num_classes: int) -> nn.Module:
            return nn.Conv2d(in_channels, num_classes, 3, padding=1)

        monkeypatch.setitem(sys.modules, "fake_zoo", mod)
        return mod

    def fake_unet(in_channels, num_classes):
        return nn.Identity()

    def broken():
        raise ModuleNotFoundError("No module named 'missing_pkg'")

    eps = [
        _FakeEntryPoint("tiny_net", "fake_pkg:build_tiny", lambda: build_tiny),
        _FakeEntryPoint("zoo", "fake_zoo", import_zoo),
        _FakeEntryPoint("broken", "missing_pkg:build", broken),
        _FakeEntryPoint("unet", "fake_pkg:fake_unet", lambda: fake_unet, dist="evil-plugin"),
    ]

    def fake_entry_points(**kwargs):
        assert kwargs == {"group": "medplan.architectures"}
        return eps

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    with pytest.warns(RuntimeWarning) as record:
        names = list_models()
    messages = " ".join(str(w.message) for w in record)
    assert "'broken'" in messages and "missing_pkg" in messages  # the broken one is named, not fatal
    assert "evil-plugin" in messages and "cannot replace a built-in" in messages
    assert {"tiny_net", "zoo_net", "unet", "unet_small"} <= set(names)
    assert "broken" not in names

    tiny = model_info("tiny_net")
    assert tiny["source"] == "fake-medplan-plugin" and tiny["description"] == "A 1x1 conv net (plug-in)."
    assert build_model("tiny_net", 3, 2, width=8)(torch.zeros(1, 3, 5, 5)).shape == (1, 2, 5, 5)
    with pytest.raises(MedplanError, match="'tiny_net' has no option 'depth'"):
        build_model("tiny_net", 3, 2, depth=3)
    assert model_info("zoo_net")["source"] == "fake-medplan-plugin"
    assert model_info("zoo_net")["paper_params_m"] == 1.0
    assert model_info("unet")["source"] == "medplan"
    assert isinstance(build_model("unet", 1, 1, base_channels=4, depth=1), UNet)  # still the built-in


def test_a_second_registration_of_a_name_is_an_error(clean_registry):
    with pytest.raises(MedplanError, match="'unet' is already registered"):
        register_model("unet")(lambda in_channels, num_classes: nn.Identity())
    before = len(list_models())
    register_model("unet")(registry.get_entry("unet").builder)  # the very same builder: nothing happens
    assert len(list_models()) == before


def test_medplan_models_json(capsys):
    # every model's size against the paper: tests/test_model_contract.py
    assert models_main(["--json", "--in-channels", "1", "--num-classes", "4", "unet", "unet_small"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_name = {r["name"]: r for r in rows}
    unet = by_name["unet"]
    assert abs(unet["params_total"] - PAPER_UNET) / PAPER_UNET < 0.05
    assert unet["params_trainable"] == unet["params_total"]
    assert unet["paper_params_m"] == 31.0 and unet["gmacs"] is None and unet["error"] is None
    assert "unet_small" in by_name


def test_medplan_models_table_flops_and_errors(capsys):
    assert models_main(["unet_small", "--flops", "--size", "32", "32"]) == 0
    out = capsys.readouterr().out
    assert "unet_small" in out and "GMACs" in out and "32x32" in out
    assert models_main(["--json", "--flops", "--size", "32", "32", "unet_small"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["gmacs"] > 0 and row["flops_size"] == [32, 32]
    assert models_main(["no_such_net"]) == 2
    assert "unknown architecture 'no_such_net'" in capsys.readouterr().err
