"""Fine-tuning methods: one file each, registered in :data:`base.REGISTRY` on import.

Every module in this package is imported here, so a method config recorded in a checkpoint
or delta manifest can always be rebuilt by name.
"""

import importlib
import pkgutil

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

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "REGISTRY",
    "Method",
    "applied_methods",
    "count_parameters",
    "declare_trainable",
    "method_from_dict",
    "register",
    "sync_requires_grad",
    "trainable_named_parameters",
    "trainable_parameter_names",
]
