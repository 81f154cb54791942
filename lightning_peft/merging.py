"""Fold trained deltas into the base weights: ``merge``, ``unmerge`` and the merged state dict.

``merge``/``unmerge`` change the live model in place (fast inference with no adapter
path, then back to training); each adapter folds itself through its method's contract
hooks. :func:`merged_state_dict` leaves the live model alone and builds the tensors a plain
Hugging Face model would hold with every active adapter folded in (4-bit layers
dequantized): :func:`lightning_peft.export_merged` writes them as a ``save_pretrained`` folder.

Quantized (4-bit) bases: ``merge`` refuses (folding a full-precision update into 4-bit
codes needs re-quantization, which loses most of the update); :func:`merged_state_dict`
dequantizes and folds in full precision.
"""

from __future__ import annotations

import torch
from torch import nn

from .core.layers import dense_weight, is_4bit, is_conv1d
from .core.ownership import AdapterPart, LayerWrapper, unwrapped
from .core.sharded import WRAPPER_SEGMENTS, full_tensor, unwrapped_name
from .methods.base import Method, applied_methods, find_record
from .progress import progress_bar

__all__ = ["active_adapters", "merge", "merged_state_dict", "unmerge"]


def _require_methods(obj: nn.Module, action: str) -> list[Method]:
    methods = applied_methods(obj)
    if not methods:
        raise ValueError(
            f"no fine-tuning method is applied to this {type(obj).__name__}: nothing to {action}. "
            "Apply one first, e.g. LoRA(r=8).apply(model) or Trainer(callbacks=[LoRA()])."
        )
    return methods


def active_adapters(obj: nn.Module) -> list[Method]:
    """The method configs of the adapters active in ``obj``'s forward, in the order they were added."""
    record = find_record(obj)
    if record is None:
        return []
    return [c for c in record.configs if c.adapter_name in record.active]


def merge(obj: nn.Module) -> nn.Module:
    """Fold every active adapter into the base weights, in place.

    Idempotent: merging a merged model changes nothing. While merged, adapted layers run
    only their base path. Each adapter checks all its layers before changing any.

    Args:
        obj: A LightningModule or plain ``nn.Module`` a method was applied to.

    Returns:
        ``obj``.

    Raises:
        ValueError: If no method is applied. :class:`~lightning_peft.methods.base.MethodError`
            (a ``ValueError``) if an adapter cannot merge (a bottleneck adapter, a prompt),
            a delta is not finite, or a base layer is quantized (use ``export_merged``).
    """
    _require_methods(obj, "merge")
    done: list[Method] = []
    try:
        for method in active_adapters(obj):
            method.merge(obj)  # each adapter checks all its layers before changing any
            done.append(method)
    except Exception:
        for method in reversed(done):  # all or nothing across adapters too
            method.unmerge(obj)
        raise
    return obj


def unmerge(obj: nn.Module) -> nn.Module:
    """Undo :func:`merge` (a no-op for adapters that are not merged); returns ``obj``."""
    for method in reversed(_require_methods(obj, "unmerge")):
        method.unmerge(obj)
    return obj


def merged_state_dict(
    obj: nn.Module,
    dtype: torch.dtype = torch.float32,
    reference: nn.Module | None = None,
    *,
    within: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """The state dict ``obj`` would have as a plain model, every active adapter folded in.

    Layers an adapter wraps become their base layer's ``weight``/``bias`` as the method's
    :meth:`~lightning_peft.methods.base.Method.folded_layers` gives them; other 4-bit layers
    are dequantized; floating tensors are cast to ``dtype``. New tensors are built; the live
    model is not modified. Inactive adapters are left out.

    Args:
        obj: The adapted model (or the Hugging Face model inside it).
        dtype: dtype of the floating tensors.
        reference: A plain model of the same architecture as ``within`` (may be on ``meta``)
            deciding each folded weight's layout: ``(in, out)`` where it has a ``Conv1D``.
            Default: the live base layer's layout (a 4-bit layer counts as ``nn.Linear``).
        within: The submodule of ``obj`` to describe (e.g. the Hugging Face model inside a
            LightningModule), names relative to it; default ``obj`` itself. The levels FSDP1
            units and checkpoint wrappers insert are left out of the names (gather FSDP1 units
            first: :func:`lightning_peft.persistence.state.full_parameters`).

    Raises:
        lightning_peft.methods.MethodError: If an active adapter has nothing a plain model could hold.
    """
    within = obj if within is None else within
    prefix = next((f"{n}." for n, m in obj.named_modules() if m is within and n), "")
    folded: dict[str, dict[str, torch.Tensor]] = {}
    for method in active_adapters(obj):
        for name, tensors in method.folded_layers(obj, dtype).items():
            if name.startswith(prefix):
                folded[unwrapped_name(name[len(prefix) :])] = tensors
    out: dict[str, torch.Tensor] = {}

    def cast(t: torch.Tensor) -> torch.Tensor:
        t = full_tensor(t)  # an FSDP2 shard is gathered (a collective)
        return t.to(dtype).clone() if t.is_floating_point() else t.clone()

    def layout(name: str, live: nn.Module) -> bool:
        return is_conv1d(reference.get_submodule(name) if reference is not None else live)

    bar = progress_bar(desc="Merging", total=sum(1 for _ in within.modules()), unit="module")

    def visit(module: nn.Module, prefix: str) -> None:
        bar.update()
        if isinstance(module, AdapterPart):
            return  # folded by its method (active) or left out (inactive)
        name = prefix[:-1]
        base = unwrapped(module)
        if name in folded or is_4bit(base):
            tensors = folded.get(name)
            if tensors is None:  # a 4-bit layer no active adapter folds: dequantize it
                tensors = {"weight": dense_weight(base, dtype)}
                if getattr(base, "bias", None) is not None:
                    tensors["bias"] = cast(base.bias)
            weight = tensors["weight"]  # (out, in)
            out[prefix + "weight"] = weight.T.contiguous() if layout(name, base) else weight.contiguous()
            for key, value in tensors.items():
                if key != "weight":
                    out[prefix + key] = cast(value)
            return
        if isinstance(module, LayerWrapper):  # an inactive adapter's wrapper: the plain layer
            visit(module.base_layer, prefix)
            return
        for pname, param in module.named_parameters(recurse=False):
            out[prefix + pname] = cast(param)
        for bname, buf in module.named_buffers(recurse=False):
            if buf is not None and bname not in module._non_persistent_buffers_set:
                out[prefix + bname] = cast(buf)
        for child_name, child in module.named_children():
            # FSDP1 units and checkpoint wrappers add a level that plain models do not have
            visit(child, prefix if f"{child_name}." in WRAPPER_SEGMENTS else f"{prefix}{child_name}.")

    visit(within, "")
    bar.update(max(bar.total - bar.n, 0))  # subtrees folded or skipped as a whole
    bar.close()
    return out
