"""CLIP encoders (ViT, ModifiedResNet, text transformer), the two-tower model, and named presets.

May import jax/flax/numpy only (never clipjax.train, .data, .losses). Parameter logical axis names
are listed in `clipjax.axes.LOGICAL_AXES`.
"""

from clipjax.axes import LOGICAL_AXES
from clipjax.models.clip import (
    CLIP,
    COMPUTE_FIELDS,
    SPEC_FIELDS,
    CLIPConfig,
    abstract_variables,
    dummy_inputs,
    l2_normalize,
    num_params,
)
from clipjax.models.layers import (
    count_params,
    stack_layer_params,
    unstack_layer_params,
)
from clipjax.models.presets import (
    PRESETS,
    build_config,
    config_from_spec,
    create_model,
    get_preset,
)

__all__ = [
    "CLIP",
    "CLIPConfig",
    "LOGICAL_AXES",
    "PRESETS",
    "COMPUTE_FIELDS",
    "SPEC_FIELDS",
    "abstract_variables",
    "count_params",
    "create_model",
    "dummy_inputs",
    "build_config",
    "config_from_spec",
    "get_preset",
    "l2_normalize",
    "num_params",
    "stack_layer_params",
    "unstack_layer_params",
]
