"""The one way trained deltas go back into a model: checkpoints, delta folders, PEFT folders, FSDP2 shards.

:func:`restore` runs the same checks in the same order for every source, and raises the
same exceptions (:mod:`lightning_peft.persistence.errors`):

1. rebuild the recorded adapters' method configs (registered names only, nothing imported),
   optionally under new names;
2. compare them with the adapters the model already carries: one of the same name must
   have the same config (it is reused), others are applied after the checks;
3. check the frozen base against the recorded fingerprint (when there is one);
4. apply the missing adapters and, on a model that carried none (or when restoring a whole
   run from a checkpoint), restore which ones were active and trainable;
5. check names, shapes and kinds of dtype of the incoming tensors against the model's own;
6. only then copy, each rank keeping its own piece of an FSDP2 shard.

A failure in steps 1-3 leaves the model untouched.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ..core.sharded import copy_into_tensor
from ..core.targeting import backbone_prefix
from ..methods.base import Method, find_record, sync_adapters
from .errors import DeltaError
from .fingerprint import check_fingerprint, fingerprint
from .records import configs_from_record
from .state import delta_owners, delta_state_dict

__all__ = ["check_tensors", "rebase_names", "restore"]


def rebase_names(names: list[str], old_prefix: str, new_prefix: str) -> dict[str, str]:
    """Map names saved under one backbone prefix (``"backbone."``) to another (``""``)."""
    if old_prefix == new_prefix or not all(n.startswith(old_prefix) for n in names):
        return {n: n for n in names}
    return {n: new_prefix + n[len(old_prefix) :] for n in names}


def check_tensors(
    incoming: dict[str, torch.Tensor], live: dict[str, torch.Tensor], where: str, *, exact: bool = True
) -> None:
    """Check ``incoming`` against the model's ``live`` tensors: names, shapes, kinds of dtype.

    Args:
        incoming: Tensors to load.
        live: The model's tensors they go into.
        where: What is being loaded, for messages.
        exact: The key sets must be equal (otherwise ``incoming`` may cover a subset; the
            rest keep their values, with a warning).

    Raises:
        DeltaError: Naming the missing, unexpected or mis-shaped tensors.
    """
    missing = [n for n in live if n not in incoming]
    unexpected = [n for n in incoming if n not in live]
    if unexpected or (exact and missing):
        raise DeltaError(
            f"{where} does not hold exactly this model's trained tensors: missing {missing[:6]}"
            f"{'...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}"
            f"{'...' if len(unexpected) > 6 else ''} (was it saved with other methods or another model?)"
        )
    if missing:
        warnings.warn(
            f"{where} holds no values for trained tensors {missing[:6]}{'...' if len(missing) > 6 else ''}; "
            "they keep their current values",
            stacklevel=3,
        )
    for name, value in incoming.items():
        target = live[name]
        if tuple(value.shape) != tuple(target.shape):
            raise DeltaError(
                f"{where}: {name} has shape {tuple(value.shape)}, the model's is {tuple(target.shape)}"
            )
        same_kind = value.dtype.is_floating_point == target.dtype.is_floating_point
        if value.dtype != target.dtype and not (same_kind and target.dtype.is_floating_point):
            raise DeltaError(f"{where}: {name} is {value.dtype}, the model's is {target.dtype}")


def _plan(obj: nn.Module, configs: list[Method], where: str, only_recorded: bool) -> list[Method]:
    """The recorded method configs ``obj`` lacks (to apply); raise if one it has differs or it has others."""
    record = find_record(obj)
    live = list(record.configs) if record is not None else []
    missing = []
    for config in configs:
        existing = record.find(config) if record is not None else None
        if existing is None:
            missing.append(config)
        elif existing.to_dict() != config.to_dict():
            raise DeltaError(
                f"{where} holds adapter {config.adapter_name!r} as {config.to_dict()}, but the model already "
                f"carries it as {existing.to_dict()}; load it under another name (adapter_name=...) or into a "
                "fresh base model"
            )
    wanted = {(c.adapter_name, c.name) for c in configs}
    extra = [c.to_dict() for c in live if (c.adapter_name, c.name) not in wanted]
    if only_recorded and extra:
        raise DeltaError(
            f"{where} was saved with {[c.to_dict() for c in configs]}, but the model also carries {extra}; load "
            "it into a fresh base model (the recorded adapters are applied for you) or one with exactly these"
        )
    return missing


def _renamed(
    obj: nn.Module, record: dict[str, Any], names: list[str], old: str, new: str, where: str
) -> dict[str, str]:
    """Saved names of adapter ``old``'s tensors -> the live names of adapter ``new``'s, in module order."""
    specs = record.get("tensors", {})
    saved = [n for n in names if specs.get(n, {}).get("adapter") == old]
    live = [n for n, owner in delta_owners(obj, [new]).items() if owner == new]
    if len(saved) != len(live):
        raise DeltaError(
            f"{where}: adapter {old!r} holds {len(saved)} tensors, but loaded as {new!r} it has {len(live)} "
            "(was it saved from another model?)"
        )
    return dict(zip(saved, live))


def restore(
    obj: nn.Module,
    record: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    *,
    where: str,
    strict_fingerprint: bool = True,
    rename: dict[str, str] | None = None,
    only_recorded: bool = False,
    exact: bool = True,
    mapper: Any = None,
) -> dict[str, torch.Tensor]:
    """Load recorded adapters and their tensors into ``obj`` (see the module docstring for the steps).

    Args:
        obj: The model: a fresh base, or one carrying some of the recorded adapters.
        record: A validated record (:mod:`lightning_peft.persistence.records`); its
            ``fingerprint`` may be ``None`` (PEFT folders carry none) to skip that check.
        tensors: The saved tensors, named as when saved (under ``record["backbone_prefix"]``).
        where: What is being loaded, for messages.
        strict_fingerprint: ``False`` (or ``LIGHTNING_PEFT_IGNORE_FINGERPRINT=1``) turns a
            base mismatch into a warning.
        rename: Recorded adapter name -> the name to load it under.
        only_recorded: Refuse a model carrying adapters the record lacks (a checkpoint
            restores a whole run).
        exact: The tensors must cover every trained tensor of the restored adapters (else
            a subset is accepted, with a warning).
        mapper: ``mapper(obj, configs, tensors) -> tensors`` renaming tensors to ``obj``'s
            names after the adapters are applied (PEFT's names); default: rebase the
            recorded backbone prefix onto ``obj``'s.

    Returns:
        The model's own tensors that were filled, by name.

    Raises:
        DeltaError: Adapters, names, shapes or dtypes do not fit; its subclass
            :class:`~lightning_peft.persistence.errors.FingerprintMismatchError` for another base.
    """
    configs = configs_from_record(record, where, rename)
    had_adapters = bool(find_record(obj) is not None and find_record(obj).configs)
    missing = _plan(obj, configs, where, only_recorded)
    if record.get("fingerprint") is not None:
        check_fingerprint(
            record["fingerprint"],
            fingerprint(obj),
            strict=strict_fingerprint,
            subsequence=bool(missing),
            what=where,
        )
    for config in missing:
        config.apply(obj)
    names = list(dict.fromkeys(c.adapter_name for c in configs))
    live_record = find_record(obj)
    if (only_recorded or not had_adapters) and live_record is not None and configs:
        renamed = rename or {}
        live_record.active = [renamed.get(n, n) for n in record.get("active", names)]
        live_record.trainable = [renamed.get(n, n) for n in record.get("trainable", names)]
        sync_adapters(obj)
    if mapper is not None:
        incoming = mapper(obj, configs, tensors)
    else:
        mapping = rebase_names(list(tensors), record.get("backbone_prefix", ""), backbone_prefix(obj))
        for old, new in (rename or {}).items():
            mapping.update(_renamed(obj, record, list(tensors), old, new, where))
        incoming = {mapping[k]: v for k, v in tensors.items()}
    live = delta_state_dict(obj, names, keep_vars=True)
    check_tensors(incoming, live, where, exact=exact)
    with torch.no_grad():
        for name, value in incoming.items():
            copy_into_tensor(live[name], value)
    return {name: live[name] for name in incoming}
