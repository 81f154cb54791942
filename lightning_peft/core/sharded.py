"""Tensors that may be FSDP2 shards (``DTensor``): read a few values, gather, copy into.

Plain torch; used by fingerprints (a few sampled values of every frozen tensor, without
gathering it), by delta saving (gather the small trained tensors) and by every restore
(copy a full tensor into a shard: each rank keeps its own piece, no communication).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

__all__ = ["copy_into_tensor", "full_tensor", "is_sharded_tensor", "sample_positions"]


def is_sharded_tensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (FSDP2 parameters are)."""
    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of ``tensor`` on this rank, detached (gathers a ``DTensor``: a collective)."""
    if isinstance(tensor, DTensor):
        return tensor.full_tensor().detach()
    return tensor.detach()


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
