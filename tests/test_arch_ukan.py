"""U-KAN-L: gradients everywhere, KANLinear against a direct B-spline evaluation, official key names
(shapes, size, trainer step: tests/test_model_contract.py)."""
import math

import pytest
import torch

from medplan.architectures import build_model, count_parameters
from medplan.architectures.ukan import KANLinear
from medplan.errors import MedplanError
from trainer_fixtures import limit_threads

limit_threads()

TINY = dict(embed_dims=(16, 24, 32))


def tiny(in_channels=3, num_classes=1, **kw):
    torch.manual_seed(0)
    return build_model("ukan_l", in_channels, num_classes, **{**TINY, **kw})


def test_every_parameter_gets_a_gradient():
    model = tiny(1, 1)
    model(torch.randn(2, 1, 64, 64)).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"


def test_u_kan_base_size_and_no_pretrained_weights():
    with torch.device("meta"):
        base = build_model("ukan_l", 3, 1, embed_dims=(128, 160, 256))
    assert abs(count_parameters(base)["total"] / 1e6 - 6.35) < 0.05  # U-KAN (paper: 6.35M)
    with pytest.raises(MedplanError, match="no pretrained weights"):
        build_model("ukan_l", 3, 2, pretrained=True)


def _cox_de_boor(x: float, knots: list[float], i: int, k: int) -> float:
    """B-spline basis N_{i,k}(x) by the textbook recursion, one scalar at a time."""
    if k == 0:
        return 1.0 if knots[i] <= x < knots[i + 1] else 0.0
    left = (x - knots[i]) / (knots[i + k] - knots[i]) * _cox_de_boor(x, knots, i, k - 1)
    right = (knots[i + k + 1] - x) / (knots[i + k + 1] - knots[i + 1]) * _cox_de_boor(x, knots, i + 1, k - 1)
    return left + right


def test_kan_linear_equals_a_direct_spline_evaluation():
    torch.manual_seed(0)
    layer = KANLinear(3, 2).double()  # grid_size 5, cubic, as U-KAN
    knots = layer.grid[0].tolist()
    assert len(knots) == 5 + 2 * 3 + 1 and knots[3] == pytest.approx(-1.0) and knots[8] == pytest.approx(1.0)
    x = torch.rand(4, 3, dtype=torch.float64) * 2.4 - 1.2  # also outside [-1, 1]
    coeff, base = layer.scaled_spline_weight.detach(), layer.base_weight.detach()
    expected = torch.zeros(4, 2, dtype=torch.float64)
    for n in range(4):
        for o in range(2):
            total = 0.0
            for i in range(3):
                xi = float(x[n, i])
                total += float(base[o, i]) * xi / (1 + math.exp(-xi))  # SiLU
                total += sum(float(coeff[o, i, j]) * _cox_de_boor(xi, knots, j, 3) for j in range(8))
            expected[n, o] = total
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)
        inside = torch.linspace(-0.99, 0.99, 7, dtype=torch.float64).unsqueeze(1).expand(-1, 3)
        torch.testing.assert_close(layer.b_splines(inside).sum(-1), torch.ones(7, 3, dtype=torch.float64))


def test_state_dict_uses_the_official_names_and_round_trips(tmp_path):
    model = tiny(3, 1).eval()
    keys = set(model.state_dict())
    official = ["encoder1.conv.0.weight", "encoder3.conv.4.running_var", "patch_embed3.proj.weight",
                "patch_embed4.norm.bias", "block1.0.norm2.weight", "block1.0.layer.fc1.base_weight",
                "block2.0.layer.fc3.spline_weight", "dblock1.0.layer.fc2.spline_scaler",
                "dblock2.0.layer.fc1.grid", "block1.0.layer.dwconv_2.dwconv.weight",
                "block1.0.layer.dwconv_3.bn.running_mean", "norm3.weight", "norm4.weight", "dnorm3.weight",
                "dnorm4.bias", "decoder1.conv.0.weight", "decoder5.conv.3.weight", "final.weight", "final.bias"]
    assert not [k for k in official if k not in keys]
    path = tmp_path / "ukan_official.pth"
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, path)
    fresh = tiny(3, 1)
    fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model(x))
