"""The one Registry behind models, trainers, planners and importers: the duplicate rule, "did you
mean", lazy built-ins, and toy plug-ins added through entry points (the recipes for a new
architecture with weights, a recipe change, a planner and an importer)."""
from __future__ import annotations

import contextlib
import importlib.metadata
import sys
import types
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from medplan.architectures import (MODELS, InputContract, ModelCard, Weights, WeightsFile, build_model, model_info,
                                   register_model)
from medplan.datasets import FORMATS, convert_dataset, detect_format
from medplan.datasets.base import Case, Collected, Importer, IndexLabels, image_files
from medplan.errors import MedplanError
from medplan.io import atomic_write_png, read_json
from medplan.planners import PLANNERS, get_planner
from medplan.registry import Registry, RegistryError, UnknownNameError
from medplan.trainers import Trainer, get_trainer
from medplan.trainers.registry import TRAINERS


class _Dist:
    def __init__(self, name: str):
        self.name = name


class FakeEntryPoint:
    """Stands in for importlib.metadata.EntryPoint: name, value, dist, load()."""

    def __init__(self, name: str, value: str, obj, dist: str = "toy-plugin"):
        self.name, self.value, self._obj, self.dist = name, value, obj, _Dist(dist)

    def load(self):
        return self._obj() if isinstance(self._obj, types.FunctionType) and self.value.endswith("()") else self._obj


def fake_entry_points(monkeypatch, groups: dict[str, list[FakeEntryPoint]]) -> None:
    real = importlib.metadata.entry_points

    def entry_points(**selection):  # other libraries (timm) list their own groups meanwhile
        group = selection.get("group")
        return list(groups[group]) if group in groups else real(**selection)

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)


# ------------------------------------------------------------------ the rules
def test_a_name_is_registered_once_unless_it_is_the_same_object():
    reg: Registry[object] = Registry("widget")
    one, other = object(), object()
    assert reg.add("a", one) is True
    assert reg.add("a", one) is False  # the very same object again (a module imported twice): nothing happens
    with pytest.raises(RegistryError, match="widget 'a' is already registered"):
        reg.add("a", other)
    assert reg["a"] is one and list(reg) == ["a"] and len(reg) == 1
    with pytest.raises(MedplanError, match="invalid widget name '../a'"):
        reg.add("../a", other)  # names become folder names: medplan.names.check_name


def test_unknown_names_suggest_close_ones():
    reg: Registry[int] = Registry("widget")
    for i, name in enumerate(("segformer_b3", "segnext_l", "unet")):
        reg.add(name, i)
    with pytest.raises(UnknownNameError, match=r"unknown widget 'segformr_b3' \(did you mean segformer_b3"):
        reg["segformr_b3"]
    with pytest.raises(KeyError):  # also a KeyError: the registry is a read-only mapping
        reg["zzz"]
    assert "did you mean" not in str(reg.unknown("zzz")) and "known: segformer_b3, segnext_l, unet" in str(
        reg.unknown("zzz"))
    assert reg.get("zzz", "default") == "default" and dict(reg.items())["unet"] == 2


def test_builtins_are_imported_on_first_lookup_and_failures_are_named(tmp_path, monkeypatch):
    home = types.ModuleType("toy_registry_home")
    home.REG = Registry("widget", builtins=["toy_lazy_builtin", "toy_missing_builtin"])
    monkeypatch.setitem(sys.modules, "toy_registry_home", home)
    (tmp_path / "toy_lazy_builtin.py").write_text("from toy_registry_home import REG\nREG.add('lazy', 42)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "toy_lazy_builtin", raising=False)
    assert "toy_lazy_builtin" not in sys.modules
    with pytest.warns(RuntimeWarning, match="toy_missing_builtin failed to import"):
        assert home.REG["lazy"] == 42
    assert "toy_lazy_builtin" in sys.modules
    with pytest.raises(MedplanError, match="modules that failed to import: toy_missing_builtin"):
        home.REG["other"]


def test_plugins_are_attributed_and_can_never_replace_a_builtin(monkeypatch):
    reg: Registry[object] = Registry("widget", group="toy.widgets")
    builtin = object()
    reg.add("core", builtin)
    plugin_mod = types.ModuleType("toy_widget_module")

    def import_module():  # an entry point naming a module that registers on import
        reg.add("from_module", "m")
        return plugin_mod

    def broken():
        raise ImportError("No module named 'gone'")

    fake_entry_points(monkeypatch, {"toy.widgets": [
        FakeEntryPoint("extra", "pkg:extra", "e"),
        FakeEntryPoint("mod", "toy_widget_module()", import_module),
        FakeEntryPoint("core", "evil:core", "evil", dist="evil-plugin"),
        FakeEntryPoint("gone", "gone:thing()", broken),
    ]})
    with pytest.warns(RuntimeWarning) as record:
        added = reg.load_plugins()
    messages = " ".join(str(w.message) for w in record)
    assert "evil-plugin" in messages and "cannot replace a built-in" in messages
    assert "'gone'" in messages and "No module named 'gone'" in messages
    assert added == ["extra", "from_module"] and reg["core"] is builtin
    assert reg.entry("extra").source == "toy-plugin" and reg.entry("from_module").source == "toy-plugin"
    assert reg.entry("core").builtin
    assert reg.load_plugins() == []  # once


def test_sandbox_undoes_registrations():
    with MODELS.sandbox():
        register_model("sandboxed_net")(lambda in_channels, num_classes: nn.Identity())
        assert "sandboxed_net" in MODELS
    assert "sandboxed_net" not in MODELS


# ------------------------------------------------------------------ recipes through entry points
class ToyNet(nn.Module):
    """Needs sides that are multiples of 4 (the card's input contract pads the others)."""

    def __init__(self, in_channels: int, num_outputs: int):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.MaxPool2d(4))
        self.head = nn.Sequential(nn.Conv2d(4, num_outputs, 1), nn.Upsample(scale_factor=4))

    def forward(self, x):
        assert x.shape[-2] % 4 == 0 and x.shape[-1] % 4 == 0
        return self.head(self.encoder(x))


def toy_zoo():
    """A plug-in module: an architecture with ImageNet-style weights, declared by its card only."""
    card = ModelCard(
        paper_params_m=0.0001,
        weights=Weights((WeightsFile("toy_encoder.pth", "https://example.org/toy_encoder.pth", target="encoder",
                                     ignore_missing=(r"^fc\.",)),)),
        input=InputContract(pad_to_multiple=4),
        deviations=("toy: encoder from ImageNet",),
        test_options={},
    )

    @register_model("toy_net", card=card, description="a toy plug-in")
    def toy_net(in_channels: int, num_classes: int) -> nn.Module:
        return ToyNet(in_channels, num_classes)

    return types.ModuleType("toy_zoo")


class ToyTrainer(Trainer):
    """A recipe change: a plain L1 loss on the foreground probability."""

    deviations = ["toy loss: L1 on the sigmoid"]

    def build_loss(self) -> nn.Module:
        class L1(nn.Module):
            def forward(self, logits, seg):
                return (torch.sigmoid(logits[:, 0]) - (seg == 1).float()).abs().mean()

        return L1()


class ToyFormat(Importer):
    """A new download layout: ``toy.txt`` beside ``img/`` and ``lbl/``."""

    name = "toyfmt"
    default_name = "TOY_IMPORTED"
    description = "toy layout (img/ + lbl/ + toy.txt)"

    def detect(self, path):
        return (path / "toy.txt").is_file()

    def collect(self, source, **options):
        cases = [Case(p.stem, p, [source / "lbl" / p.name]) for p in image_files(source / "img")]
        return Collected(cases=cases, decoder=IndexLabels(2), labels={"background": 0, "thing": 1},
                         modality="unknown", source_format=self.name, root=source)


def plan_toy(fingerprint, dataset_json, **options) -> dict:
    return {"planner": "toy"}


@pytest.fixture
def toy_plugins(monkeypatch):
    """The toy plug-ins as installed entry points; every registry back to its state afterwards."""
    fake_entry_points(monkeypatch, {
        "medplan.architectures": [FakeEntryPoint("toy_zoo", "toy_zoo()", toy_zoo)],
        "medplan.trainers": [FakeEntryPoint("toy_net", "toy:ToyTrainer", ToyTrainer),
                             FakeEntryPoint("toy_nett", "toy:ToyTrainer", ToyTrainer)],
        "medplan.planners": [FakeEntryPoint("toy", "toy:plan_toy", plan_toy)],
        "medplan.importers": [FakeEntryPoint("toyfmt", "toy:ToyFormat", ToyFormat)],
    })
    with contextlib.ExitStack() as stack:
        for registry in (MODELS, TRAINERS, PLANNERS, FORMATS):
            stack.enter_context(registry.sandbox())
        yield


def test_recipes_for_plugins_through_entry_points(toy_plugins, tmp_path, monkeypatch):
    # 1. an architecture with weights: the card alone (file, target, contract) - no loading code
    monkeypatch.setenv("MEDPLAN_WEIGHTS", str(tmp_path))
    with pytest.raises(MedplanError, match=r"toy_encoder\.pth.*example\.org"):
        build_model("toy_net", 1, 1, pretrained=True)
    torch.manual_seed(0)
    source = ToyNet(3, 1)
    torch.save({**source.encoder.state_dict(), "fc.weight": torch.zeros(2, 2)}, tmp_path / "toy_encoder.pth")
    model = build_model("toy_net", 1, 1, pretrained=True)  # gray input: the RGB kernel is summed
    assert model.pretrained_report["missing"] == [] and model.pretrained_report["unexpected"] == ["fc.weight"]
    assert torch.allclose(model.encoder[0].weight, source.encoder[0].weight.sum(1, keepdim=True))
    assert model(torch.zeros(2, 1, 10, 13)).shape == (2, 1, 10, 13)  # padded to 12 x 16 and cropped
    assert model_info("toy_net")["source"] == "toy-plugin" and model_info("toy_net")["weights"] == ["toy_encoder.pth"]

    # 2. a recipe change: a trainer for that architecture; one for an unknown architecture is refused
    with pytest.warns(RuntimeWarning, match=r"toy_nett.*not a registered architecture \(did you mean toy_net"):
        assert get_trainer("toy_net") is ToyTrainer
    with pytest.raises(MedplanError, match=r"unknown architecture 'toy_nett' \(did you mean toy_net"):
        get_trainer("toy_nett")  # never silently the base trainer
    assert get_trainer("unet") is Trainer

    # 3. a planner
    assert get_planner("toy")(None, None) == {"planner": "toy"}

    # 4. an importer: detected before the generic folder format, converted by the shared writer
    src = tmp_path / "download"
    (src / "toy.txt").parent.mkdir()
    (src / "toy.txt").write_text("toy")
    for i in range(2):
        label = np.zeros((8, 8), np.uint8)
        label[2:5, 2:5] = 1
        atomic_write_png(src / "img" / f"c{i}.png", (np.arange(64, dtype=np.uint8).reshape(8, 8) * 3))
        atomic_write_png(src / "lbl" / f"c{i}.png", label)
    assert list(FORMATS)[-1] == "toyfmt" and detect_format(src) == "toyfmt"
    out = convert_dataset("toyfmt", src, raw_root=tmp_path / "raw", progress=False, workers=1)
    assert out == tmp_path / "raw" / "TOY_IMPORTED" and read_json(out / "dataset.json")["num_cases"] == 2


def test_no_warnings_for_the_builtins():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert {"unet", "segformer_b3"} <= set(MODELS) and "nnunet_2d" in TRAINERS and "camus" in FORMATS
