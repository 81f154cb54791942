"""4-bit base weights for QLoRA (Dettmers et al., 2023, "QLoRA: Efficient Finetuning of Quantized LLMs").

The functional core behind :class:`lightning_peft.plugins.FourBitPrecision`, in plain torch
plus bitsandbytes: replace frozen linear layers by 4-bit ones (NF4 or FP4 codes in blocks
of 64 weights, optionally with the per-block scales quantized again: "double
quantization"), read a dense weight back from any supported layer, and count the bits a
quantized model holds.

bitsandbytes' CPU backend repacks a 4-bit weight in place the first time a layer runs in
eval mode under ``no_grad`` on a CPU with AVX512-BF16 (new layout, scales cast to bf16);
``dequantize_4bit`` then returns wrong values. Layers made here never repack
(:class:`Linear4bit`), and :func:`dense_weight` reads repacked layers made elsewhere
correctly.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch import nn

from .targeting import LINEAR_TYPES

try:  # transformers' GPT-2 style linear layer with a transposed weight
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = None  # type: ignore[assignment,misc]

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256  # bitsandbytes quantizes the per-block scales in blocks of 256


def _import_bnb() -> Any:
    """Import bitsandbytes quietly (its CPU build warns about an optional ``kernels`` package)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        previous = logging.getLogger("bitsandbytes").level
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        try:
            import bitsandbytes as bnb
            import bitsandbytes.functional  # noqa: F401
        finally:
            logging.getLogger("bitsandbytes").setLevel(previous)
    return bnb


bnb = _import_bnb()


# --------------------------------------------------------------------------- layers
class Linear4bit(bnb.nn.Linear4bit):
    """A bitsandbytes ``Linear4bit`` that never repacks its weight and never casts its bias in place.

    Differences from the parent class, all in :meth:`forward`:

    * no CPU repacking in eval mode, so the stored codes stay the ones
      ``quantize_4bit`` produced (bit-identical checkpoints and fingerprints, exact
      dequantization, the same bits per weight in training and evaluation);
    * the bias is cast to the compute dtype for the matmul but kept as it is, so a
      trainable fp32 bias stays fp32 for its optimizer;
    * the output has the input's dtype, the matmul runs in ``compute_dtype``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.support_avx512bf16_for_cpu = False  # the switch the parent's repack reads

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        """``x @ W.T + b`` with ``W`` dequantized on the fly in ``compute_dtype``."""
        bnb.nn.modules.fix_4bit_weight_quant_state_from_module(self)
        state = self.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # repacked by someone else: undo
            self.weight.data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(
                self.weight.data, state
            )
            self.weight.quant_state = self.quant_state = state
        dtype = self.compute_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        out = bnb.matmul_4bit(x.to(dtype), self.weight.t(), bias=bias, quant_state=state)
        return out.to(x.dtype)  # (..., out)


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit linear layer (ours or anyone's)."""
    return isinstance(module, bnb.nn.Linear4bit)


def quantize_linear(
    module: nn.Module,
    *,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = torch.bfloat16,
    blocksize: int = 64,
    quant_storage: torch.dtype = torch.uint8,
    device: torch.device | str | None = None,
) -> Linear4bit:
    """Return a 4-bit copy of a frozen ``nn.Linear`` or transformers ``Conv1D``.

    The weight is quantized in ``(out, in)`` orientation (``Conv1D`` is transposed first).
    The bias, if any, is copied unchanged and frozen. Quantizing the same weights twice
    gives bit-identical codes and scales.

    Args:
        module: The layer to quantize.
        quant_type: ``"nf4"`` (normal float, the QLoRA default) or ``"fp4"``.
        double_quant: Quantize the per-block fp32 scales again to 8 bits.
        compute_dtype: dtype the matmul runs in (``None``: the input's dtype).
        blocksize: Weights per quantization block.
        quant_storage: dtype the packed codes are stored as (``uint8``; a float dtype lets
            FSDP shard them like any other parameter).
        device: Where to quantize (default: the weight's device; ``meta`` is not allowed).

    Returns:
        The new :class:`Linear4bit`; the caller swaps it in.
    """
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
    weight = dense_weight(module)  # (out, in)
    device = torch.device(device) if device is not None else weight.device
    if device.type == "meta":
        raise ValueError("cannot quantize a layer on the meta device: load its weights first")
    out_features, in_features = weight.shape
    bias = getattr(module, "bias", None)
    layer = Linear4bit(
        in_features,
        out_features,
        bias=bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=double_quant,
        quant_type=quant_type,
        quant_storage=quant_storage,
        device="meta",
    )
    layer.weight = bnb.nn.Params4bit(
        weight.detach().to(device).contiguous(),
        requires_grad=False,
        blocksize=blocksize,
        compress_statistics=double_quant,
        quant_type=quant_type,
        quant_storage=quant_storage,
        module=layer,
    )._quantize(device)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(device), requires_grad=False)
    return layer


# --------------------------------------------------------------------------- dequantization
def _dequantize_cpu_packed(data: torch.Tensor, state: Any) -> torch.Tensor:
    """Dequantize a weight bitsandbytes repacked for its AVX512-BF16 CPU kernel, without touching it."""
    n, k_half = data.shape  # data: (N, K/2) uint8, columns interleaved in tiles of 32 rows
    k, tile = 2 * k_half, 32
    packed = data.reshape(-1, tile)
    codes = torch.cat([packed & 0xF, (packed >> 4) & 0xF], dim=-1)  # (N*K/64, 64)
    codes = codes.reshape(n // tile, k_half, tile, 2).transpose(1, 2).reshape(n, k)  # (N, K)
    values = state.code.to(data.device)[codes.long()]  # (N, K)
    scales = state.absmax.T.float()  # (N, K / blocksize)
    out = values.view(n, k // state.blocksize, state.blocksize) * scales.unsqueeze(-1)
    return out.reshape(n, k)


def _dequantize(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    state = getattr(weight, "quant_state", None) or getattr(module, "quant_state", None)
    if state is None:
        raise ValueError(f"{type(module).__name__} has no quantization state: it was never quantized")
    if getattr(state, "packing_format_for_cpu", False):
        return _dequantize_cpu_packed(weight.data, state)
    return bnb.functional.dequantize_4bit(weight.data, state)  # (out, in)


def dense_weight(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The ``(out, in)`` dense weight of a linear layer, whatever its storage.

    * ``nn.Linear``: its weight (detached; it may share storage: clone before editing);
    * transformers ``Conv1D`` (weight stored ``(in, out)``): the transpose;
    * bitsandbytes ``Linear4bit`` (ours or one loaded by transformers/PEFT): a new
      dequantized tensor, correct even after bitsandbytes repacked it for its CPU kernel.

    Args:
        module: The layer.
        dtype: Cast the result to this dtype (default: the stored / original dtype).

    Returns:
        The weight, shape ``(out_features, in_features)``.

    Raises:
        TypeError: For any other module type.
    """
    if is_quantized(module):
        weight = _dequantize(module)
    elif Conv1D is not None and isinstance(module, Conv1D):
        weight = module.weight.detach().T  # stored (in, out)
    elif isinstance(module, nn.Linear):
        weight = module.weight.detach()
    else:
        allowed = ", ".join(t.__name__ for t in (*LINEAR_TYPES, bnb.nn.Linear4bit))
        raise TypeError(f"dense_weight supports {allowed}; got {type(module).__name__}")
    return weight if dtype is None else weight.to(dtype)
