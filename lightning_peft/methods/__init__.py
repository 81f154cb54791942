"""Fine-tuning methods: one file each, registered by :func:`~lightning_peft.methods.base.register`.

Importing this package imports no method; :func:`~lightning_peft.methods.base.registry`
discovers every module of it (and methods other packages register through entry points)
the first time the registry is read.
"""

from ..core.ownership import MODULE, declare_state, declare_trainable
from .base import (
    REGISTRY,
    AdapterRecord,
    Method,
    MethodError,
    applied_methods,
    count_parameters,
    find_record,
    method_from_dict,
    register,
    registry,
    sync_adapters,
    sync_requires_grad,
    trainable_named_parameters,
    trainable_parameter_names,
)

__all__ = [
    "MODULE",
    "REGISTRY",
    "AdapterRecord",
    "Method",
    "MethodError",
    "applied_methods",
    "count_parameters",
    "declare_state",
    "declare_trainable",
    "find_record",
    "method_from_dict",
    "register",
    "registry",
    "sync_adapters",
    "sync_requires_grad",
    "trainable_named_parameters",
    "trainable_parameter_names",
]
