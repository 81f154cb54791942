"""The Lightning shell around a method: inject it at the right moment of a run.

``Trainer.fit`` runs ``Callback.setup`` -> ``LightningModule.setup`` -> ``configure_model``
-> ``strategy.setup`` (precision conversion, device move, DDP/FSDP wrapping, optimizers).
A method must be in place before ``strategy.setup`` so the optimizer and the data-parallel
wrapper see its parameters; injecting in ``on_fit_start`` would be too late.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import lightning as L
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_peft import checkpointing
from lightning_peft.core.ownership import adapter_parts
from lightning_peft.methods.base import Method, field_docs, find_record, sync_adapters
from lightning_peft.strategies import prepare_strategy

_WRAPPED = "_lp_configure_model_wrapped"
_CALLBACKS: dict[type[Method], type] = {}

__all__ = ["MethodCallback", "callback_class"]


class MethodCallback(L.Callback):
    """Base of every method callback; each subclass also inherits a method config dataclass.

    The callback *is* the method configuration, so ``LoRA(r=8).apply(model)`` works without
    a Trainer and ``Trainer(callbacks=[LoRA(r=8)])`` works with one.

    Injection happens in :meth:`setup`. A LightningModule that builds its network in
    ``configure_model`` (it has no parameters yet at ``setup``) gets its ``configure_model``
    wrapped so that the method is applied right after it returns.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Apply the method now, or right after ``configure_model`` if the network is built there."""
        checkpointing.install_hooks(pl_module)  # delta-only checkpoints, verified before loading
        prepare_strategy(trainer, pl_module)  # FSDP/DeepSpeed settings, sharded delta checkpoints
        builds_later = (
            is_overridden("configure_model", pl_module) and next(pl_module.parameters(), None) is None
        )
        if not builds_later:
            self._apply_in_run(trainer, pl_module)
            return
        if getattr(pl_module, _WRAPPED, None) is self:
            return
        original = pl_module.configure_model

        @functools.wraps(original)
        def configure_then_apply(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            self._apply_in_run(trainer, pl_module)
            return out

        object.__setattr__(pl_module, "configure_model", configure_then_apply)
        object.__setattr__(pl_module, _WRAPPED, self)

    def _apply_in_run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Apply the method; every method callback of one Trainer trains (and runs) its adapter.

        Adapters already on the model stay frozen and untouched, and inactive unless the
        user activated them (``lightning_peft.set_adapter``).
        """
        self.apply(pl_module)
        record = find_record(pl_module)
        ours = [c.adapter_name for c in trainer.callbacks if isinstance(c, MethodCallback)]
        present = [n for n in dict.fromkeys(ours) if n in record.names()]
        if record.decoupled:
            return
        record.trainable = present
        record.active = [n for n in record.names() if n in record.active or n in present]
        sync_adapters(pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Put this adapter's modules in training mode, so their dropout runs.

        Lightning keeps each module's mode as it finds it, and ``from_pretrained`` returns
        models in eval mode; an adapter still trains in training mode. Only the adapter's
        own modules switch (the frozen base keeps its mode); validation restores modes.
        """
        for _, part in adapter_parts(pl_module, self.adapter_name):
            part.train()

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


def callback_class(method: type[Method]) -> type:
    """The Lightning callback of a registered method config class (made once, then reused).

    Its name is ``method.callback_name``, it lives in ``lightning_peft.callbacks`` (so it
    pickles and a recipe's ``class_path`` finds it), and its docstring lists every option
    with the doc written under the config's field, for ``--help`` and the docs.
    """
    if method in _CALLBACKS:
        return _CALLBACKS[method]
    name = method.callback_name
    docs = field_docs(method)
    lines = [(method.__doc__ or name).strip(), "", "Works as a callback and on any ``nn.Module``", ""]
    lines[2] = (
        f"Works as a callback (``Trainer(callbacks=[{name}(...)])``) and without a Trainer "
        f"(``{name}(...).apply(model)``). See :class:`{method.__module__}.{method.__qualname__}`."
    )
    lines.append("Args:")
    for field in sorted(dataclasses.fields(method), key=lambda f: f.kw_only):
        text = " ".join(docs.get(field.name, "").split()) or "See the method's documentation."
        lines.append(f"    {field.name}: {text}")
    namespace = {"__module__": "lightning_peft.callbacks", "__qualname__": name, "__doc__": "\n".join(lines)}
    cls = dataclasses.dataclass(eq=False)(type(name, (MethodCallback, method), namespace))
    _CALLBACKS[method] = cls
    return cls
