"""Lightning callbacks that apply a fine-tuning method when a run starts.

Each callback is also its method's configuration: ``LoRA(r=8).apply(model)`` works without a
Trainer. Names are resolved lazily, on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "MethodCallback": "base",
    "FullFinetuning": "full",
    "PartialFinetuning": "partial",
    "LoRA": "lora",
    "Adapter": "adapter",
    "PrefixTuning": "prefix",
    "PromptTuning": "prompt",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
