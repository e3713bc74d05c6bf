"""LLM4Seg (Tang et al. 2025): a CNN U-Net with one frozen pre-trained LLM decoder layer.

The bottleneck feature map ``t`` (B, C, H, W) of the same U-Net as ``unet`` is flattened to
HW tokens, projected by a trainable ``Linear(C, hidden)`` (``adapter1``), passed through ONE
frozen LLaMA decoder layer (``llm``: layer 15 of LLaMA-3.2-1B by default) and projected back
by a trainable ``Linear(hidden, C)`` (``adapter2``), then reshaped and decoded (paper Eq. 4).
With the default U-Net (C = 1024) and LLaMA-3.2-1B (hidden 2048) the projections add
4.19M trainable parameters, the "+4.19M" of the paper's Table 1; the frozen layer adds 60.8M.

Choices where the paper is silent (recorded here so they can be revisited):

* positions: the HW tokens get position ids ``0..HW-1`` (raster order) and the layer's own
  rotary embedding (transformers' ``LlamaRotaryEmbedding``, LLaMA-3 frequency scaling);
* attention is bidirectional (``causal=False``): image tokens have no reading order.
  ``causal=True`` gives the causal mask the layer was pre-trained with;
* no residual around the block beyond the layer's own two (Eq. 4 has none); ``residual=True``
  adds ``t + adapter2(llm(adapter1(t)))``.

Weights (``pretrained=True``): a local Hugging Face folder, ``llm_path`` or
``$MEDPLAN_WEIGHTS/Llama-3.2-1B`` (``pretrained=DIR`` names the folder too). Only the tensors
of ``model.layers.{layer_index}.`` are read from the safetensors shards, never the whole
model, and kept in float32. Nothing is downloaded. ``pretrained=False`` builds a randomly
initialised layer of the same shape (the paper's "+Transformer" baseline), recorded in
``model.pretrained_report``. The frozen layer has ``requires_grad=False``, so it gets no
gradient and the optimizer (AdamW skips parameters without a gradient, weight decay
included) never changes it: no per-architecture trainer is needed.

Requires the optional extra ``llm`` (Hugging Face ``transformers``).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medplan.architectures.card import ModelCard, Weights
from medplan.architectures.pretrained import weights_dir
from medplan.architectures.registry import register_model
from medplan.architectures.unet import UNET_INPUT, UNet
from medplan.errors import MedplanError

log = logging.getLogger(__name__)

LLM_FOLDER = "Llama-3.2-1B"
LLM_URL = "https://huggingface.co/meta-llama/Llama-3.2-1B"
DEFAULT_LAYER = 15

# config.json of meta-llama/Llama-3.2-1B: the shape of a layer built without the files
LLAMA_3_2_1B_CONFIG: dict[str, Any] = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "num_hidden_layers": 16,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 131072,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "vocab_size": 128256,
    "rope_theta": 500000.0,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}


def _transformers():
    try:
        import transformers
        from transformers.models.llama import modeling_llama
    except ImportError as exc:  # optional extra
        raise MedplanError("llm4seg needs Hugging Face transformers: pip install 'medplan[llm]'") from exc
    return transformers, modeling_llama


def _make_config(options: dict[str, Any]):
    transformers, _ = _transformers()
    options = dict(options)
    rope_scaling = options.pop("rope_scaling", None)
    rope_theta = options.pop("rope_theta", None)
    config = transformers.LlamaConfig(**options)
    if rope_theta is not None or rope_scaling is not None:  # transformers 5 keeps both in rope_parameters
        params = dict(getattr(config, "rope_parameters", None) or {})
        if rope_scaling:
            params.update(rope_scaling)
        if rope_theta is not None:
            params["rope_theta"] = float(rope_theta)
        params.setdefault("rope_type", "default")
        if hasattr(config, "rope_parameters"):
            config.rope_parameters = params
        else:  # transformers 4
            config.rope_scaling, config.rope_theta = rope_scaling, rope_theta
    return config


def llm_folder(llm_path: str | Path | None = None) -> Path:
    """The local Hugging Face folder of the LLM: ``llm_path`` or ``$MEDPLAN_WEIGHTS/Llama-3.2-1B``."""
    if llm_path is not None:
        return Path(llm_path).expanduser()
    return weights_dir() / LLM_FOLDER


def _check_folder(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        raise MedplanError(
            f"llm4seg needs a local Hugging Face folder of LLaMA-3.2-1B (config.json + *.safetensors) at {folder} "
            f"(set MEDPLAN_WEIGHTS, or pass llm_path=DIR / --pretrained DIR; published at {LLM_URL}); "
            "or use a random layer with --no-pretrained", folder)


def _shard_files(folder: Path, prefix: str) -> list[Path]:
    """The safetensors files that hold tensors under ``prefix`` (via the shard index if any)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise MedplanError(f"cannot read the shard index: {exc}", index) from exc
        return sorted({folder / f for k, f in weight_map.items() if k.startswith(prefix)})
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise MedplanError(f"no *.safetensors weights in the LLM folder (published at {LLM_URL})", folder)
    return files


def read_layer_tensors(folder: str | Path, layer_index: int) -> dict[str, torch.Tensor]:
    """Tensors of ``model.layers.{layer_index}.`` only, keyed relative to the layer, float32."""
    from safetensors import safe_open

    folder = Path(folder)
    prefix = f"model.layers.{layer_index}."
    out: dict[str, torch.Tensor] = {}
    for file in _shard_files(folder, prefix):
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    if key.startswith(prefix):
                        out[key[len(prefix):]] = f.get_tensor(key).float()
        except MedplanError:
            raise
        except Exception as exc:  # corrupt or missing shard
            raise MedplanError(f"cannot read LLM weights: {type(exc).__name__}: {exc}", file) from exc
    if not out:
        raise MedplanError(f"no tensors named {prefix}* in the LLM folder (does the model have that layer?)", folder)
    return out


class LLMBlock(nn.Module):
    """Linear -> frozen LLM decoder layer -> Linear over the HW tokens of a feature map."""

    def __init__(self, channels: int, config, layer_index: int, *, causal: bool = False, residual: bool = False):
        super().__init__()
        _, modeling_llama = _transformers()
        if getattr(config, "_attn_implementation", None) in (None, "eager"):
            config._attn_implementation = "sdpa"
        self.hidden_size = int(config.hidden_size)
        self.causal = causal
        self.residual = residual
        self.adapter1 = nn.Linear(channels, self.hidden_size)
        self.llm = modeling_llama.LlamaDecoderLayer(config, layer_idx=layer_index)
        self.llm.self_attn.is_causal = causal
        self.rotary = modeling_llama.LlamaRotaryEmbedding(config)
        self.adapter2 = nn.Linear(self.hidden_size, channels)
        self.llm.requires_grad_(False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        b, c, h, w = t.shape
        tokens = self.adapter1(t.flatten(2).transpose(1, 2))  # (B, HW, hidden)
        position_ids = torch.arange(h * w, device=t.device).unsqueeze(0)
        cos, sin = self.rotary(tokens, position_ids)
        out = self.llm(tokens, position_ids=position_ids, position_embeddings=(cos, sin))
        if isinstance(out, tuple):  # transformers 4 returns a tuple
            out = out[0]
        y = self.adapter2(out).transpose(1, 2).reshape(b, c, h, w)
        return t + y if self.residual else y


class LLM4SegUNet(UNet):
    """The ``unet`` U-Net with an :class:`LLMBlock` on its bottleneck feature map."""

    def __init__(self, in_channels: int, num_classes: int, config, layer_index: int, *,
                 base_channels: int = 64, depth: int = 4, causal: bool = False, residual: bool = False):
        super().__init__(in_channels, num_classes, base_channels=base_channels, depth=depth)
        self.llm4seg = LLMBlock(base_channels * 2**depth, config, layer_index, causal=causal, residual=residual)
        self.pretrained_report: dict | None = None

    def bottleneck(self, y: torch.Tensor) -> torch.Tensor:
        return self.llm4seg(y)


LLM4SEG = ModelCard(
    # a Hugging Face folder that also shapes the layer: the builder reads it (pretrained=/allow_partial)
    weights=Weights(by_builder=True, folder=LLM_FOLDER),
    input=UNET_INPUT,
    test_options={"base_channels": 4, "depth": 2, "layer_index": 0,
                  "llm_config": {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
                                 "num_key_value_heads": 1, "num_hidden_layers": 1, "vocab_size": 64,
                                 "max_position_embeddings": 512}},
)


@register_model("llm4seg", card=LLM4SEG, family="hybrid", trainable_extra_m=4.19,
                description="LLM4Seg: U-Net + frozen LLaMA-3.2-1B layer 15 at the bottleneck")
def llm4seg(in_channels: int, num_classes: int, *, llm_path: str | None = None, layer_index: int = DEFAULT_LAYER,
            llm_config: dict | None = None, base_channels: int = 64, depth: int = 4, causal: bool = False,
            residual: bool = False, pretrained: bool | str = False, allow_partial: bool = False) -> nn.Module:
    """U-Net with one frozen LLM decoder layer between trainable projections at the bottleneck.

    ``pretrained=True`` loads layer ``layer_index`` from the local folder ``llm_path`` (default
    ``$MEDPLAN_WEIGHTS/Llama-3.2-1B``); ``pretrained=DIR`` is that folder. ``pretrained=False``
    gives a random layer shaped by ``llm_config`` (LlamaConfig options), else by the folder's
    config.json when ``llm_path`` is given, else by LLaMA-3.2-1B's config.
    """
    transformers, _ = _transformers()
    if isinstance(layer_index, bool) or not isinstance(layer_index, int) or layer_index < 0:
        raise MedplanError(f"llm4seg: layer_index must be a non-negative integer, got {layer_index!r}")
    if pretrained not in (False, None, True):
        if llm_path is not None and Path(llm_path).expanduser() != Path(pretrained).expanduser():
            raise MedplanError("llm4seg: pretrained=DIR and llm_path name different folders; give one of them")
        llm_path = str(pretrained)
    load = pretrained not in (False, None)
    folder = llm_folder(llm_path) if (load or llm_path is not None) else None
    if load and llm_config is not None:
        raise MedplanError("llm4seg: llm_config is only for a random layer (pretrained=False); "
                           "the layer's shape comes from the folder's config.json")
    if folder is not None:
        _check_folder(folder)
        try:
            config = transformers.LlamaConfig.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:
            raise MedplanError(f"cannot read the LLM config: {type(exc).__name__}: {exc}", folder / "config.json") from exc
    else:
        config = _make_config(LLAMA_3_2_1B_CONFIG if llm_config is None else llm_config)
    n_layers = getattr(config, "num_hidden_layers", None)
    if n_layers is not None and layer_index >= n_layers:
        raise MedplanError(f"llm4seg: layer_index {layer_index} is out of range; the LLM has {n_layers} layers")
    model = LLM4SegUNet(in_channels, num_classes, config, layer_index, base_channels=base_channels,
                        depth=depth, causal=causal, residual=residual)
    if not load:
        model.pretrained_report = {"llm_layer": "random", "layer_index": layer_index}
        return model
    tensors = read_layer_tensors(folder, layer_index)
    target = model.llm4seg.llm
    expected = target.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if tuple(expected[k].shape) != tuple(tensors[k].shape))
    if wrong or unexpected or (missing and not allow_partial):
        raise MedplanError(f"LLM layer {layer_index} does not match the decoder layer: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}", folder)
    if target.self_attn.q_proj.weight.is_meta:  # built on the meta device (parameter counting)
        target.load_state_dict(tensors, strict=False, assign=True)
        target.requires_grad_(False)
    else:
        target.load_state_dict(tensors, strict=False)
    model.pretrained_report = {"llm_layer": "pretrained", "folder": str(folder), "layer_index": layer_index,
                               "matched": len(tensors), "missing": missing, "unexpected": []}
    log.info("llm4seg: loaded layer %d (%d tensors) from %s", layer_index, len(tensors), folder)
    return model
