"""``LoRA(r, alpha, dropout, target_modules, ...)``: LoRA, rsLoRA and DoRA as a Lightning callback."""

from dataclasses import dataclass

import lightning as L

from lightning_peft.methods.lora import LoRAConfig, lora_layers

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

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Put the LoRA layers in training mode so their dropout is active.

        Lightning keeps each module's mode as it finds it, and ``from_pretrained`` returns
        models in eval mode; the adapters' dropout must still run while training. Only the
        wrappers switch (their frozen base layers keep their mode); the validation loop
        restores modes as usual.
        """
        super().on_train_start(trainer, pl_module)
        if self.dropout > 0:
            for _, layer in lora_layers(pl_module):
                layer.training = True
