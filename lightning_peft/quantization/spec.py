"""How base weights are quantized: :class:`QuantSpec`, validated on construction."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

QUANT_TYPES = ("nf4", "fp4")
"""4-bit code books bitsandbytes offers."""
BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)
"""Weights per quantization block bitsandbytes accepts."""
NESTED_BLOCKSIZE = 256
"""Block size bitsandbytes quantizes the per-block scales in (double quantization)."""

__all__ = ["BLOCKSIZES", "COMPUTE_DTYPES", "QUANT_TYPES", "STORAGE_DTYPES", "QuantSpec", "as_dtype"]


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How base weights are quantized (validated on construction)."""

    quant_type: str = "nf4"
    """4-bit code book: ``"nf4"`` (normal float, best for normally distributed weights) or ``"fp4"``."""
    double_quant: bool = True
    """Quantize the fp32 per-block scales again to 8 bits (saves ~0.37 bits per weight)."""
    compute_dtype: torch.dtype = torch.bfloat16
    """dtype the 4-bit matmuls run in: ``torch.bfloat16``, ``torch.float16`` or ``torch.float32``."""
    blocksize: int = 64
    """Weights per quantization block (one scale each): a power of two from 64 to 4096."""
    quant_storage: torch.dtype = torch.uint8
    """dtype the packed codes are stored as (``uint8``; a float dtype for sharding strategies)."""

    def __post_init__(self) -> None:
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {self.quant_type!r}")
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"double_quant must be True or False, got {self.double_quant!r}")
        dtype = as_dtype(self.compute_dtype)
        if dtype not in COMPUTE_DTYPES:
            names = ", ".join(str(d).replace("torch.", "") for d in COMPUTE_DTYPES)
            raise ValueError(f"compute_dtype must be a floating dtype ({names}), got {self.compute_dtype!r}")
        object.__setattr__(self, "compute_dtype", dtype)
        if isinstance(self.blocksize, bool) or self.blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {self.blocksize!r}")
        storage = as_dtype(self.quant_storage)
        if storage not in STORAGE_DTYPES:
            raise ValueError(f"quant_storage must be one of {STORAGE_DTYPES}, got {self.quant_storage!r}")
        object.__setattr__(self, "quant_storage", storage)

    def layer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`quantize_linear` for these settings."""
        return {
            "quant_type": self.quant_type,
            "double_quant": self.double_quant,
            "compute_dtype": self.compute_dtype,
            "blocksize": self.blocksize,
            "quant_storage": self.quant_storage,
        }


COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
STORAGE_DTYPES = (torch.uint8, torch.int8, torch.bfloat16, torch.float16, torch.float32)


def as_dtype(value: torch.dtype | str) -> torch.dtype | str:
    """``torch.bfloat16`` from ``torch.bfloat16``, ``"bfloat16"``, ``"torch.bfloat16"`` or ``"bf16"``."""
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        name = value.removeprefix("torch.")
        name = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32"}.get(name, name)
        dtype = getattr(torch, name, None)
        if isinstance(dtype, torch.dtype):
            return dtype
    return value
