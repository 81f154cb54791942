"""Full fine-tuning: every parameter trains.

The baseline every parameter-efficient method is measured against (Howard and Ruder 2018,
"Universal Language Model Fine-tuning", and every BERT-era fine-tuning paper since).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .base import Method, declare_trainable, register


@register
@dataclass
class FullFinetuningConfig(Method):
    """Train every parameter of the model."""

    name = "full"

    def _apply(self, model: nn.Module) -> None:
        declare_trainable(model)
