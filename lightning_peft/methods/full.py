"""Full fine-tuning: every parameter trains.

The baseline every parameter-efficient method is measured against (Howard and Ruder 2018,
"Universal Language Model Fine-tuning", and every BERT-era fine-tuning paper since).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.ownership import declare_trainable
from .base import Method, register


@register
@dataclass
class FullFinetuningConfig(Method):
    """Train every parameter of the model."""

    name = "full"
    callback_name = "FullFinetuning"
    in_place = True

    def inject(self, model: nn.Module) -> None:
        """Declare the whole model trainable."""
        declare_trainable(model, adapter=self.adapter_name)

    def merge(self, model: nn.Module) -> None:
        """Nothing to fold: the trained weights are the base weights."""

    def folded_layers(self, model: nn.Module, dtype: torch.dtype) -> dict[str, dict[str, torch.Tensor]]:
        """No layer is wrapped: the plain model already holds every trained weight."""
        return {}
