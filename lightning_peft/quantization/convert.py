"""Which frozen layers become 4-bit, and turning a model's layers 4-bit and back.

A layer is quantized only if nothing owns it: not an adapter (trainable tensors, or its own
frozen state), not the model (a task head), not a method that asks for full precision
around it. That one rule keeps LoRA, adapter and prefix modules, trainable heads and
``modules_to_save`` in full precision, whatever the method.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..core.layers import LINEAR_TYPES, Conv1D, dense_weight, is_4bit, is_conv1d
from ..core.ownership import owned_tensors, transfer_declarations
from ..core.targeting import head_module_names, replace_module, require_matches
from ..methods.base import applied_methods
from ..progress import progress
from .kernels import quantize_linear
from .spec import QuantSpec

__all__ = ["dequantize_model", "plain_layer", "quantizable_modules", "quantize_model"]


def _matches(name: str, patterns: Iterable[str]) -> bool:
    """``name`` or one of its ancestors equals a pattern or ends with ``"." + pattern``."""
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(p == pat or p.endswith("." + pat) for p in prefixes for pat in patterns)


def _kept_ids(model: nn.Module) -> set[int]:
    """Tensors that stay in full precision: every tensor an adapter or the model owns, and trainable ones."""
    ids = {id(o.tensor) for o in owned_tensors(model)}
    ids.update(id(p) for p in model.parameters() if p.requires_grad)
    return ids


def quantizable_modules(
    model: nn.Module, skip_modules: Iterable[str] | None = None, *, skip_heads: bool = True
) -> list[tuple[str, nn.Module]]:
    """The layers :func:`quantize_model` replaces, as ``(qualified_name, module)`` pairs.

    A layer qualifies if it is an ``nn.Linear`` or ``Conv1D`` (not already 4-bit) and
    none of these holds: its weight is owned by an adapter or by the model (see
    :mod:`lightning_peft.core.ownership`: trainable, or an adapter's own frozen state) or
    has ``requires_grad`` (a trained bias alone does not count: it stays trainable beside
    the 4-bit weight); its weight is shared with another module (tied embeddings); it
    is, or lies inside, an output head (:func:`~lightning_peft.core.targeting.head_module_names`,
    when ``skip_heads``), a module named in ``skip_modules`` (full names or trailing
    components), or a layer an applied method keeps in full precision
    (:meth:`~lightning_peft.methods.base.Method.keep_full_precision`). Frozen base layers a
    method wraps (``LoRALinear.base_layer``) qualify.
    """
    skip = list(skip_modules or ())
    require_matches(model, skip, "skip_modules")  # a typo would quietly quantize the layer meant to stay
    if skip_heads:
        skip += head_module_names(model)
    for method in applied_methods(model):
        skip += method.keep_full_precision(model)
    trainable = _kept_ids(model)
    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    chosen = []
    for name, module in model.named_modules():
        if not name or not isinstance(module, LINEAR_TYPES) or is_4bit(module):
            continue
        if id(module.weight) in trainable or owners.get(id(module.weight), 0) > 1:
            continue  # a trained or shared weight stays as it is (a trained bias rides along)
        if skip and _matches(name, skip):
            continue
        chosen.append((name, module))
    return chosen


def quantize_model(
    model: nn.Module,
    spec: QuantSpec | None = None,
    *,
    skip_modules: Iterable[str] | None = None,
    skip_heads: bool = True,
    device: torch.device | str | None = None,
) -> list[str]:
    """Replace the frozen linear layers of ``model`` by 4-bit ones, one layer at a time, in place.

    Only one layer's full-precision weight is alive at a time beyond what ``model`` held.
    The layers chosen are :func:`quantizable_modules`'s.

    Args:
        model: Any ``nn.Module`` (methods may already be applied).
        spec: Quantization settings (default :class:`QuantSpec()`: NF4, double quant, bf16).
        skip_modules: Extra module names (or trailing components) to keep in full precision.
        skip_heads: Keep output heads in full precision.
        device: Where to quantize and keep each layer (default: where its weight is).

    Returns:
        Qualified names of the layers replaced.

    Raises:
        ValueError: If a layer to quantize is still on the ``meta`` device.
    """
    spec = spec or QuantSpec()
    names = []
    kept = _kept_ids(model)
    chosen = quantizable_modules(model, skip_modules, skip_heads=skip_heads)
    for name, module in progress(chosen, desc="Quantizing to 4-bit", unit="layer"):
        if module.weight.device.type == "meta":
            raise ValueError(f"layer {name} is on the meta device; load its weights before quantizing")
        layer = quantize_linear(module, device=device, **spec.layer_kwargs())
        layer.train(module.training)
        bias = getattr(module, "bias", None)
        if bias is not None and id(bias) in kept:  # BitFit over 4-bit: the same trained bias object
            if device is not None:
                bias.data = bias.data.to(device)
            layer.bias = bias
        transfer_declarations(module, layer)
        replace_module(model, name, layer)
        del module
        names.append(name)
    return names


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> list[str]:
    """Replace every 4-bit layer of ``model`` by its full-precision equivalent, in place.

    ``Conv1D`` layers come back as ``Conv1D``. Returns the names of the layers replaced.
    """
    names = [n for n, m in model.named_modules() if n and is_4bit(m)]
    for name in names:
        old = model.get_submodule(name)
        new = plain_layer(old, dtype or getattr(old.weight.quant_state, "dtype", None))
        new.train(old.training)
        replace_module(model, name, new)
    return names


def plain_layer(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A full-precision layer equal to ``module``: an ``nn.Linear``, or a ``Conv1D`` if it came from one.

    For a 4-bit layer the weight is dequantized; the result is frozen like the input was.
    """
    weight = dense_weight(module, dtype)  # (out, in)
    out_features, in_features = weight.shape
    bias = getattr(module, "bias", None)
    if getattr(module, "source_type", None) == "Conv1D" or is_conv1d(module):
        layer: nn.Module = Conv1D(out_features, in_features)
        layer.weight = nn.Parameter(weight.T.contiguous().clone(), requires_grad=False)  # (in, out)
    else:
        layer = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
        layer.weight = nn.Parameter(weight.contiguous().clone(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(dtype or bias.dtype).clone(), requires_grad=False)
    return layer
