"""Several adapters on one frozen base: list, switch, freeze, disable, delete, route per row, combine.

Every method takes ``adapter_name`` (``"default"``); applying a second name adds a second
adapter to the same model. These functions act on the model's adapter record
(:class:`~lightning_peft.methods.base.AdapterRecord`) and, through the contract, on the
modules each method inserted:

* :func:`set_adapter` chooses the adapters ``forward`` uses; by default they are also the
  ones an optimizer updates. :func:`set_trainable` chooses those separately (active and
  trainable are two settings, never one inferred from the other by accident).
* :func:`disable_adapters` (a context) gives the base model's exact function.
* :func:`delete_adapter` leaves the model as if the adapter had never been added.
* :func:`adapter_per_row` (a context) routes row *i* of the next forwards to adapter *i*
  (``None``: the base), for serving many tasks in one batch.
* :func:`add_weighted_adapter` combines adapters of one method into a new one (LoRA:
  ``cat``, ``linear``, ``svd``, ``ties``, ``dare_linear``).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .core.ownership import adapter_parts
from .methods.base import AdapterRecord, Method, MethodError, find_record, sync_adapters, sync_requires_grad

__all__ = [
    "adapter_names",
    "adapter_per_row",
    "add_weighted_adapter",
    "delete_adapter",
    "disable_adapters",
    "set_adapter",
    "set_trainable",
]


def _record(model: nn.Module, action: str) -> AdapterRecord:
    record = find_record(model)
    if record is None or not record.configs:
        raise ValueError(
            f"{action}: no adapter is on this {type(model).__name__}; add one first, e.g. "
            "LoRA(adapter_name='sentiment').apply(model)"
        )
    return record


def _names(value: str | Sequence[str], record: AdapterRecord, action: str) -> list[str]:
    names = [value] if isinstance(value, str) else list(value)
    known = record.names()
    unknown = [n for n in names if n not in known]
    if unknown or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{action}: no adapter named {unknown or names!r}; adapters on this model: {known}")
    if len(set(names)) != len(names):
        raise ValueError(f"{action}: adapter names repeat in {names}")
    return names


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters on ``model``, in the order they were added."""
    record = find_record(model)
    return record.names() if record is not None else []


def set_adapter(model: nn.Module, names: str | Sequence[str]) -> nn.Module:
    """Use exactly ``names`` in ``forward`` (several run together, in the order they were added).

    Unless :func:`set_trainable` was called, the active adapters are also the trainable ones
    (everything else frozen). Adapters that train the base in place (full and partial
    fine-tuning) are always active.

    Raises:
        ValueError: Naming an unknown adapter and listing those that exist.
    """
    record = _record(model, "set_adapter")
    chosen = _names(names, record, "set_adapter")
    in_place = [n for n in record.names() if any(c.in_place for c in record.of(n))]
    record.active = [n for n in record.names() if n in chosen or n in in_place]
    record.chosen_active = True
    if not record.decoupled:
        record.trainable = list(chosen)
    sync_adapters(model)
    return model


def set_trainable(model: nn.Module, names: str | Sequence[str]) -> nn.Module:
    """Make exactly ``names`` trainable (an empty list freezes every adapter), whatever is active.

    From then on :func:`set_adapter` no longer changes what trains.

    Raises:
        ValueError: Naming an unknown adapter and listing those that exist.
    """
    record = _record(model, "set_trainable")
    record.trainable = _names(names, record, "set_trainable") if names else []
    record.decoupled = True
    sync_requires_grad(model)
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model`` computes exactly what the base model computes.

    Raises:
        MethodError: If an adapter trained the base in place (full or partial fine-tuning)
            or is merged into it: the base function is then no longer in the model.
    """
    record = _record(model, "disable_adapters")
    baked = [c.adapter_name for c in record.configs if c.in_place or c.is_merged(model)]
    if baked:
        raise MethodError(
            f"disable_adapters: adapters {sorted(set(baked))} changed the base weights in place (full or partial "
            "fine-tuning, or merged); the base function is not in the model any more (unmerge merged ones first)"
        )
    parts = adapter_parts(model)
    before = [part.active for _, part in parts]
    for _, part in parts:
        part.active = False
    try:
        yield model
    finally:
        for (_, part), active in zip(parts, before):
            part.active = active


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter ``name``: the model is as if it had never been added (the others stay exact).

    Raises:
        ValueError: For an unknown name. :class:`~lightning_peft.methods.MethodError` if
            a method cannot take its adapter out (it changed the base in place).
    """
    record = _record(model, "delete_adapter")
    _names(name, record, "delete_adapter")
    for config in reversed(record.of(name)):
        config.remove(model)
    record.remove(name)
    if not record.active and record.names():
        record.active = [record.names()[-1]]
        if not record.decoupled:
            record.trainable = list(record.active)
    sync_adapters(model)
    return model


_LAST_MASKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (key, masks)


def _row_masks(
    names: Sequence[str | None], record: AdapterRecord, device: Any, model: nn.Module
) -> dict[str, torch.Tensor]:
    """Each routed name's ``(batch,)`` bool mask; the same tensors as the last call with the same names.

    Keeping the tensors lets layers keep what they derived from a routing (e.g. LoRA's row
    slots) across forwards and across contexts that route the same way.
    """
    known = record.names()
    unknown = sorted({n for n in names if n is not None and n not in known})
    if unknown:
        raise ValueError(f"adapter_per_row: no adapter named {unknown}; adapters on this model: {known}")
    key = (tuple(names), device)
    last = _LAST_MASKS.get(model)
    if last is not None and last[0] == key:
        return last[1]
    masks = {
        name: torch.tensor([n == name for n in names], dtype=torch.bool, device=device)
        for name in dict.fromkeys(n for n in names if n is not None)
    }
    _LAST_MASKS[model] = (key, masks)
    return masks


@contextlib.contextmanager
def adapter_per_row(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Within the block, row *i* of every batch uses adapter ``names[i]`` (``None``: the base model).

    One forward serves many tasks: the rows of each adapter see only that adapter, the
    other adapters and the base rows see none. Works in ``forward``, ``generate`` and
    ``predict`` (batches must have ``len(names)`` rows; beams and sampled sequences of one
    prompt count as one row each, so repeat a name per beam).

    Raises:
        ValueError: For an unknown name.
        MethodError: If a routed method cannot serve different adapters per row (or, for
            prompt tuning, the routed prompts have different lengths), or an adapter is merged.
    """
    record = _record(model, "adapter_per_row")
    first = next(model.parameters(), None)
    masks = _row_masks(names, record, first.device if first is not None else None, model)
    parts = [part for _, part in adapter_parts(model)]  # one walk serves the merged check and the routing
    merged = {p.adapter_name for p in parts if p.merged and p.adapter_name in masks}
    baked = {c.adapter_name for c in record.configs if c.in_place}
    if merged or baked:
        raise MethodError(
            f"adapter_per_row: adapters {sorted(merged | baked)} are folded into the base weights, so no row can "
            "go without them; unmerge them (or route only adapters that are not merged)"
        )
    routed = [c for c in record.configs if c.adapter_name in masks]
    for method_name in dict.fromkeys(c.name for c in routed):
        same = [c for c in routed if c.name == method_name]
        same[0].check_routable(model, same)
    before = [(part.active, part.rows) for part in parts]
    for part in parts:
        part.route(part.adapter_name in masks, masks.get(part.adapter_name))
    try:
        yield model
    finally:
        for part, (active, rows) in zip(parts, before):
            part.route(active, rows)


COMBINATIONS = ("cat", "linear", "svd", "ties", "dare_linear")


def add_weighted_adapter(
    model: nn.Module,
    weights: dict[str, float],
    name: str,
    combination: str = "cat",
    *,
    rank: int | None = None,
    density: float = 0.5,
    seed: int = 0,
) -> nn.Module:
    """Add adapter ``name``, a weighted combination of existing adapters of one method.

    The new adapter is added inactive and frozen (``set_adapter(model, name)`` uses it).
    Combinations (LoRA; other methods raise):

    * ``"cat"``: exact. The ranks add up; the new adapter equals the sources active
      together, each scaled by its weight.
    * ``"linear"``: same rank as the sources (which must share it): the factors are
      combined, ``A = sum sqrt(|w| s) A_i``, ``B = sum sign(w) sqrt(|w| s) B_i`` (exact for one source).
    * ``"svd"``: the weighted update ``sum w_i s_i B_i A_i`` of each layer, truncated to
      ``rank`` by SVD (exact when ``rank`` covers the sum).
    * ``"ties"`` (Yadav et al. 2023, "TIES-Merging"): each weighted update is trimmed to its
      ``density`` largest magnitudes, a sign is elected per weight, the agreeing entries
      averaged; then truncated to ``rank`` by SVD.
    * ``"dare_linear"`` (Yu et al. 2023, "Language Models are Super Mario"): each update
      keeps entries with probability ``density`` (rescaled by ``1 / density``), the results
      are summed with the weights; then truncated to ``rank`` by SVD.

    Args:
        model: The model carrying the adapters.
        weights: Source adapter name -> weight.
        name: The new adapter's name (unused so far).
        combination: One of :data:`COMBINATIONS`.
        rank: Rank of the result for ``svd``, ``ties`` and ``dare_linear`` (default: the
            largest source rank).
        density: Share of entries kept by ``ties`` and ``dare_linear``, in ``(0, 1]``.
        seed: Seed of ``dare_linear``'s random drop.

    Raises:
        ValueError: For unknown or mixed-method sources, a taken name, bad arguments.
    """
    record = _record(model, "add_weighted_adapter")
    if not isinstance(weights, dict) or not weights:
        raise ValueError(f"add_weighted_adapter: weights must map adapter names to numbers, got {weights!r}")
    sources = _names(list(weights), record, "add_weighted_adapter")
    if name in record.names():
        raise ValueError(
            f"add_weighted_adapter: an adapter named {name!r} exists already; choose another name"
        )
    if combination not in COMBINATIONS:
        raise ValueError(
            f"add_weighted_adapter: combination must be one of {list(COMBINATIONS)}, got {combination!r}"
        )
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(f"add_weighted_adapter: density must be in (0, 1], got {density!r}")
    configs: list[Method] = []
    for source in sources:
        parts = record.of(source)
        if len(parts) != 1:
            raise ValueError(f"add_weighted_adapter: adapter {source!r} combines {[c.name for c in parts]}")
        configs.append(parts[0])
    if len({c.name for c in configs}) != 1:
        raise ValueError(
            f"add_weighted_adapter: sources mix methods {[c.name for c in configs]}; combine one method"
        )
    active, trainable, chosen, decoupled = (
        list(record.active),
        list(record.trainable),
        record.chosen_active,
        record.decoupled,
    )
    type(configs[0]).combine(
        model,
        configs,
        [float(weights[s]) for s in sources],
        name,
        combination,
        rank=rank,
        density=float(density),
        seed=seed,
    )
    record.active, record.trainable = [n for n in active if n != name], trainable
    record.chosen_active, record.decoupled = chosen, decoupled
    sync_adapters(model)
    return model
