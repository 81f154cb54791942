"""What is recorded beside trained deltas: one builder and one validator for checkpoints and folders.

A record says which adapters the tensors belong to (their method configs, in order, and
which ones were active and trainable), which base they go back onto (a fingerprint), how
the tensors were named (the backbone prefix) and shaped, and which versions wrote them.
Delta-only Lightning checkpoints keep it under ``checkpoint["lightning_peft"]``; delta
folders keep it in ``manifest.json`` (plus file checksums).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch
import transformers
from torch import nn

from ..core.ownership import MODULE
from ..core.targeting import backbone_prefix
from ..methods.base import Method, find_record, method_from_dict
from ..version import __version__
from .errors import CorruptDeltaError, DeltaError
from .fingerprint import FINGERPRINT_ALGORITHM, dtype_name, fingerprint, validate_fingerprint
from .state import delta_owners

RECORD_VERSION = 2
"""Version of the record layout (1: a single unnamed method list, read no more)."""

__all__ = [
    "RECORD_VERSION",
    "build_record",
    "configs_from_record",
    "select_adapter",
    "validate_record",
    "versions",
]


def versions() -> dict[str, str]:
    """Versions of lightning-peft, torch and transformers (recorded with every delta)."""
    # Plain ``str`` (torch's version is a subclass) so ``torch.load(weights_only=True)`` reads it.
    return {
        "lightning_peft": str(__version__),
        "torch": str(torch.__version__),
        "transformers": str(transformers.__version__),
    }


def build_record(
    obj: nn.Module, tensors: dict[str, torch.Tensor], adapters: Collection[str] | None = None
) -> dict[str, Any]:
    """The record of ``tensors``, the delta of ``obj``'s adapters (all of them, or those named).

    Computes the base fingerprint, which reads a few values of every frozen tensor: under
    FSDP2 it is a collective (call it on every rank).
    """
    record = find_record(obj)
    configs = list(record.configs) if record is not None else []
    if adapters is not None:
        configs = [c for c in configs if c.adapter_name in adapters]
    names = list(dict.fromkeys(c.adapter_name for c in configs))
    owners = delta_owners(obj, names)
    return {
        "format_version": RECORD_VERSION,
        "adapters": [c.to_dict() for c in configs],
        "active": [n for n in (record.active if record is not None else []) if n in names],
        "trainable": [n for n in (record.trainable if record is not None else []) if n in names],
        "backbone_prefix": backbone_prefix(obj),
        "fingerprint": fingerprint(obj),
        "tensors": {
            name: {"shape": list(t.shape), "dtype": dtype_name(t.dtype), "adapter": owners.get(name, MODULE)}
            for name, t in tensors.items()
        },
        "versions": versions(),
    }


def validate_record(record: Any, where: str) -> None:
    """Check a record's structure before anything is read from it.

    Raises:
        DeltaError: For a record written in another layout version.
        CorruptDeltaError: For a malformed one.
    """
    if not isinstance(record, dict):
        raise CorruptDeltaError(f"{where}: the delta record is not a mapping")
    version = record.get("format_version")
    if version != RECORD_VERSION:
        writer = (record.get("versions") or {}).get("lightning_peft", "?")
        raise DeltaError(
            f"{where}: delta record format_version {version!r} is not supported (this reader: {RECORD_VERSION}); "
            f"it was written by lightning-peft {writer}. Re-train, or load it with that version and re-export."
        )

    def need(condition: bool, problem: str) -> None:
        if not condition:
            raise CorruptDeltaError(f"{where}: {problem}")

    adapters = record.get("adapters")
    need(
        isinstance(adapters, list)
        and all(isinstance(a, dict) and isinstance(a.get("method"), str) for a in adapters),
        "'adapters' must be a list of {'method': name, ...} records",
    )
    pairs = [(a.get("adapter_name", "default"), a["method"]) for a in adapters]
    need(len(set(pairs)) == len(pairs), f"a method repeats within one adapter: {pairs}")
    names = [name for name, _ in pairs]
    for key in ("active", "trainable"):
        value = record.get(key)
        need(isinstance(value, list) and set(value) <= set(names), f"'{key}' must list recorded adapters")
    need(isinstance(record.get("backbone_prefix"), str), "'backbone_prefix' must be a string")
    tensors = record.get("tensors")
    need(isinstance(tensors, dict), "'tensors' must be an object")
    validate_fingerprint(record.get("fingerprint"), where)
    if record["fingerprint"].get("algorithm") != FINGERPRINT_ALGORITHM:
        raise DeltaError(
            f"{where}: fingerprint algorithm {record['fingerprint'].get('algorithm')!r} is unknown"
        )


def configs_from_record(
    record: dict[str, Any], where: str, rename: dict[str, str] | None = None
) -> list[Method]:
    """Rebuild the recorded adapters' method configs: registered names only, nothing imported.

    Args:
        record: A validated record.
        where: What is being read, for messages.
        rename: Recorded adapter name -> the name to load it under.

    Raises:
        DeltaError: If a record names an unknown method or option.
    """
    configs = []
    for data in record["adapters"]:
        data = dict(data)
        if rename and data.get("adapter_name", "default") in rename:
            data["adapter_name"] = rename[data.get("adapter_name", "default")]
        try:
            configs.append(method_from_dict(data))
        except (TypeError, ValueError) as err:
            raise DeltaError(f"{where}: cannot rebuild the recorded adapters: {err}") from err
    return configs


def select_adapter(
    record: dict[str, Any], tensors: dict[str, torch.Tensor], name: str, where: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The part of a record (and its tensors) that belongs to adapter ``name`` (and to the model itself).

    Raises:
        DeltaError: If the record holds no adapter of that name.
    """
    recorded = [a.get("adapter_name", "default") for a in record["adapters"]]
    if name not in recorded:
        raise DeltaError(f"{where} holds adapters {recorded}, not {name!r}")
    keep = {n for n, spec in record["tensors"].items() if spec.get("adapter", MODULE) in (name, MODULE)}
    part = {
        **record,
        "adapters": [a for a in record["adapters"] if a.get("adapter_name", "default") == name],
        "active": [n for n in record["active"] if n == name],
        "trainable": [n for n in record["trainable"] if n == name],
        "tensors": {n: spec for n, spec in record["tensors"].items() if n in keep},
    }
    return part, {n: t for n, t in tensors.items() if n in keep}
