"""``LoRA(r, alpha, dropout, target_modules, ...)``: LoRA, rsLoRA and DoRA as a Lightning callback."""

from dataclasses import dataclass

from lightning_peft.methods.lora import LoRAConfig

from .base import MethodCallback


@dataclass(eq=False)
class LoRA(MethodCallback, LoRAConfig):
    """Adapt linear layers with trainable low-rank updates; freeze everything else.

    Works as a callback (``Trainer(callbacks=[LoRA(r=8)])``) and on any ``nn.Module``
    (``LoRA(r=8).apply(model)``). See :class:`lightning_peft.methods.lora.LoRAConfig`.

    Args:
        r: Rank of the update.
        alpha: Scaling numerator (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA).
        dropout: Dropout on the adapter input, in ``[0, 1)``.
        target_modules: ``"all-linear"``, a regex over full names, or a list of names.
        exclude_modules: Layers to skip (same forms, no ``"all-linear"``).
        use_dora: Weight-decomposed LoRA (a trainable magnitude per output row).
        use_rslora: Rank-stabilized scaling ``alpha / sqrt(r)``.
        modules_to_save: Modules trained in full and saved with the adapter.
    """
