"""``PrefixTuning(num_virtual_tokens, projection_dim)``: learned key/value prefixes in every attention layer."""

from dataclasses import dataclass

from lightning_peft.methods.prefix import PrefixTuningConfig

from .base import MethodCallback


@dataclass(eq=False)
class PrefixTuning(MethodCallback, PrefixTuningConfig):
    """Prefix tuning (Li and Liang 2021) on encoders (BERT, MiniLM) and decoders (Llama, GPT-2).

    Args:
        num_virtual_tokens: Number of prefix rows ``P`` per attention layer.
        projection_dim: Hidden width of the reparameterization MLP used during training;
            ``None`` learns the prefixes directly. ``lightning_peft.merge`` folds the MLP
            into plain prefixes.
    """
