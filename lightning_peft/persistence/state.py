"""The trained part of a model as a state dict: what every checkpoint, delta folder and export holds."""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator

import torch
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel

from ..core.ownership import owned_tensors
from ..core.sharded import gathered_copy, unsharded_fsdp1, unwrapped_name

__all__ = [
    "delta_owners",
    "delta_state_dict",
    "delta_state_names",
    "full_parameters",
    "gathered_delta_state_dict",
    "unwrapped_name",
]


def fsdp1_scope(obj: nn.Module) -> nn.Module:
    """The module whose FSDP1 units hold all of ``obj``'s parameters.

    ``obj`` itself, unless it is a LightningModule that Lightning's ``FSDPStrategy`` wrapped:
    then the root ``FullyShardedDataParallel`` around it (``trainer.strategy.model``), which
    holds the parameters no transformer-block unit took (embeddings, task head).
    """
    trainer = getattr(obj, "_trainer", None)
    wrapper = getattr(getattr(trainer, "strategy", None), "model", None)
    if isinstance(wrapper, FullyShardedDataParallel) and any(m is obj for m in wrapper.modules()):
        return wrapper
    return obj


@contextlib.contextmanager
def full_parameters(obj: nn.Module) -> Iterator[None]:
    """Inside the block, ``obj``'s FSDP1-sharded parameters are whole on every rank (a collective).

    For saving after an FSDP1 run; nothing happens for other models (FSDP2 ``DTensor`` shards
    are gathered tensor by tensor instead). Copy what you read before leaving the block.
    """
    with unsharded_fsdp1(fsdp1_scope(obj)):
        yield


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
    """:func:`delta_state_dict` with every FSDP2 shard gathered: CPU copies that share no storage with the model.

    A collective when the model is sharded: call it on every rank, in the same order. Under
    FSDP1 call it inside :func:`full_parameters`.
    """
    return {name: gathered_copy(t) for name, t in delta_state_dict(obj, adapters).items()}
