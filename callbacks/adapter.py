"""``Adapter(bottleneck, placement, activation, train_layernorm)``: bottleneck adapters in every block."""

from dataclasses import dataclass

from lightning_peft.methods.adapter import AdapterConfig

from .base import MethodCallback


@dataclass(eq=False)
class Adapter(MethodCallback, AdapterConfig):
    """Insert residual bottleneck adapters (Houlsby et al. 2019) and train only them.

    Args:
        bottleneck: Width of the down-projection.
        placement: ``"houlsby"`` (after attention and feed-forward) or ``"pfeiffer"``
            (after the feed-forward only).
        activation: ``"relu"``, ``"gelu"``, ``"silu"`` or ``"tanh"``.
        train_layernorm: Also train the blocks' normalization layers.
        init_std: Standard deviation of the down-projection init (the up-projection starts at zero).
    """
