"""Fine-tuning methods: one file each, all registered in :data:`base.REGISTRY`."""

from .base import (
    REGISTRY,
    Method,
    applied_methods,
    count_parameters,
    declare_trainable,
    method_from_dict,
    register,
    sync_requires_grad,
    trainable_named_parameters,
    trainable_parameter_names,
)
from .full import FullFinetuningConfig
from .partial import PartialFinetuningConfig

__all__ = [
    "REGISTRY",
    "FullFinetuningConfig",
    "Method",
    "PartialFinetuningConfig",
    "applied_methods",
    "count_parameters",
    "declare_trainable",
    "method_from_dict",
    "register",
    "sync_requires_grad",
    "trainable_named_parameters",
    "trainable_parameter_names",
]
