"""Model zoo: every architecture is built by name through one registry.

>>> from medplan.architectures import build_model
>>> model = build_model("unet", in_channels=3, num_outputs=1)

Built-in model families are the modules of this package (imported on the first lookup);
third-party ones register through the ``medplan.architectures`` entry-point group. Each
registers with a model card (weights, input contract, parameter groups, paper size, tiny test
options; :mod:`medplan.architectures.card`) that :func:`build_model` applies. See
:mod:`medplan.architectures.registry`.
"""
from medplan.architectures.card import (
    InputContract,
    LayerDecay,
    ModelCard,
    ParamGroups,
    Weights,
    WeightsFile,
    parameter_groups,
)
from medplan.architectures.registry import (
    ENTRY_POINT_GROUP,
    MODELS,
    ModelEntry,
    build_model,
    count_flops,
    count_parameters,
    describe_models,
    get_entry,
    is_model,
    list_models,
    load_plugins,
    model_card,
    model_deviations,
    model_info,
    model_internal_size,
    model_parameter_groups,
    register_model,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "InputContract",
    "LayerDecay",
    "MODELS",
    "ModelCard",
    "ModelEntry",
    "ParamGroups",
    "Weights",
    "WeightsFile",
    "build_model",
    "count_flops",
    "count_parameters",
    "describe_models",
    "get_entry",
    "is_model",
    "list_models",
    "load_plugins",
    "model_card",
    "model_deviations",
    "model_info",
    "model_internal_size",
    "model_parameter_groups",
    "parameter_groups",
    "register_model",
]
