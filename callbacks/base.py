"""The Lightning shell around a method: inject it at the right moment of a run.

``Trainer.fit`` runs ``Callback.setup`` -> ``LightningModule.setup`` -> ``configure_model``
-> ``strategy.setup`` (precision conversion, device move, DDP/FSDP wrapping, optimizers).
A method must be in place before ``strategy.setup`` so the optimizer and the data-parallel
wrapper see its parameters; injecting in ``on_fit_start`` would be too late.
"""

from __future__ import annotations

import functools
from typing import Any

import lightning as L
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_peft import checkpointing
from lightning_peft.distributed import prepare_strategy
from lightning_peft.methods.base import Method

_WRAPPED = "_lp_configure_model_wrapped"


class MethodCallback(L.Callback):
    """Base of every method callback; subclasses also inherit a method config dataclass.

    The callback *is* the method configuration, so ``LoRA(r=8).apply(model)`` works without
    a Trainer and ``Trainer(callbacks=[LoRA(r=8)])`` works with one.

    Injection happens in :meth:`setup`. A LightningModule that builds its network in
    ``configure_model`` (it has no parameters yet at ``setup``) gets its ``configure_model``
    wrapped so that the method is applied right after it returns.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Apply the method now, or right after ``configure_model`` if the network is built there."""
        assert isinstance(self, Method), "method callbacks must also inherit a Method config"
        checkpointing.install_hooks(pl_module)  # delta-only checkpoints, verified before loading
        prepare_strategy(trainer, pl_module)  # FSDP/DeepSpeed settings, sharded delta checkpoints
        builds_later = (
            is_overridden("configure_model", pl_module) and next(pl_module.parameters(), None) is None
        )
        if not builds_later:
            self.apply(pl_module)
            return
        if getattr(pl_module, _WRAPPED, None) is self:
            return
        original = pl_module.configure_model

        @functools.wraps(original)
        def configure_then_apply(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            self.apply(pl_module)
            return out

        object.__setattr__(pl_module, "configure_model", configure_then_apply)
        object.__setattr__(pl_module, _WRAPPED, self)

    def _leads(self, trainer: L.Trainer) -> bool:
        """Whether this is the first method callback of the run (the one that does checkpoint work)."""
        first = next((c for c in trainer.callbacks if isinstance(c, MethodCallback)), None)
        return first is None or first is self

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Keep only the trained tensors plus what rebuilds them (see :mod:`lightning_peft.checkpointing`)."""
        if self._leads(trainer):
            checkpointing.on_save_checkpoint(pl_module, checkpoint)

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Verify and complete a delta checkpoint (normally already done by the module's own hook)."""
        if self._leads(trainer):
            checkpointing.on_load_checkpoint(pl_module, checkpoint)
