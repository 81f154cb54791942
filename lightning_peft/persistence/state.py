"""The trained part of a model as a state dict: what every checkpoint, delta folder and export holds."""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn

from ..core.ownership import owned_tensors
from ..core.sharded import full_tensor

__all__ = [
    "delta_owners",
    "delta_state_dict",
    "delta_state_names",
    "gathered_delta_state_dict",
    "unwrapped_name",
]

# Wrapper modules that insert a level into parameter names but drop it again in
# ``state_dict()``: FSDP1 units and activation-checkpoint wrappers.
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def unwrapped_name(name: str) -> str:
    """``name`` without the levels FSDP1 / checkpoint wrappers add (as ``state_dict()`` has it)."""
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def delta_state_dict(
    obj: nn.Module, adapters: Collection[str] | None = None, *, keep_vars: bool = False
) -> dict[str, torch.Tensor]:
    """The tensors adapters (and the model itself) own: what a delta checkpoint holds.

    Every declared tensor (:func:`lightning_peft.core.ownership.owned_tensors`): trainable
    parameters of every adapter, whether it trains now or not; an adapter's own frozen state;
    the persistent buffers of modules declared as a whole (a norm's running statistics
    under full fine-tuning); the model's own trainable tensors (a task head). Names are
    relative to ``obj`` as in ``obj.state_dict()``: the levels FSDP1 units and
    activation-checkpoint wrappers insert are left out.

    Args:
        obj: A model methods were applied to (or any module with declarations).
        adapters: Only these adapters' tensors (and the model's own); ``None`` for all.
        keep_vars: Return the tensors themselves instead of detached ones.
    """
    return {
        unwrapped_name(o.name): (o.tensor if keep_vars else o.tensor.detach())
        for o in owned_tensors(obj, adapters)
    }


def delta_owners(obj: nn.Module, adapters: Collection[str] | None = None) -> dict[str, str]:
    """The owning adapter of every tensor of :func:`delta_state_dict` (``""`` for the model's own)."""
    return {unwrapped_name(o.name): o.adapter for o in owned_tensors(obj, adapters)}


def delta_state_names(obj: nn.Module, adapters: Collection[str] | None = None) -> list[str]:
    """Names of :func:`delta_state_dict`, in its order."""
    return list(delta_state_dict(obj, adapters, keep_vars=True))


def gathered_delta_state_dict(
    obj: nn.Module, adapters: Collection[str] | None = None
) -> dict[str, torch.Tensor]:
    """:func:`delta_state_dict` with every FSDP2 shard gathered, on the CPU.

    A collective when the model is sharded: call it on every rank, in the same order.
    """
    return {name: full_tensor(t).cpu() for name, t in delta_state_dict(obj, adapters).items()}
