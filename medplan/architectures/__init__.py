"""Model zoo: every architecture is built by name through one registry.

>>> from medplan.architectures import build_model
>>> model = build_model("unet", in_channels=3, num_classes=1)

Built-in model families are the modules of this package (imported on the first lookup);
third-party ones register through the ``medplan.architectures`` entry-point group. See
:mod:`medplan.architectures.registry`.
"""
from medplan.architectures.registry import (
    ENTRY_POINT_GROUP,
    ModelEntry,
    build_model,
    count_flops,
    count_parameters,
    describe_models,
    get_entry,
    is_model,
    list_models,
    load_plugins,
    model_info,
    register_model,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "ModelEntry",
    "build_model",
    "count_flops",
    "count_parameters",
    "describe_models",
    "get_entry",
    "is_model",
    "list_models",
    "load_plugins",
    "model_info",
    "register_model",
]
