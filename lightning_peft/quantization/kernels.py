"""4-bit base weights for QLoRA (Dettmers et al., 2023, "QLoRA: Efficient Finetuning of Quantized LLMs").

The 4-bit layer and the function that makes one: NF4 or FP4 codes in blocks of 64 weights,
optionally with the per-block scales quantized again ("double quantization"), decoded in
the compute dtype on the fly. Reading a dense weight back from any layer lives in
:mod:`lightning_peft.core.layers`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.layers import bnb, dense_weight, dequantize_4bit, is_conv1d
from .spec import BLOCKSIZES, QUANT_TYPES

__all__ = ["Linear4bit", "Matmul4bit", "quantize_linear"]


class Matmul4bit(torch.autograd.Function):
    """``x @ W.T`` with ``W`` dequantized in forward and again in backward (never saved)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:  # noqa: D102
        ctx.weight, ctx.dtype = weight, dtype
        dense = dequantize_4bit(weight.data, weight.quant_state, dtype)  # (out, in)
        return torch.nn.functional.linear(x, dense)  # (..., out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:  # noqa: D102
        if not ctx.needs_input_grad[0]:
            return None, None, None
        dense = dequantize_4bit(ctx.weight.data, ctx.weight.quant_state, grad.dtype)  # (out, in)
        return grad @ dense, None, None  # (..., in)


class Linear4bit(bnb.nn.Linear4bit):
    """A bitsandbytes ``Linear4bit`` that never repacks its weight and never casts its bias in place.

    Differences from the parent class, all in :meth:`forward`:

    * no CPU repacking in eval mode, so the stored codes stay the ones
      ``quantize_4bit`` produced (bit-identical checkpoints and fingerprints, exact
      dequantization, the same bits per weight in training and evaluation);
    * the bias is cast to the compute dtype for the add but kept as it is, so a trainable
      fp32 bias stays fp32 for its optimizer;
    * on CPU the weight is dequantized straight into ``compute_dtype`` (a fast path for
      double-quantized scales), in forward and again in backward; on CUDA bitsandbytes'
      kernels run;
    * the output has the input's dtype, the matmul runs in ``compute_dtype``.
    """

    source_type: str = "Linear"
    """``"Linear"`` or ``"Conv1D"``: what the layer was before quantization (for export)."""

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
        h = x.to(dtype)
        if h.device.type == "cpu":
            out = Matmul4bit.apply(h, self.weight, dtype)  # (..., out)
        else:
            out = bnb.matmul_4bit(h, self.weight.t(), quant_state=state)  # (..., out)
        if self.bias is not None:
            out = out + self.bias.to(dtype)
        return out.to(x.dtype)


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
    layer.source_type = "Conv1D" if is_conv1d(module) else "Linear"
    return layer
