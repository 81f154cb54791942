"""``FullFinetuning()``: every parameter trains."""

from dataclasses import dataclass

from lightning_peft.methods.full import FullFinetuningConfig

from .base import MethodCallback


@dataclass(eq=False)
class FullFinetuning(MethodCallback, FullFinetuningConfig):
    """Train every parameter: the baseline each parameter-efficient method is compared with."""
