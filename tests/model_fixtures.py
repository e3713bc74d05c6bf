"""Full-size models on the meta device (parameter shapes only, no memory), built once per test
session: the contract test counts their parameters, the per-architecture tests check their
configuration. Shared objects: read them, never modify them."""
from __future__ import annotations

import functools

import torch
from torch import nn

from medplan.architectures import build_model, get_entry


@functools.lru_cache(maxsize=None)
def full_size(name: str, in_channels: int = 3, num_outputs: int = 2) -> nn.Module:
    """``name`` with its default (paper) options on the meta device."""
    options = {"pretrained": False} if get_entry(name).pretrained else {}
    with torch.device("meta"):
        return build_model(name, in_channels, num_outputs, **options)
