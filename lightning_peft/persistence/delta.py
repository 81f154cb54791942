"""Delta folders: the trained tensors as ``safetensors`` plus a JSON manifest, written atomically.

A folder holds ``manifest.json`` and one ``delta-<generation>.safetensors``. The manifest is
the delta record (:mod:`lightning_peft.persistence.records`: adapters, base fingerprint,
names, versions) plus the data file's size and sha256 and every tensor's sha256. It is
replaced atomically and names the data file, so a reader always finds one complete
generation, even if the writer was killed mid-save. Loading validates the folder before
the model changes and goes through the one restore path
(:func:`lightning_peft.persistence.restore.restore`); nothing named in a folder is
unpickled or imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..methods.base import MethodError, applied_methods
from ..progress import progress
from .errors import CorruptDeltaError, DeltaError
from .files import deserialize, replace_atomically, serialize, tensor_sha256, write_file, write_once
from .fingerprint import dtype_name
from .records import build_record, select_adapter, validate_record
from .restore import restore
from .state import full_parameters, gathered_delta_state_dict

FORMAT = "lightning-peft-delta"
"""The ``format`` field of a delta folder's manifest."""
MANIFEST = "manifest.json"
_DATA_FILE = re.compile(r"delta-[0-9a-f]{8,64}\.safetensors")
_STALE_MANIFEST = re.compile(r"\.manifest-[0-9a-f]{8,64}\.json")
_SHA = re.compile(r"[0-9a-f]{64}")
_DTYPES = {
    dtype_name(d)
    for d in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}

__all__ = ["FORMAT", "MANIFEST", "load_delta", "read_delta", "save_delta", "validate_manifest"]


def _adapters_to_save(obj: nn.Module, adapter_name: str | None, action: str) -> list[str]:
    """The adapters ``action`` writes: all of them, or the one named (checked to exist)."""
    names = list(dict.fromkeys(m.adapter_name for m in applied_methods(obj)))
    if adapter_name is None:
        return names
    if adapter_name not in names:
        raise ValueError(
            f"{action}: the model has no adapter named {adapter_name!r}; adapters: {names or 'none'}"
        )
    return [adapter_name]


def _refuse_merged(obj: nn.Module, names: list[str], action: str) -> None:
    merged = [m.adapter_name for m in applied_methods(obj) if m.adapter_name in names and m.is_merged(obj)]
    if merged:
        raise ValueError(
            f"{action}: adapters {merged} are merged into the base weights; call lightning_peft.unmerge(model) "
            "first so the base (and its fingerprint) is the original one"
        )


def save_delta(obj: nn.Module, directory: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Save the trained part of ``obj`` (every adapter, or one) into a delta folder.

    The folder receives ``delta-<generation>.safetensors`` and then ``manifest.json``,
    written to a temporary name, fsynced and renamed over the previous manifest; the
    previous generation's data file is deleted only after that rename, so a process killed
    at any moment leaves either the previous complete delta or the new one. One writer per
    folder at a time.

    Safe on every rank of a distributed run (DDP, FSDP2, FSDP): every rank gathers, rank 0
    writes, the others wait; the folder loads in one process. After an FSDP run pass the
    LightningModule or the ``FullyShardedDataParallel``-wrapped model.

    Args:
        obj: The model (LightningModule or plain ``nn.Module``) the methods were applied to.
        directory: The folder (created if needed). It may hold only delta files.
        adapter_name: Save only this adapter (with the model's own trained tensors, such
            as a task head); ``None`` saves every adapter.

    Returns:
        The folder's path.

    Raises:
        ValueError: If ``obj`` has nothing trained, an adapter is merged, the adapter does
            not exist, or the folder holds files that are not part of a delta.
    """
    directory = Path(directory)
    names = _adapters_to_save(obj, adapter_name, "save_delta")
    _refuse_merged(obj, names, "save_delta")
    with full_parameters(obj):  # FSDP1: every unit gathered (a collective); FSDP2 gathers per tensor
        state = gathered_delta_state_dict(obj, names)  # a collective under FSDP2
        if not state:
            raise ValueError(
                f"{type(obj).__name__} has no declared-trainable tensors: apply a method first, "
                "e.g. LoRA().apply(model)"
            )
        record = build_record(obj, state, names)  # the fingerprint is a collective under FSDP2 too
    return write_once(lambda: _write_folder(directory, state, record))


def _write_folder(directory: Path, state: dict[str, torch.Tensor], record: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    foreign = [
        p.name
        for p in directory.iterdir()
        if p.name != MANIFEST and not _DATA_FILE.fullmatch(p.name) and not _STALE_MANIFEST.fullmatch(p.name)
    ]
    if foreign:
        raise ValueError(
            f"{directory} holds files that are not part of a delta ({sorted(foreign)[:5]}); "
            "save deltas into an empty or delta-only folder"
        )
    generation = f"{time.time_ns():x}{secrets.token_hex(4)}"
    data_name = f"delta-{generation}.safetensors"
    data = serialize(state, metadata={"format": "pt", "generation": generation})
    write_file(directory / data_name, data)
    for name, tensor in progress(state.items(), desc="Saving the delta", unit="tensor"):
        record["tensors"][name]["sha256"] = tensor_sha256(tensor)
    manifest = {
        "format": FORMAT,
        **record,
        "generation": generation,
        "file": data_name,
        "file_bytes": len(data),
        "file_sha256": hashlib.sha256(data).hexdigest(),
    }
    replace_atomically(directory / MANIFEST, json.dumps(manifest, indent=1).encode())
    for path in directory.iterdir():  # the previous generation and leftovers of killed saves
        if path.name != data_name and (
            _DATA_FILE.fullmatch(path.name) or _STALE_MANIFEST.fullmatch(path.name)
        ):
            path.unlink(missing_ok=True)
    return directory


def validate_manifest(manifest: Any, where: str) -> None:
    """Check a manifest's structure (the record plus file fields and per-tensor checksums).

    Raises:
        CorruptDeltaError: If it is malformed.
        DeltaError: If it was written in another format version.
    """

    def need(condition: bool, problem: str) -> None:
        if not condition:
            raise CorruptDeltaError(f"{where}: {problem}")

    need(isinstance(manifest, dict), "the manifest is not a JSON object")
    need(manifest.get("format") == FORMAT, f"'format' is {manifest.get('format')!r}, expected {FORMAT!r}")
    validate_record(manifest, where)
    need(isinstance(manifest.get("file"), str) and bool(_DATA_FILE.fullmatch(manifest["file"])),
         f"'file' must name a delta-<hex>.safetensors in the folder, got {manifest.get('file')!r}")  # fmt: skip
    need(isinstance(manifest.get("file_bytes"), int), "'file_bytes' must be an integer")
    need(isinstance(manifest.get("file_sha256"), str) and bool(_SHA.fullmatch(manifest["file_sha256"])),
         "'file_sha256' must be 64 hex digits")  # fmt: skip
    tensors = manifest["tensors"]
    need(bool(tensors), "'tensors' must be a non-empty object")
    for name, spec in tensors.items():
        need(
            isinstance(spec, dict)
            and isinstance(spec.get("shape"), list)
            and all(isinstance(s, int) and s >= 0 for s in spec["shape"])
            and spec.get("dtype") in _DTYPES
            and isinstance(spec.get("sha256"), str)
            and bool(_SHA.fullmatch(spec["sha256"])),
            f"tensor entry {name!r} must have shape (list of ints), dtype (one of {sorted(_DTYPES)}) and sha256",
        )


def read_delta(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and fully validate a delta folder without touching any model.

    Checks the manifest's schema, the data file's size and sha256, that the file holds
    exactly the tensors the manifest lists, and every tensor's shape, dtype and sha256.

    Returns:
        ``(manifest, tensors)``.

    Raises:
        FileNotFoundError: If the folder holds no delta.
        CorruptDeltaError: If anything does not check out.
    """
    directory = Path(directory)
    where = f"delta folder {directory}"
    for attempt in range(5):  # a concurrent save may replace the generation between the two reads
        try:
            raw = (directory / MANIFEST).read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"{directory} holds no delta ({MANIFEST} is missing)") from None
        try:
            manifest = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CorruptDeltaError(f"{where}: {MANIFEST} is not valid JSON ({err})") from err
        validate_manifest(manifest, where)
        try:
            data = (directory / manifest["file"]).read_bytes()
            break
        except FileNotFoundError:
            if attempt == 4:
                raise CorruptDeltaError(
                    f"{where}: {manifest['file']} named by {MANIFEST} is missing"
                ) from None
            time.sleep(0.05)
    if len(data) != manifest["file_bytes"] or hashlib.sha256(data).hexdigest() != manifest["file_sha256"]:
        raise CorruptDeltaError(
            f"{where}: {manifest['file']} is damaged or truncated ({len(data)} bytes, sha256 mismatch with "
            f"{MANIFEST}); nothing was loaded"
        )
    tensors = deserialize(data, f"{where}/{manifest['file']}")
    specs = manifest["tensors"]
    if set(tensors) != set(specs):
        raise CorruptDeltaError(
            f"{where}: the data file holds {sorted(set(tensors) ^ set(specs))[:6]} not matching {MANIFEST}"
        )
    for name, spec in progress(specs.items(), desc="Checking the delta", unit="tensor"):
        t = tensors[name]
        if (
            list(t.shape) != spec["shape"]
            or dtype_name(t.dtype) != spec["dtype"]
            or tensor_sha256(t) != spec["sha256"]
        ):
            raise CorruptDeltaError(
                f"{where}: tensor {name} does not match its shape, dtype or sha256 in {MANIFEST}"
            )
    tensors = {name: tensors[name] for name in specs}  # manifest order
    return manifest, tensors


def load_delta(
    obj: nn.Module,
    directory: str | os.PathLike,
    adapter_name: str | None = None,
    *,
    strict_fingerprint: bool = True,
) -> nn.Module:
    """Load a delta folder into ``obj``: a fresh base, or one carrying other (or the same) adapters.

    Reads and validates the folder (schema, checksums, tensors), rebuilds the recorded
    adapters (registered names only), checks the base fingerprint, applies the adapters
    ``obj`` lacks, checks names, shapes and dtypes, and only then copies. A damaged folder
    or another base leaves ``obj`` untouched.

    Args:
        obj: The base model (LightningModule or plain ``nn.Module``). Names saved under a
            LightningModule's ``backbone.`` load into the bare Hugging Face model too.
        directory: A folder written by :func:`save_delta`.
        adapter_name: ``None`` loads every adapter under its saved name. A name loads the
            folder's adapter of that name, or, if the folder holds a single adapter, that
            adapter under this new name.
        strict_fingerprint: ``False`` turns a base mismatch into a warning (so does the
            environment variable ``LIGHTNING_PEFT_IGNORE_FINGERPRINT=1``).

    Returns:
        ``obj``.

    Raises:
        FileNotFoundError: No delta in ``directory``.
        CorruptDeltaError: The folder is damaged or malformed.
        FingerprintMismatchError: ``obj``'s base differs from the recorded one.
        DeltaError: Adapters, names, shapes or dtypes do not fit ``obj``.
    """
    manifest, tensors = read_delta(directory)
    where = f"delta folder {directory}"
    rename = None
    if adapter_name is not None:
        saved = list(dict.fromkeys(a.get("adapter_name", "default") for a in manifest["adapters"]))
        if adapter_name in saved:
            manifest, tensors = select_adapter(manifest, tensors, adapter_name, where)
        elif len(saved) == 1:
            rename = {saved[0]: adapter_name}
        else:
            raise DeltaError(
                f"{where} holds adapters {saved}; name one of them (or save them one per folder)"
            )
    try:
        restore(obj, manifest, tensors, where=where, strict_fingerprint=strict_fingerprint, rename=rename)
    except MethodError as err:
        raise DeltaError(f"{where}: {err}") from err
    return obj
