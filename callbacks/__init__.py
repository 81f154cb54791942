"""Lightning callbacks that apply a fine-tuning method when a run starts: one per registered method.

Each callback is made from its method's config class (:func:`~lightning_peft.callbacks.base.callback_class`),
so it *is* the method's configuration: ``LoRA(r=8).apply(model)`` works without a Trainer,
and ``lightning_peft.callbacks.<Name>`` exists as soon as the method is registered (a new
file in ``lightning_peft/methods/``, or another package's entry point).
"""

from __future__ import annotations

from typing import Any

from lightning_peft.methods.base import registry

from .base import MethodCallback, callback_class

__all__ = ["MethodCallback", *sorted(cls.callback_name for cls in registry().values())]

for _method in registry().values():
    globals()[_method.callback_name] = callback_class(_method)


def __getattr__(name: str) -> Any:
    for method in registry().values():  # a method registered after this package was imported
        if method.callback_name == name:
            return callback_class(method)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {cls.callback_name for cls in registry().values()})
