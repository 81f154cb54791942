"""Tensors that may be FSDP2 shards (``DTensor``) or FSDP1 flat shards: read a few values, gather, copy into.

Plain torch; used by fingerprints (a few sampled values of every frozen tensor, without
gathering it), by delta saving and exports (gather the small trained tensors; FSDP1 units
gathered for the duration of a save) and by every restore (copy a full tensor into a
shard: each rank keeps its own piece, no communication).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

__all__ = [
    "WRAPPER_SEGMENTS",
    "copy_into_tensor",
    "full_tensor",
    "gathered_copy",
    "is_sharded_tensor",
    "sample_positions",
    "unsharded_fsdp1",
    "unwrapped_name",
]

WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
"""Name levels that FSDP1 units and activation-checkpoint wrappers insert and ``state_dict()`` drops."""


def unwrapped_name(name: str) -> str:
    """``name`` without the levels FSDP1 units / checkpoint wrappers add (as ``state_dict()`` has it)."""
    for segment in WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


@contextlib.contextmanager
def unsharded_fsdp1(module: nn.Module) -> Iterator[None]:
    """Inside the block, every FSDP1 unit in ``module``'s tree (``module`` included) holds full parameters.

    A collective on entry (call it on every rank); does nothing when ``module`` holds no FSDP1
    unit. Writes are not kept (``writeback=False``). FSDP1 frees the gathered storage on exit,
    so copy what you read (:func:`gathered_copy`) before leaving the block.
    """
    if not any(isinstance(m, FullyShardedDataParallel) for m in module.modules()):
        yield
        return
    with FullyShardedDataParallel.summon_full_params(module, writeback=False):
        yield


def is_sharded_tensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (FSDP2 parameters are)."""
    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of ``tensor`` on this rank, detached (gathers a ``DTensor``: a collective)."""
    if isinstance(tensor, DTensor):
        return tensor.full_tensor().detach()
    return tensor.detach()


def gathered_copy(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of ``tensor`` as a detached CPU tensor of its own (gathers a ``DTensor``: a collective).

    Never shares storage with the live tensor, so it stays valid after the model changes or
    an FSDP1 unit frees its gathered parameters.
    """
    whole = full_tensor(tensor)
    return whole.clone() if whole.device.type == "cpu" else whole.cpu()


def sample_positions(tensor: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """Values of a (possibly sharded) tensor at flat ``positions`` of its global shape, fp32 on CPU.

    For a ``DTensor`` sharded along one dimension of a 1-D mesh (what FSDP2 makes), each rank
    reads the positions that fall in its own shard and the few values are summed across
    ranks: nothing but the sample is communicated. Other layouts are gathered first. Every
    rank must call it for sharded tensors (it is a collective then).

    Args:
        tensor: A plain tensor or a ``DTensor``.
        positions: Flat indices into the global (logical) tensor.

    Returns:
        A ``(len(positions),)`` float32 CPU tensor, the same on every rank.
    """
    index = torch.tensor(positions, dtype=torch.long)
    if not isinstance(tensor, DTensor):
        flat = tensor.detach().reshape(-1)
        return flat[index.to(flat.device)].to(device="cpu", dtype=torch.float32)
    mesh, placements = tensor.device_mesh, tensor.placements
    local = tensor.to_local().detach()
    if all(isinstance(p, Replicate) for p in placements):
        return local.reshape(-1)[index.to(local.device)].to(device="cpu", dtype=torch.float32)
    if mesh.ndim != 1 or not isinstance(placements[0], Shard):
        return tensor.full_tensor().detach().reshape(-1)[index.to(local.device)].to("cpu", torch.float32)
    dim = placements[0].dim % tensor.ndim
    shape = tuple(tensor.shape)
    chunk = -(-shape[dim] // mesh.size())  # torch.chunk semantics: ceil(size / ranks) rows per rank
    start = mesh.get_local_rank() * chunk
    coords = list(torch.unravel_index(index, shape))  # tensor.ndim tensors of (k,)
    mine = (coords[dim] >= start) & (coords[dim] < start + local.shape[dim])  # (k,)
    values = torch.zeros(len(positions), dtype=torch.float32, device=local.device)
    if bool(mine.any()):
        coords[dim] = coords[dim] - start
        picked = tuple(c[mine].to(local.device) for c in coords)
        values[mine.to(local.device)] = local[picked].to(torch.float32)
    dist.all_reduce(values, group=mesh.get_group())  # each position is owned by exactly one rank
    return values.cpu()


@torch.no_grad()
def copy_into_tensor(target: torch.Tensor, value: torch.Tensor) -> None:
    """Copy ``value`` (full, or sharded like ``target``) into ``target`` in place, casting to its dtype.

    A full ``value`` copied into a ``DTensor`` shard must be the same on every rank; each
    rank keeps its own piece (no communication).
    """
    if isinstance(target, DTensor):
        if not isinstance(value, DTensor):
            value = distribute_tensor(
                value.to(target.device, target.dtype),
                target.device_mesh,
                target.placements,
                src_data_rank=None,
            )
        target.to_local().copy_(value.to_local())
        return
    if isinstance(value, DTensor):
        value = value.full_tensor()
    target.copy_(value.to(device=target.device, dtype=target.dtype))
