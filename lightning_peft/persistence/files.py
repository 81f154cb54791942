"""Files and ranks: atomic writes, safetensors bytes, and writing once from a distributed run."""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from safetensors.torch import load, save

from .errors import CorruptDeltaError

__all__ = [
    "deserialize",
    "fsync_dir",
    "is_distributed",
    "replace_atomically",
    "serialize",
    "tensor_sha256",
    "write_file",
    "write_once",
]

T = TypeVar("T")


def is_distributed() -> bool:
    """Whether a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def write_once(write: Callable[[], T]) -> T:
    """Run ``write`` on global rank 0 only while the other ranks wait; every rank gets its result.

    Without a process group ``write`` simply runs. An error on rank 0 is raised on every
    rank, so no rank waits forever and none reports success. Call it on every rank.
    """
    if not is_distributed():
        return write()
    box: list[object] = [None, None]
    failure: Exception | None = None
    if dist.get_rank() == 0:
        try:
            box[0] = write()
        except Exception as err:  # re-raised on every rank below
            failure = err
            box[1] = f"{type(err).__name__}: {err}"
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        if failure is not None:
            raise failure
        raise RuntimeError(f"rank 0 failed to write: {box[1]}")
    return box[0]  # type: ignore[return-value]


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (on the CPU, contiguous)."""
    data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename) durable."""
    if os.name != "posix":  # pragma: no cover - directories cannot be opened on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def replace_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to a sibling temporary file, fsync it, and rename it over ``path``."""
    tmp = path.with_name(f".{path.stem}-{secrets.token_hex(8)}{path.suffix}")
    try:
        write_file(tmp, data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors bytes of ``tensors`` (own contiguous CPU copies)."""
    # Own, contiguous CPU copies: safetensors refuses shared storage and views.
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return save(plain, metadata=metadata)


def deserialize(data: bytes, where: str) -> dict[str, torch.Tensor]:
    """Tensors from safetensors bytes (nothing unpickled).

    Raises:
        CorruptDeltaError: If the bytes are not a readable safetensors file.
    """
    try:
        return load(data)
    except Exception as err:  # safetensors raises its own error types for damaged headers
        raise CorruptDeltaError(f"{where} is not a readable safetensors file: {err}") from err
