"""``PromptTuning(num_virtual_tokens, init_text)``: a learned soft prompt on the input embeddings."""

from dataclasses import dataclass

from lightning_peft.methods.prompt import PromptTuningConfig

from .base import MethodCallback


@dataclass(eq=False)
class PromptTuning(MethodCallback, PromptTuningConfig):
    """Learn ``num_virtual_tokens`` input vectors in front of every sequence (Lester et al. 2021).

    Args:
        num_virtual_tokens: Number of prompt vectors.
        init_text: Initialize them from this text's token embeddings (``None``: random vocabulary rows).
        tokenizer: Tokenizer for ``init_text`` (default: the model's own).
        position: ``"auto"``, ``"start"`` or ``"after_first"`` (after BERT's ``[CLS]``).
    """
