"""Linear-layer helpers every other module reads through: kinds, widths, dense weights, 4-bit decoding.

One home for what generic code asks of a layer, whatever it stores:

* ``nn.Linear`` keeps its weight ``(out, in)``;
* transformers' ``Conv1D`` (GPT-2) keeps it transposed, ``(in, out)``;
* a bitsandbytes ``Linear4bit`` keeps packed 4-bit codes plus a ``QuantState``.

:func:`dense_weight` gives the ``(out, in)`` weight of any of them (dequantized for 4-bit
layers), :func:`layer_features` their widths, :func:`is_4bit` tells 4-bit layers apart.

bitsandbytes' CPU backend repacks a 4-bit weight in place the first time a layer runs in
eval mode under ``no_grad`` on a CPU with AVX512-BF16 (a new layout, scales cast to bf16);
``bitsandbytes.functional.dequantize_4bit`` then returns wrong values.
:func:`dequantize_4bit` reads both layouts correctly, so merges, exports, fingerprints and
checkpoints never depend on whether a layer ran before.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .sharded import full_tensor

# bitsandbytes' CPU build warns about an optional ``kernels`` package on import: harmless, silenced.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    _BNB_LOGGER = logging.getLogger("bitsandbytes")
    _BNB_LEVEL = _BNB_LOGGER.level
    _BNB_LOGGER.setLevel(logging.ERROR)
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional  # noqa: F401  (the submodule the decoders use)
    finally:
        _BNB_LOGGER.setLevel(_BNB_LEVEL)

LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)
"""Dense layer types that linear-layer methods (LoRA, (IA)³, 4-bit quantization) handle.
bitsandbytes' ``Linear4bit`` is an ``nn.Linear`` subclass, so it is included."""

__all__ = [
    "LINEAR_TYPES",
    "Conv1D",
    "bnb",
    "dense_weight",
    "dequantize_4bit",
    "dequantize_sharded_4bit",
    "editable_weight",
    "is_4bit",
    "is_conv1d",
    "is_norm",
    "layer_features",
]


def is_4bit(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit linear layer (ours or one transformers/PEFT made)."""
    return isinstance(module, bnb.nn.Linear4bit)


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (weight stored ``(in, out)``)."""
    return isinstance(module, Conv1D)


def is_norm(module: nn.Module) -> bool:
    """LayerNorm, GroupNorm and the RMSNorm of every model family (matched by type, not by name)."""
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or type(module).__name__.endswith("RMSNorm"):
        return True
    rms = getattr(nn, "RMSNorm", None)
    return isinstance(rms, type) and isinstance(module, rms)


def layer_features(layer: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear layer of any supported kind.

    Raises:
        TypeError: If ``layer`` is not a linear layer.
    """
    if is_conv1d(layer):
        return int(layer.weight.shape[0]), int(layer.nf)
    if isinstance(layer, nn.Linear):
        return int(layer.in_features), int(layer.out_features)
    raise TypeError(f"{type(layer).__name__} is not a linear layer (nn.Linear, Conv1D or Linear4bit)")


# --------------------------------------------------------------------------- 4-bit decoding
def _dequantize_cpu_packed(data: torch.Tensor, state: Any) -> torch.Tensor:
    """Decode a weight bitsandbytes repacked for its AVX512-BF16 CPU kernel, without touching it."""
    n, k_half = data.shape  # data: (N, K/2) uint8, columns interleaved in tiles of 32 rows
    k, tile = 2 * k_half, 32
    packed = data.reshape(-1, tile)
    codes = torch.cat([packed & 0xF, (packed >> 4) & 0xF], dim=-1)  # (N*K/64, 64)
    codes = codes.reshape(n // tile, k_half, tile, 2).transpose(1, 2).reshape(n, k)  # (N, K)
    values = state.code.to(data.device)[codes.long()]  # (N, K)
    scales = state.absmax.T.float()  # (N, K / blocksize)
    out = values.view(n, k // state.blocksize, state.blocksize) * scales.unsqueeze(-1)
    return out.reshape(n, k)


def dequantize_4bit(data: torch.Tensor, state: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Decode packed 4-bit ``data`` with its ``QuantState`` into a new ``(out, in)`` tensor.

    Handles the CPU-repacked layout (see the module docstring) and, on CPU, decodes
    double-quantized scales with an ``index_select`` fast path.

    Args:
        data: The packed codes (the parameter's ``.data``).
        state: Its bitsandbytes ``QuantState``.
        dtype: dtype of the result (default: the state's original dtype).
    """
    if getattr(state, "packing_format_for_cpu", False):  # the repack set dtype to bf16
        out = _dequantize_cpu_packed(data, state)
        return out.to(dtype or getattr(state, "original_dtype", state.dtype))
    dtype = dtype or state.dtype
    op = getattr(getattr(torch.ops, "bitsandbytes", None), "dequantize_4bit", None)
    if data.device.type != "cpu" or op is None:
        return bnb.functional.dequantize_4bit(data, state).to(dtype)
    absmax = state.absmax  # (blocks,)
    if state.nested:  # 8-bit scales of the scales, in blocks of 256
        inner = state.state2
        codes = torch.index_select(inner.code, 0, absmax.int())  # (blocks,)
        scales = inner.absmax.repeat_interleave(inner.blocksize)[: codes.numel()]  # (blocks,)
        absmax = codes * scales + state.offset
    return op.default(data, absmax.float(), state.blocksize, state.quant_type, state.shape, dtype)


def _quant_state(module: nn.Module) -> Any:
    state = getattr(module.weight, "quant_state", None) or getattr(module, "quant_state", None)
    if state is None:
        raise ValueError(f"{type(module).__name__} has no quantization state: it was never quantized")
    return state


def dequantize_sharded_4bit(layer: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense ``(out, in)`` weight of a 4-bit layer whose codes FSDP2 sharded (a ``DTensor``).

    Gathers this one layer's codes: a collective, call it on every rank in the same order.
    """
    codes = layer.weight.full_tensor().detach()  # (packed, 1)
    return dequantize_4bit(codes, _quant_state(layer), dtype)  # (out, in)


def dense_weight(layer: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The ``(out, in)`` weight of a linear layer, whatever its storage.

    * ``nn.Linear``: its weight, detached (shares storage: clone before editing);
    * ``Conv1D``: the transpose of its ``(in, out)`` weight (a view);
    * 4-bit layers (ours, or made by transformers/PEFT): a new dequantized tensor, correct
      even after bitsandbytes repacked it.

    An FSDP2-sharded weight is gathered first (a collective: call it on every rank).

    Args:
        layer: The layer.
        dtype: Cast the result to this dtype (default: the stored or original dtype).

    Raises:
        TypeError: For anything that is not a linear layer.
    """
    if is_4bit(layer):
        if hasattr(layer.weight, "device_mesh"):
            weight = dequantize_sharded_4bit(layer)
        else:
            weight = dequantize_4bit(layer.weight.data, _quant_state(layer))
    elif is_conv1d(layer):
        weight = full_tensor(layer.weight).T  # stored (in, out); an FSDP2 shard is gathered
    elif isinstance(layer, nn.Linear):
        weight = full_tensor(layer.weight)
    else:
        raise TypeError(
            f"dense_weight supports nn.Linear, Conv1D and bitsandbytes Linear4bit; got {type(layer).__name__}"
        )
    return weight if dtype is None else weight.to(dtype)


def editable_weight(layer: nn.Module) -> torch.Tensor:
    """An ``(out, in)`` view of a full-precision layer's weight that in-place edits write through.

    Used by merges, which fold a delta into the base weight and take it out again.

    Raises:
        ValueError: If the weight is quantized (a 4-bit layer cannot absorb a full-precision
            update without re-quantization, which loses most of it).
    """
    weight = getattr(layer, "weight", None)
    quantized = is_4bit(layer) or getattr(weight, "quant_state", None) is not None
    plain = isinstance(layer, LINEAR_TYPES) and isinstance(weight, torch.Tensor)
    if quantized or not plain or not weight.dtype.is_floating_point:
        raise ValueError(
            f"cannot fold an update into a {type(layer).__name__} base layer in place: its weights are quantized "
            "and re-quantizing would lose the update. lightning_peft.export_merged(model, dir) dequantizes and "
            "writes a merged full-precision copy without touching the live model."
        )
    return weight.detach().T if is_conv1d(layer) else weight.detach()
