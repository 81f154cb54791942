"""Fold trained deltas into the base weights: ``merge``, ``unmerge`` and ``export_merged``.

``merge``/``unmerge`` change the live model in place (fast inference with no adapter
path, then back to training). ``export_merged`` leaves the live model alone and writes a
plain Hugging Face folder whose weights already contain the deltas, loadable with bare
``transformers`` (``AutoModelFor...from_pretrained(dir)``).

Quantized (4-bit) bases: ``merge`` refuses (folding a full-precision update into 4-bit
codes would need re-quantization, which loses most of the update); ``export_merged``
dequantizes and writes full-precision weights.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import nn

from .methods.base import applied_methods
from .methods.lora import Conv1D, LoRALinear, dense_weight
from .targeting import find_backbone

__all__ = ["export_merged", "merge", "merged_state_dict", "unmerge"]


def _methods(obj: nn.Module) -> list[Any]:
    methods = applied_methods(obj)
    if not methods:
        raise ValueError(
            f"no fine-tuning method is applied to this {type(obj).__name__}: nothing to merge. "
            "Apply one first, e.g. LoRA(r=8).apply(model) or Trainer(callbacks=[LoRA()])."
        )
    return methods


def merge(obj: nn.Module) -> nn.Module:
    """Fold every applied method's deltas into the base weights, in place.

    Idempotent: merging a merged model changes nothing. While merged, adapted layers run
    only their base path. Every layer is checked before any is changed, so a refused merge
    leaves the model as it was.

    Args:
        obj: A LightningModule or plain ``nn.Module`` a method was applied to.

    Returns:
        ``obj``.

    Raises:
        ValueError: If no method is applied, a delta is not finite, or a base layer is
            quantized (use :func:`export_merged` instead).
    """
    for method in _methods(obj):
        method.merge(obj)
    return obj


def unmerge(obj: nn.Module) -> nn.Module:
    """Undo :func:`merge` (a no-op on layers that are not merged); returns ``obj``."""
    for method in reversed(_methods(obj)):
        method.unmerge(obj)
    return obj


def _quantized(module: nn.Module) -> bool:
    if isinstance(module, LoRALinear):
        return False
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and getattr(weight, "quant_state", None) is not None


def _is_conv1d(module: nn.Module | None) -> bool:
    return Conv1D is not None and isinstance(module, Conv1D)


def merged_state_dict(
    backbone: nn.Module, dtype: torch.dtype = torch.float32, reference: nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """The state dict ``backbone`` would have without adapter modules, deltas folded in.

    LoRA layers become their base layer's ``weight``/``bias`` (``W + s B A``, or the DoRA
    weight), 4-bit layers are dequantized, floating tensors are cast to ``dtype``. New
    tensors are built; the live model is not modified.

    Args:
        backbone: The adapted model.
        dtype: dtype of the floating tensors.
        reference: A plain model of the same architecture (may be on ``meta``) that decides
            each folded weight's layout: ``(in, out)`` where it has a ``Conv1D``. Default:
            the live base layer's layout (a 4-bit layer counts as ``nn.Linear``).
    """
    out: dict[str, torch.Tensor] = {}

    def cast(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        return t.to(dtype).clone() if t.is_floating_point() else t.clone()

    def visit(module: nn.Module, prefix: str) -> None:
        if isinstance(module, LoRALinear) or _quantized(module):
            layer = module.base if isinstance(module, LoRALinear) else module
            if isinstance(module, LoRALinear):
                weight = module.merged_weight(dtype)  # (out, in)
            else:
                weight = dense_weight(module).to(dtype)  # (out, in)
            target = reference.get_submodule(prefix[:-1]) if reference is not None else layer
            out[prefix + "weight"] = weight.T.contiguous() if _is_conv1d(target) else weight.contiguous()
            if getattr(layer, "bias", None) is not None:
                out[prefix + "bias"] = cast(layer.bias)
            return
        for name, param in module.named_parameters(recurse=False):
            out[prefix + name] = cast(param)
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and name not in module._non_persistent_buffers_set:
                out[prefix + name] = cast(buf)
        for name, child in module.named_children():
            visit(child, f"{prefix}{name}.")

    visit(backbone, "")
    return out


def export_merged(obj: nn.Module, directory: str | os.PathLike, dtype: torch.dtype = torch.float32) -> str:
    """Write a plain ``save_pretrained`` folder with every delta folded into the weights.

    The Hugging Face model inside ``obj`` is rebuilt from its config (on the ``meta``
    device, so nothing big is allocated twice), filled with :func:`merged_state_dict`, and
    saved. The folder has no adapter tensors and loads with bare ``transformers``. The
    live model is not changed. A ``tokenizer`` attribute of ``obj`` (if any) is saved too.

    Args:
        obj: A LightningModule or ``nn.Module`` holding a Hugging Face ``PreTrainedModel``.
        directory: Output folder (created).
        dtype: dtype of the written weights.

    Returns:
        The folder path.

    Raises:
        ValueError: If ``obj`` holds no Hugging Face model, or holds modules the merge
            cannot fold (a method without a merge, e.g. bottleneck adapters).
    """
    from transformers import PreTrainedModel

    backbone = find_backbone(obj)
    if not isinstance(backbone, PreTrainedModel):
        raise ValueError(
            f"export_merged needs a Hugging Face PreTrainedModel inside {type(obj).__name__}; "
            "for other models use merge(model) and torch.save(model.state_dict())"
        )
    config = copy.deepcopy(backbone.config)
    config.dtype = dtype
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    with torch.device("meta"):
        clean = type(backbone)(config)
    state = merged_state_dict(backbone, dtype, reference=clean)
    expected = set(clean.state_dict())
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise ValueError(
            f"the model holds tensors a plain {type(backbone).__name__} has no place for "
            f"({unexpected[:5]}{'...' if len(unexpected) > 5 else ''}): a method without a merge is applied. "
            "Only LoRA-family deltas can be folded; export the adapter with export_peft/save_delta instead."
        )
    missing = clean.load_state_dict(state, strict=False, assign=True).missing_keys
    if missing:
        raise ValueError(f"merged state dict lacks {missing[:5]} of {type(backbone).__name__}")
    clean.tie_weights()
    _materialize_buffers(clean, backbone)
    clean.eval()
    os.makedirs(directory, exist_ok=True)
    clean.save_pretrained(directory)
    tokenizer = getattr(obj, "tokenizer", None)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(directory)
    return os.fspath(directory)


def _materialize_buffers(clean: nn.Module, live: nn.Module) -> None:
    """Copy non-persistent buffers (rotary tables, ...) the meta build left empty from the live model."""
    live_buffers = dict(live.named_buffers())
    for name, buf in list(clean.named_buffers()):
        if buf.device.type != "meta":
            continue
        source = live_buffers.get(name)
        if source is None:
            raise ValueError(f"cannot rebuild buffer {name} of the exported model")
        owner_name, _, attr = name.rpartition(".")
        owner = clean.get_submodule(owner_name) if owner_name else clean
        persistent = attr not in owner._non_persistent_buffers_set
        owner.register_buffer(attr, source.detach().clone(), persistent=persistent)
