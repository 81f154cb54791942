"""Combining LoRA adapters into a new one: ``cat``, ``linear``, ``svd``, ``ties``, ``dare_linear``.

What ``lightning_peft.add_weighted_adapter`` runs for LoRA (see its docstring for the
semantics). Every combination works on each adapted layer's factors in float64 and writes
a new adapter of scale 1 (``alpha = r``), so ``B A`` is the combined update itself:

* ``cat``: ``A = [A_1; A_2; ...]``, ``B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]``, exactly
  ``sum w_i s_i B_i A_i``;
* ``linear``: ``A = sum sqrt(|w_i| s_i) A_i``, ``B = sum sign(w_i) sqrt(|w_i| s_i) B_i``;
* ``svd``, ``ties``, ``dare_linear``: a combined full update per layer, then its best
  rank-``r`` approximation (truncated SVD). TIES-Merging (Yadav et al. 2023) trims each
  weighted update to its largest ``density`` share of entries, elects a sign per entry and
  averages the entries that agree with it; DARE (Yu et al. 2023) keeps each entry with
  probability ``density`` and rescales it by ``1 / density`` before the weighted sum.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..core.targeting import backbone_prefix
from .base import Method, MethodError

__all__ = ["combine_lora"]


def _factors(layer: nn.Module, source: Method) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    weights = layer.lora[source.adapter_name] if source.adapter_name in layer.lora else None
    if weights is None:
        return None
    return weights.lora_a.detach().double(), weights.lora_b.detach().double(), weights.scale


def _truncate(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``B @ A`` the best rank-``rank`` approximation of ``delta`` (out, in)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    root = s[:rank].sqrt()
    b = u[:, :rank] * root  # (out, rank)
    a = root.unsqueeze(1) * vh[:rank]  # (rank, in)
    if a.shape[0] < rank:  # a layer smaller than the rank: pad with zeros
        a = torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], dim=1)
    return a, b


def _ties(deltas: list[torch.Tensor], density: float) -> torch.Tensor:
    trimmed = []
    for delta in deltas:
        keep = max(1, int(round(density * delta.numel())))
        threshold = delta.abs().flatten().kthvalue(delta.numel() - keep + 1).values
        trimmed.append(torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta)))
    stacked = torch.stack(trimmed)  # (tasks, out, in)
    sign = torch.sign(stacked.sum(0))  # elected sign per entry
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    count = agree.sum(0).clamp(min=1)
    return (stacked * agree).sum(0) / count


def combine_lora(
    model: nn.Module,
    layers: dict[str, nn.Module],
    sources: list[Method],
    weights: list[float],
    name: str,
    combination: str,
    *,
    rank: int | None,
    density: float,
    seed: int,
) -> None:
    """Add LoRA adapter ``name`` combining ``sources`` with ``weights`` (see the module docstring).

    Args:
        model: The model.
        layers: Its LoRA layers (name relative to ``model`` -> layer) holding any source.
        sources: The source adapters' configs.
        weights: One weight per source.
        name: The new adapter's name.
        combination: ``cat``, ``linear``, ``svd``, ``ties`` or ``dare_linear``.
        rank: Rank of the truncated combinations (default: the largest source rank).
        density: Share of entries ``ties`` and ``dare_linear`` keep.
        seed: Seed of ``dare_linear``'s drop.

    Raises:
        MethodError: For DoRA sources, ``linear`` over different ranks, or a bad ``rank``.
    """
    from_layers = layers
    if any(getattr(s, "use_dora", False) for s in sources):
        raise MethodError("add_weighted_adapter cannot combine DoRA adapters (their magnitudes do not add)")
    ranks = [s.r for s in sources]
    if combination == "cat":
        new_rank = sum(ranks)
    elif combination == "linear":
        if len(set(ranks)) != 1:
            raise MethodError(
                f"combination 'linear' needs sources of one rank; they have {ranks}: use 'cat' or 'svd'"
            )
        new_rank = ranks[0]
    else:
        new_rank = max(ranks) if rank is None else rank
    if isinstance(new_rank, bool) or not isinstance(new_rank, int) or new_rank < 1:
        raise MethodError(f"add_weighted_adapter: rank must be a positive integer, got {rank!r}")
    prefix = backbone_prefix(model)
    config = type(sources[0])(
        r=new_rank,
        alpha=float(new_rank),  # scale 1: B @ A is the combined update
        target_modules=sorted(n.removeprefix(prefix) for n in from_layers),
        adapter_name=name,
    )
    config.apply(model)
    generator = torch.Generator().manual_seed(seed)
    for layer in from_layers.values():
        found = [_factors(layer, s) for s in sources]
        a0 = next(f for f in found if f is not None)[0]
        out_f = next(f for f in found if f is not None)[1].shape[0]
        if combination == "cat":
            a = torch.cat([f[0] if f else a0.new_zeros(r, a0.shape[1]) for f, r in zip(found, ranks)])
            b = torch.cat(
                [w * f[2] * f[1] if f else a0.new_zeros(out_f, r) for f, w, r in zip(found, weights, ranks)],
                dim=1,
            )
        elif combination == "linear":
            a = sum(math.sqrt(abs(w) * f[2]) * f[0] for f, w in zip(found, weights) if f)
            b = sum(math.copysign(math.sqrt(abs(w) * f[2]), w) * f[1] for f, w in zip(found, weights) if f)
        else:
            deltas = [w * f[2] * (f[1] @ f[0]) for f, w in zip(found, weights) if f]  # (out, in) each
            if combination == "svd":
                total = sum(deltas)
            elif combination == "ties":
                total = _ties(deltas, density)
            else:  # dare_linear
                total = sum(
                    torch.where(
                        torch.rand(d.shape, generator=generator, dtype=d.dtype) < density, d / density, 0.0
                    )
                    for d in deltas
                )
            a, b = _truncate(total, new_rank)
        target = layer.lora[name]
        with torch.no_grad():
            target.lora_a.copy_(a.to(target.lora_a.dtype))
            target.lora_b.copy_(b.to(target.lora_b.dtype))
