"""Modules an adapter trains in full, one copy per adapter (a task head per adapter).

A method's ``modules_to_save`` (a task head, say) must not be trained in place: a second
adapter would overwrite the first one's head, and ``disable_adapters`` could not give the
base back. :class:`ModuleCopies` keeps the original module frozen as ``base_layer`` and one
trainable copy per adapter; ``forward`` runs the copy of the adapter in use, the original
when none is, and per-row routing sends each row through its own adapter's copy.

An original the model itself trains (our classifiers' new head, declared with the owner
``MODULE``) becomes the model's own frozen state once copied: saved with every delta (its
random initialization must come back), never trained, never fingerprinted.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .ownership import (
    MODULE,
    STATE,
    TRAIN,
    AdapterPart,
    LayerWrapper,
    declarations,
    declare_state,
    declare_trainable,
    owned_tensors,
    undeclare,
)
from .targeting import backbone_prefix, find_backbone, head_module_names, replace_module

__all__ = [
    "ModuleCopies",
    "ModuleCopy",
    "copy_modules",
    "remove_copies",
    "saved_module_target",
    "saved_modules",
]


class ModuleCopy(AdapterPart):
    """One adapter's trainable copy of a module (``module``)."""

    def __init__(self, adapter_name: str, module: nn.Module) -> None:
        super().__init__(adapter_name)
        self.module = module
        declare_trainable(self, adapter=adapter_name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the copy."""
        return self.module(*args, **kwargs)


class ModuleCopies(LayerWrapper):
    """A frozen original (``base_layer``) and one trainable copy per adapter (``copies``).

    Runs the copy of the last active adapter that has one (the original when none has);
    under per-row routing each row goes through its own adapter's copy, and rows of no
    adapter through the original.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.copies = nn.ModuleDict()
        self.model_trained = False  # the original was trained by the model itself before it was copied

    def extra_repr(self) -> str:
        """The adapters holding a copy."""
        return f"copies={list(self.copies)}"

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The serving copy's output, row by row when routed."""
        serving = [c for c in self.copies.values() if c.serves()]
        if not serving:
            return self.base_layer(x, *args, **kwargs)
        if all(c.rows is None for c in serving):
            return serving[-1](x, *args, **kwargs)
        out = self.base_layer(x, *args, **kwargs)  # rows of no adapter keep the original's output
        for part in serving:
            rows = part.rows.to(out.device)
            if bool(rows.any()):
                picked = part(x[rows], *[a[rows] for a in args], **kwargs)
                out = out.index_put((rows.nonzero().squeeze(1),), picked.to(out.dtype))
        return out


def copy_modules(model: nn.Module, names: list[str], adapter_name: str) -> None:
    """Give adapter ``adapter_name`` its own trainable copy of each module named (wrapping it once)."""
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, ModuleCopies):
            original = module
            module = ModuleCopies(original)
            if (MODULE, TRAIN) in declarations(original):  # the model's own head: kept, no longer trained
                undeclare(original, MODULE, TRAIN)
                declare_state(original, adapter=MODULE)
                module.model_trained = True
            replace_module(model, name, module)
        if adapter_name in module.copies:
            raise ValueError(f"{name} already holds a copy for adapter {adapter_name!r}")
        clone = copy.deepcopy(module.base_layer)
        for param in clone.parameters():
            param.requires_grad_(True)
        part = ModuleCopy(adapter_name, clone)
        part.train(module.base_layer.training)
        module.copies[adapter_name] = part


def remove_copies(model: nn.Module, adapter_name: str) -> None:
    """Drop adapter ``adapter_name``'s copies; a module left without copies gets its original back."""
    for name, module in list(model.named_modules()):
        if isinstance(module, ModuleCopies) and adapter_name in module.copies:
            del module.copies[adapter_name]
            if not len(module.copies):
                if module.model_trained:
                    undeclare(module.base_layer, MODULE, STATE)
                    declare_trainable(module.base_layer)
                replace_module(model, name, module.base_layer)


def saved_modules(model: nn.Module, adapter_name: str) -> dict[str, nn.Module]:
    """The modules ``adapter_name`` trains in full: its copies, and heads the model itself trains.

    Returns:
        Name relative to the Hugging Face model inside ``model`` -> the module whose
        parameters are the adapter's (a copy, or the model's own head), in module order.
    """
    backbone = find_backbone(model)
    owners = {id(o.tensor): (o.adapter, o.role) for o in owned_tensors(backbone)}
    out: dict[str, nn.Module] = {}
    for name, module in backbone.named_modules():
        if any(name.startswith(other + ".") for other in out):
            continue
        if isinstance(module, ModuleCopies) and adapter_name in module.copies:
            out[name] = module.copies[adapter_name].module
    for name in head_module_names(backbone):
        module = backbone.get_submodule(name)
        params = list(module.parameters())
        if name not in out and params and all(owners.get(id(p)) == (MODULE, TRAIN) for p in params):
            out[name] = module
    return out


def saved_module_target(model: nn.Module, name: str, adapter_name: str) -> str:
    """Our name (relative to ``model``) of a saved module's tensor named as in PEFT (``classifier.weight``)."""
    prefix = backbone_prefix(model)
    backbone = find_backbone(model)
    module_name, _, tensor = name.rpartition(".")
    holder = backbone.get_submodule(module_name) if module_name else backbone
    if isinstance(holder, ModuleCopies) and adapter_name in holder.copies:
        return f"{prefix}{module_name}.copies.{adapter_name}.module.{tensor}"
    return prefix + name
