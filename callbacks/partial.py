"""``PartialFinetuning(parts, last_n_layers)``: head only, BitFit, LayerNorm, embeddings, last N blocks."""

from dataclasses import dataclass

from lightning_peft.methods.partial import PartialFinetuningConfig

from .base import MethodCallback


@dataclass(eq=False)
class PartialFinetuning(MethodCallback, PartialFinetuningConfig):
    """Train named parts and/or the last N blocks; freeze everything else.

    Args:
        parts: Any of ``"head"``, ``"bias"``, ``"layernorm"``, ``"embeddings"``.
        last_n_layers: Also train the last N transformer blocks.
    """
