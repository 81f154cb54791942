"""lightning-peft: parameter-efficient fine-tuning of Hugging Face models as Lightning callbacks."""

from __future__ import annotations

import importlib
from typing import Any

from .methods.base import applied_methods, count_parameters, trainable_parameter_names
from .modules import CausalLM, SequenceClassifier
from .version import __version__

# Public functions that live in heavier modules, imported on first use.
_LAZY = {
    "merge": "merging",
    "unmerge": "merging",
    "export_merged": "merging",
    "save_delta": "delta",
    "TextClassificationData": "data",
    "InstructionData": "data",
    "load_delta": "delta",
    "export_peft": "delta",
    "import_peft": "delta",
}

__all__ = [
    "CausalLM",
    "SequenceClassifier",
    "__version__",
    "applied_methods",
    "count_parameters",
    "trainable_parameter_names",
    *sorted(_LAZY),
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value
