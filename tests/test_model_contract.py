"""The contract every registered architecture keeps (timm's test_models.py), on its card's tiny model.

Parametrized over the registry, so a new architecture is tested by registering it with a card:
logits at the input size (even and odd sizes, 1 and 3 channels) with finite gradients and a state
dict round trip; the full-size parameter count against the paper's; missing weights are an error
naming the file and where to get it, partial ones unless ``allow_partial``; one optimizer step of
the architecture's trainer with its card's parameter groups and deviations. What is specific to one
model (DCNv3, aggregated attention, selective scan, official key names, reference numerics)
stays in its ``test_arch_*`` file.
"""
from __future__ import annotations

import re

import pytest
import torch

from medplan.architectures import build_model, count_parameters, get_entry, list_models, model_card
from medplan.errors import MedplanError
from medplan.plan import make_plan
from medplan.trainers import TrainSettings, get_trainer
from model_fixtures import full_size

MODELS = list_models(external=False)  # nnunetv2: nnU-Net builds its network, not medplan
WITH_WEIGHTS = [n for n in MODELS if model_card(n).weights is not None and not model_card(n).weights.by_builder]
WITH_PAPER_SIZE = [n for n in MODELS if model_card(n).paper_params_m is not None and model_card(n).count_on_meta]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(name: str, in_channels: int = 3, num_outputs: int = 2, seed: int = 0, **options) -> torch.nn.Module:
    torch.manual_seed(seed)
    extra = {"pretrained": False} if get_entry(name).pretrained else {}
    return build_model(name, in_channels, num_outputs, **{**extra, **model_card(name).test_options, **options})


def first_output(out):
    return out[0] if isinstance(out, (list, tuple)) else out


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    """Empty weights folder and Hugging Face cache."""
    for sub, var in (("weights", "MEDPLAN_WEIGHTS"), ("hub", "HF_HUB_CACHE")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    return tmp_path


def test_every_model_has_a_card_with_tiny_options():
    assert {"unet", "unet_small", "segformer_b3", "hiformer_b", "missformer", "swin_umamba", "nnunet_2d"} <= set(MODELS)
    for name in MODELS:
        card = model_card(name)
        assert card.test_options or name == "unet_small", name
        assert get_entry(name).pretrained == (card.weights is not None)


@pytest.mark.parametrize("name", MODELS)
def test_logits_at_the_input_size_with_gradients_and_state_dict_round_trip(name, tmp_path):
    card = model_card(name)
    even, odd = card.test_sizes[0], card.test_sizes[-1]
    # 1 channel and 3 channels, each at the even and (in training, then evaluation) the odd size
    for in_channels, num_outputs, sizes in ((1, 1, (even, odd)), (3, 3, (odd, even))):
        model = tiny(name, in_channels, num_outputs)
        train_size, eval_size = sizes
        y = model(torch.randn(2, in_channels, *train_size))
        for out in (y if isinstance(y, (list, tuple)) else [y]):  # deep supervision: every scale
            assert out.shape[:2] == (2, num_outputs)
        y = first_output(y)
        assert y.shape == (2, num_outputs, *train_size) and torch.isfinite(y).all(), (name, train_size)
        y.float().square().mean().backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), name
        assert any(g.abs().sum() > 0 for g in grads), name
        model.eval()
        x = torch.randn(1, in_channels, *eval_size)
        torch.manual_seed(2)  # SegNeXt's NMF starts from random bases in every forward
        with torch.no_grad():  # evaluation mode: one tensor at the input size
            out = model(x)
        assert isinstance(out, torch.Tensor), name
        assert out.shape == (1, num_outputs, *eval_size), (name, eval_size)
    # state dict round trip: a fresh model (other seed) given these weights predicts the same
    torch.save(model.state_dict(), tmp_path / "model.pt")
    fresh = tiny(name, in_channels, num_outputs, seed=1).eval()
    fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True), strict=True)
    torch.manual_seed(2)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), out)


@pytest.mark.parametrize("name", WITH_PAPER_SIZE)
def test_full_size_parameter_count_matches_the_paper(name):
    card = model_card(name)
    total = count_parameters(full_size(name))["total"] / 1e6  # on the meta device: shapes only
    assert abs(total - card.paper_params_m) / card.paper_params_m < card.paper_params_tolerance, (name, total)


@pytest.mark.parametrize("name", WITH_WEIGHTS)
def test_missing_weights_name_the_file(name, no_weights):
    card = model_card(name)
    first = card.weights.files_for(get_entry(name).resolved_options(dict(card.test_options)))[0]
    with pytest.raises(MedplanError, match=re.escape(first.filename)) as info:
        tiny(name, pretrained=True)
    message = str(info.value)
    assert "--no-pretrained" in message and str(no_weights / "weights") in message
    assert first.url.split()[0] in message  # where to get it
    with pytest.raises(MedplanError, match="not found"):
        tiny(name, pretrained=str(no_weights / "nowhere.pth"))


def _weights_file(name: str, model: torch.nn.Module):
    """What ``pretrained=FILE`` loads (the whole-model checkpoint, else the first file): its spec,
    its target's state and the keys the file must hold."""
    card = model_card(name)
    spec = card.weights.single_file or card.weights.files_for(get_entry(name).resolved_options(dict(card.test_options)))[0]
    state = {k: v.clone() for k, v in model.get_submodule(spec.target).state_dict().items()}
    keep = [k for k in state if not k.endswith("num_batches_tracked")
            and not any(re.search(p, k) for p in spec.ignore_missing)]
    return spec, state, keep


def _file_report(report: dict) -> dict:
    return report if "missing" in report else next(r for r in report.values() if isinstance(r, dict))


@pytest.mark.parametrize("name", WITH_WEIGHTS)
def test_partial_weights_load_only_when_allowed(name, tmp_path):
    spec, state, keep = _weights_file(name, tiny(name, seed=1))
    dropped = keep[-1]
    del state[dropped]
    torch.save(state, tmp_path / "part.pth")
    with pytest.raises(MedplanError, match="part of the model"):
        tiny(name, pretrained=str(tmp_path / "part.pth"))
    model = tiny(name, pretrained=str(tmp_path / "part.pth"), allow_partial=True)
    report = _file_report(model.pretrained_report)
    assert report["missing"] == [dropped] and report["mismatched"] == [] and report["n_loaded"] >= len(keep) - 1
    loaded = model.get_submodule(spec.target).state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in keep[:-1])  # everything else came from the file


@pytest.mark.parametrize("name", MODELS)
def test_one_trainer_step_with_the_card_groups_and_deviations(name, tmp_path):
    card = model_card(name)
    size = card.test_sizes[0]
    plan = make_plan(input_size=list(size), batch_size=2, epochs={"lr_search": 1, "cv": 1},
                     early_stopping={"patience": 3})  # gray, binary: one output
    options = {**({"pretrained": False} if card.weights else {}), **card.test_options}
    cls = get_trainer(name)
    trainer = cls("TOY", name, 0, plan=plan, splits=[{"train": ["a", "b"], "val": ["c"]}], output_dir=tmp_path,
                  settings=TrainSettings(device="cpu"), model_options=options, lr=1e-3, lr_source="test")
    torch.manual_seed(0)
    model = trainer.build_network()
    for note in card.deviation_notes(get_entry(name).resolved_options(options), size):
        assert note in trainer.notes  # config.json's deviations
    assert trainer.internal_size == card.input.internal_size_for(get_entry(name).resolved_options(options))
    assert trainer.find_unused_parameters or not card.find_unused_parameters
    optimizer = trainer.configure_optimizers(model)
    grouped = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(list(model.parameters()))
    assert optimizer.param_groups[0]["lr"] == 1e-3  # the logged LR is the base LR
    trainer.model, trainer.loss_fn = model, trainer.build_loss()
    seg = torch.zeros(2, *size, dtype=torch.long)
    seg[:, size[0] // 4: size[0] // 2, size[1] // 4: size[1] // 2] = 1
    batch = {"image": torch.randn(2, 1, *size), "seg": seg, "case_ids": ["a", "b"]}
    model.train()
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    loss = trainer.compute_loss(trainer.forward_batch(model, batch), batch)
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(after, before)), name
