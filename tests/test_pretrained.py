"""Offline weight loading: resolution, key reports, partial loads, gray adaptation."""
import pytest
import torch
from torch import nn

from medplan.architectures.pretrained import load_weights, resolve_weights
from medplan.errors import MedplanError


class Enc(nn.Module):
    def __init__(self, cin=3):
        super().__init__()
        self.stem = nn.Conv2d(cin, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)


def test_resolve_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDPLAN_WEIGHTS", str(tmp_path))
    assert resolve_weights(False, "x.pth", url="u", model="m") is None
    with pytest.raises(MedplanError, match="x.pth.*published at https://example"):
        resolve_weights(True, "x.pth", url="https://example", model="m")
    (tmp_path / "x.pth").write_bytes(b"")
    assert resolve_weights(True, "x.pth", url="u", model="m") == tmp_path / "x.pth"
    with pytest.raises(MedplanError, match="not found"):
        resolve_weights(tmp_path / "nope.pth", "x.pth", url="u", model="m")


def test_load_full_wrapped_checkpoint_with_prefixes(tmp_path):
    src = Enc()
    path = tmp_path / "w.pth"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in src.state_dict().items()}, "meta": {}}, path)
    dst = Enc()
    report = load_weights(dst, path)
    assert not report.missing and not report.mismatched
    assert torch.equal(dst.stem.weight, src.stem.weight)


def test_partial_load_is_an_error_unless_allowed(tmp_path):
    src = Enc()
    path = tmp_path / "w.pth"
    state = {k: v for k, v in src.state_dict().items() if not k.startswith("head")}
    torch.save(state, path)
    with pytest.raises(MedplanError, match="part of the model"):
        load_weights(Enc(), path)
    report = load_weights(Enc(), path, allow_partial=True)
    assert set(report.missing) == {"head.weight", "head.bias"}
    assert load_weights(Enc(), path, ignore_missing=[r"^head\."]).missing == []


def test_rgb_stem_adapted_to_gray_and_key_map(tmp_path):
    src = Enc(3)
    path = tmp_path / "w.pth"
    torch.save({("conv0" if k == "stem.weight" else k): v for k, v in src.state_dict().items()}, path)
    dst = Enc(1)
    load_weights(dst, path, key_map=lambda k: "stem.weight" if k == "conv0" else k)
    assert torch.allclose(dst.stem.weight, src.stem.weight.sum(1, keepdim=True))


def test_corrupt_file_names_the_file(tmp_path):
    path = tmp_path / "bad.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(MedplanError, match="bad.pth"):
        load_weights(Enc(), path)
