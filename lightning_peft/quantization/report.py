"""How many bits a 4-bit model holds, and what folding adapters into 4-bit weights would cost."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..core.layers import is_4bit, is_conv1d
from ..core.ownership import unwrapped
from ..core.targeting import find_backbone, replace_module
from ..merging import active_adapters
from .convert import plain_layer
from .kernels import quantize_linear
from .spec import QuantSpec

__all__ = ["bits_per_parameter", "quantization_report", "requantization_error", "state_dict_bits"]


def _bits(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size() * 8


def _layer_bits(module: nn.Module) -> tuple[int, int, int]:
    """``(weights represented, bits scaling with them, bits of fixed per-layer tables)``."""
    state = module.weight.quant_state
    n = int(torch.Size(state.shape).numel())
    data = _bits(module.weight.data) + _bits(state.absmax)
    tables = _bits(state.code)
    if getattr(state, "nested", False):
        data += _bits(state.state2.absmax) + _bits(state.offset)
        tables += _bits(state.state2.code)
    return n, data, tables


def quantization_report(model: nn.Module) -> dict[str, float]:
    """Storage of ``model`` split into 4-bit layers and the rest.

    Returns:
        ``quantized_layers``; ``quantized_weights`` (weights the 4-bit layers stand for);
        ``bits_per_quantized_weight`` (packed codes + block scales + second-level scales
        and offset, over those weights); ``table_bits`` (the fixed code books each layer
        carries: 16 NF4/FP4 values and, with double quantization, 256 for the scale code:
        identical in every layer and independent of its size; the saved state dict also
        holds ~170 bytes of JSON metadata per layer, see :func:`state_dict_bits`); ``other_parameters`` and
        ``other_bits`` (every other parameter and persistent buffer, shared tensors
        counted once, 4-bit biases included); ``total_bits``.
    """
    layers = [m for m in model.modules() if is_4bit(m)]
    counted: set[int] = set()
    n_q = data = tables = 0
    for module in layers:
        n, d, t = _layer_bits(module)
        n_q, data, tables = n_q + n, data + d, tables + t
        counted.add(id(module.weight))
    other_n = other_bits = 0
    for module in model.modules():
        tensors = list(module.parameters(recurse=False))
        tensors += [
            b
            for name, b in module.named_buffers(recurse=False)
            if name not in module._non_persistent_buffers_set
        ]
        for t in tensors:
            if t is None or id(t) in counted:
                continue
            counted.add(id(t))
            other_n += t.numel()
            other_bits += _bits(t)
    return {
        "quantized_layers": len(layers),
        "quantized_weights": n_q,
        "bits_per_quantized_weight": data / n_q if n_q else float("nan"),
        "table_bits": tables,
        "other_parameters": other_n,
        "other_bits": other_bits,
        "total_bits": data + tables + other_bits,
    }


def bits_per_parameter(model: nn.Module) -> float:
    """Bits stored per quantized weight in ``model``'s 4-bit layers.

    Counts the packed 4-bit codes, the per-block scales (8-bit with double quantization,
    else fp32) and the second-level scales and offset, over the number of weights they
    represent: NF4 with double quantization in blocks of 64 gives
    ``4 + 8/64 + 32/(64*256) ~= 4.127`` on large layers, FP4/NF4 without it ``4.5``. The
    fixed code books are reported by :func:`quantization_report`.

    Raises:
        ValueError: If ``model`` has no 4-bit layer.
    """
    report = quantization_report(model)
    if not report["quantized_layers"]:
        raise ValueError(f"{type(model).__name__} has no 4-bit layer")
    return report["bits_per_quantized_weight"]


def state_dict_bits(model: nn.Module) -> int:
    """Bits of ``model.state_dict()`` as saved (4-bit layers in bitsandbytes' format), shared tensors once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.device.type != "meta" else (id(t), 0)
        if key in seen:
            continue
        seen.add(key)
        total += _bits(t)
    return total


def _spec_of(layer: nn.Module) -> QuantSpec:
    weight = layer.weight
    return QuantSpec(
        quant_type=weight.quant_type,
        double_quant=bool(weight.compress_statistics),
        compute_dtype=layer.compute_dtype or torch.float32,
        blocksize=weight.blocksize,
        quant_storage=weight.quant_storage,
    )


@torch.no_grad()
def requantization_error(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """What folding the active adapters into the 4-bit base would cost, measured on the logits of ``batch``.

    For every layer an active adapter folds (its method's ``folded_layers``) over a 4-bit
    base, two copies of the Hugging Face model are built: one with the folded weight in full
    precision (what ``export_merged`` writes), one with it quantized again with the base's
    settings (what an in-place 4-bit merge would give). Both are compared with the live
    model's logits. Needs memory for two extra copies of the model; meant for evaluation
    and benchmarks.

    Returns:
        ``layers``; ``cosine_merged``/``cosine_requantized`` (cosine similarity of the
        flattened logits with the live model's); ``max_abs_merged``/``max_abs_requantized``
        and ``mean_abs_merged``/``mean_abs_requantized`` (absolute logit differences).

    Raises:
        ValueError: If no active adapter folds a layer over a 4-bit base.
    """
    backbone = find_backbone(model)
    folded: dict[str, dict[str, torch.Tensor]] = {}
    for method in active_adapters(model):
        folded.update(method.folded_layers(backbone, torch.float32))
    names = [n for n in folded if is_4bit(unwrapped(backbone.get_submodule(n)))]
    if not names:
        raise ValueError("no adapted layer over a 4-bit base in this model: nothing would be re-quantized")
    was_training = backbone.training
    backbone.eval()

    def logits(net: nn.Module) -> torch.Tensor:
        return net(**batch).logits.float()

    try:
        live = logits(backbone)
        results: dict[str, float] = {"layers": len(names)}
        for kind in ("merged", "requantized"):
            copy_ = copy.deepcopy(backbone)
            for name in names:
                base = unwrapped(backbone.get_submodule(name))
                dtype = base.weight.quant_state.dtype  # the base's original dtype
                plain = plain_layer(base, dtype)
                merged = folded[name]["weight"].to(dtype)  # (out, in)
                plain.weight.data = merged.T.contiguous() if is_conv1d(plain) else merged
                new = plain if kind == "merged" else quantize_linear(plain, **_spec_of(base).layer_kwargs())
                replace_module(copy_, name, new)
            other = logits(copy_)
            del copy_
            results[f"cosine_{kind}"] = float(
                torch.nn.functional.cosine_similarity(live.flatten(), other.flatten(), 0)
            )
            results[f"max_abs_{kind}"] = float((live - other).abs().max())
            results[f"mean_abs_{kind}"] = float((live - other).abs().mean())
        return results
    finally:
        backbone.train(was_training)
