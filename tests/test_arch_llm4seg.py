"""LLM4Seg: U-Net + one frozen LLaMA decoder layer, on small random LlamaConfigs (no downloads)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from medplan.architectures.llm4seg import LLMBlock, llm4seg  # noqa: E402
from medplan.architectures.registry import build_model, count_parameters, get_entry  # noqa: E402
from medplan.errors import MedplanError  # noqa: E402

SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=3, vocab_size=64, max_position_embeddings=512)


def small(**kw):
    opts = dict(llm_config=SMALL, layer_index=2, base_channels=8, depth=2, pretrained=False)
    opts.update(kw)
    return opts


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A local Hugging Face folder written by LlamaForCausalLM.save_pretrained (random small LLaMA)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("hf") / "Llama-small"
    lm = LlamaForCausalLM(LlamaConfig(**SMALL))
    lm.save_pretrained(folder)
    return folder, {k: v.clone() for k, v in lm.model.layers[2].state_dict().items()}


def test_only_the_adapters_learn_around_the_frozen_layer():
    in_channels, num_classes = 3, 4
    torch.manual_seed(0)
    model = build_model("llm4seg", in_channels, num_classes, **small())
    x = torch.randn(2, in_channels, 36, 28)  # not multiples of 2**depth: padded and cropped back
    y = model(x)
    assert y.shape == (2, num_classes, 36, 28)
    y.square().mean().backward()
    assert model.llm4seg.adapter1.weight.grad is not None and model.llm4seg.adapter1.weight.grad.abs().sum() > 0
    assert model.inc[0].weight.grad is not None
    assert all(p.grad is None for p in model.llm4seg.llm.parameters())
    assert model.pretrained_report["llm_layer"] == "random"


def test_frozen_layer_unchanged_after_optimizer_step():
    torch.manual_seed(0)
    model = build_model("llm4seg", 1, 2, **small())
    model.train()
    frozen = {k: v.clone() for k, v in model.llm4seg.llm.state_dict().items()}
    adapter = model.llm4seg.adapter1.weight.detach().clone()
    # AdamW with weight decay over ALL parameters, as the shared trainer's parameter_groups does
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 1, 32, 32)), torch.randint(0, 2, (2, 32, 32)))
    loss.backward()
    opt.step()
    for k, v in model.llm4seg.llm.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    assert not torch.equal(model.llm4seg.adapter1.weight, adapter)
    assert all(not p.requires_grad for p in model.llm4seg.llm.parameters())


def test_parameter_counts_trainable_vs_frozen():
    torch.manual_seed(0)
    model = build_model("llm4seg", 1, 2, **small())
    base = count_parameters(build_model("unet", 1, 2, base_channels=8, depth=2))
    counts = count_parameters(model)
    c, d = 8 * 4, SMALL["hidden_size"]  # bottleneck channels, LLM width
    assert counts["trainable"] == base["total"] + (c * d + d) + (d * c + c)
    assert counts["frozen"] == sum(p.numel() for p in model.llm4seg.llm.parameters())
    assert counts["total"] == counts["trainable"] + counts["frozen"]


def test_full_size_counts_on_meta():
    """Default U-Net + LLaMA-3.2-1B layer: +4.19M trainable (paper Table 1), 60.8M frozen."""
    with torch.device("meta"):
        model = build_model("llm4seg", 3, 2, pretrained=False)
        base = count_parameters(build_model("unet", 3, 2))
    counts = count_parameters(model)
    assert counts["trainable"] - base["total"] == 2 * 1024 * 2048 + 2048 + 1024  # 4,197,376
    assert counts["frozen"] == 60_821_504
    assert model.llm4seg.rotary.rope_type == "llama3"
    assert get_entry("llm4seg").pretrained


def test_loads_layer_from_local_hf_folder(hf_folder):
    folder, expected = hf_folder
    model = build_model("llm4seg", 1, 1, llm_path=str(folder), layer_index=2, base_channels=8, depth=2,
                        pretrained=True)
    got = model.llm4seg.llm.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert got[k].dtype == torch.float32
        assert torch.equal(got[k], v.float()), k
    assert all(not p.requires_grad for p in model.llm4seg.llm.parameters())
    assert model.pretrained_report["llm_layer"] == "pretrained" and model.pretrained_report["layer_index"] == 2
    # pretrained=DIR names the folder too, and $MEDPLAN_WEIGHTS/Llama-3.2-1B is not needed
    model2 = llm4seg(1, 1, layer_index=2, base_channels=8, depth=2, pretrained=str(folder))
    assert torch.equal(model2.llm4seg.llm.mlp.up_proj.weight, expected["mlp.up_proj.weight"])
    assert model2(torch.randn(1, 1, 16, 16)).shape == (1, 1, 16, 16)


def test_default_folder_from_medplan_weights(hf_folder, tmp_path, monkeypatch):
    folder, expected = hf_folder
    monkeypatch.setenv("MEDPLAN_WEIGHTS", str(tmp_path))
    (tmp_path / "Llama-3.2-1B").symlink_to(folder, target_is_directory=True)
    model = llm4seg(1, 1, layer_index=1, base_channels=8, depth=2, pretrained=True)
    assert model.pretrained_report["folder"] == str(tmp_path / "Llama-3.2-1B")
    assert not torch.equal(model.llm4seg.llm.mlp.up_proj.weight, expected["mlp.up_proj.weight"])  # layer 1, not 2


def test_missing_folder_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDPLAN_WEIGHTS", str(tmp_path))
    with pytest.raises(MedplanError, match=r"Llama-3\.2-1B.*huggingface\.co/meta-llama/Llama-3\.2-1B") as err:
        build_model("llm4seg", 1, 1, base_channels=8, depth=2, pretrained=True)
    assert str(tmp_path / "Llama-3.2-1B") in str(err.value)
    with pytest.raises(MedplanError, match="nowhere"):
        llm4seg(1, 1, llm_path=str(tmp_path / "nowhere"), base_channels=8, depth=2, pretrained=True)


def test_bad_layer_index_and_missing_weights(hf_folder, tmp_path):
    folder, _ = hf_folder
    with pytest.raises(MedplanError, match="out of range"):
        llm4seg(1, 1, llm_path=str(folder), layer_index=7, base_channels=8, depth=2, pretrained=True)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(MedplanError, match="safetensors"):
        llm4seg(1, 1, llm_path=str(tmp_path), layer_index=0, base_channels=8, depth=2, pretrained=True)


def test_attention_is_bidirectional_unless_causal():
    torch.manual_seed(0)
    cfg = LlamaConfig(**SMALL)
    for causal in (False, True):
        block = LLMBlock(4, cfg, 0, causal=causal).eval()
        x = torch.randn(1, 4, 3, 3)
        x2 = x.clone()
        x2[..., -1, -1] += 1.0  # change the last token only
        first_changed = not torch.allclose(block(x)[..., 0, 0], block(x2)[..., 0, 0])
        assert first_changed is (not causal)


def test_loads_layer_from_sharded_folder(tmp_path):
    """Sharded checkpoints: only the shards the index names for the layer are opened."""
    torch.manual_seed(1)
    lm = LlamaForCausalLM(LlamaConfig(**SMALL))
    lm.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model = llm4seg(1, 1, llm_path=str(tmp_path), layer_index=1, base_channels=8, depth=2, pretrained=True)
    for k, v in lm.model.layers[1].state_dict().items():
        assert torch.equal(model.llm4seg.llm.state_dict()[k], v), k


def test_trainer_keeps_the_loaded_layer_frozen(hf_folder, tmp_path, monkeypatch):
    """End to end with the shared trainer: the checkpoint's LLM layer is the loaded one, untouched."""
    from medplan.trainers import train
    from medplan.trainers.checkpoint import load_checkpoint
    from trainer_fixtures import FAST, limit_threads, make_dataset, use_roots

    limit_threads()
    folder, expected = hf_folder
    use_roots(monkeypatch, tmp_path)
    make_dataset(tmp_path, epochs={"lr_search": 1, "cv": 2}, lr=1e-2)
    out = train("TOY", "llm4seg", 0, overrides=FAST,
                model_options=dict(base_channels=4, depth=2, layer_index=2, pretrained=str(folder)))
    state = load_checkpoint(out / "checkpoint_final.pt")
    weights = next(v for v in state.values() if isinstance(v, dict) and any("llm4seg.llm." in k for k in v))
    for k, v in expected.items():
        assert torch.equal(weights[f"llm4seg.llm.{k}"], v), k
    config = (out / "config.json").read_text()
    assert '"llm_layer": "pretrained"' in config
