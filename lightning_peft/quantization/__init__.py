"""4-bit base weights for QLoRA: layers, settings, conversion, streaming loads and bit counts.

Dettmers et al., 2023, "QLoRA: Efficient Finetuning of Quantized LLMs". The Lightning plugin
over this functional core is :class:`lightning_peft.plugins.FourBitPrecision`.
"""

from ..core.layers import dense_weight, is_4bit
from .convert import dequantize_model, plain_layer, quantizable_modules, quantize_model
from .heap import release_freed_memory, return_large_blocks_to_os
from .kernels import Linear4bit, quantize_linear
from .report import bits_per_parameter, quantization_report, requantization_error, state_dict_bits
from .spec import BLOCKSIZES, COMPUTE_DTYPES, QUANT_TYPES, STORAGE_DTYPES, QuantSpec, as_dtype
from .streaming import (
    NoSafetensorsError,
    iter_safetensors,
    load_quantized,
    quantize_on_init,
    safetensors_files,
)

__all__ = [
    "BLOCKSIZES",
    "COMPUTE_DTYPES",
    "QUANT_TYPES",
    "STORAGE_DTYPES",
    "Linear4bit",
    "NoSafetensorsError",
    "QuantSpec",
    "as_dtype",
    "bits_per_parameter",
    "dense_weight",
    "dequantize_model",
    "is_4bit",
    "iter_safetensors",
    "load_quantized",
    "plain_layer",
    "quantizable_modules",
    "quantization_report",
    "quantize_linear",
    "quantize_model",
    "quantize_on_init",
    "release_freed_memory",
    "requantization_error",
    "return_large_blocks_to_os",
    "safetensors_files",
    "state_dict_bits",
]
