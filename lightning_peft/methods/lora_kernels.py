"""LoRA's per-adapter weights and the kernels that add their update to a layer's output.

Kept apart from :mod:`lightning_peft.methods.lora` (the method and its layer) so that each
file is read in one sitting. See that module for the papers.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.layers import dense_weight
from ..core.ownership import AdapterPart, declare_trainable
from ..core.sharded import full_tensor

__all__ = [
    "LoRAWeights",
    "check_names",
    "dora_contribution",
    "keep_mask",
    "low_rank_forward",
    "routed_low_rank",
]


def check_names(value: Any, what: str, allow_all_linear: bool) -> str | list[str] | None:
    """Validate a target list argument: a regex string, a non-empty list of names, or ``"all-linear"``."""
    if value is None:
        return None
    if isinstance(value, str):
        if value == "all-linear" and not allow_all_linear:
            raise ValueError(f"{what}='all-linear' is only allowed for target_modules; give names or a regex")
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise ValueError(
        f"{what} must be a regular expression string, a non-empty list of module names"
        f"{', or all-linear' if allow_all_linear else ''}; got {value!r}"
    )


def _param_dtype(layer: nn.Module) -> torch.dtype:
    """The adapter parameters' dtype: the layer's, or fp32 if it is quantized.

    Over a 4-bit base the adapters train in fp32 (QLoRA), so they are initialized in fp32:
    the same values whether the method meets the base before or after quantization.
    """
    weight = layer.weight
    if weight.dtype.is_floating_point and getattr(weight, "quant_state", None) is None:
        return weight.dtype
    return torch.float32


class LoRAWeights(AdapterPart):
    """One adapter's ``A`` (r, in), ``B`` (out, r) and, for DoRA, magnitude (out,) on one layer.

    Args:
        adapter_name: The adapter.
        in_features: Input width of the layer.
        out_features: Output width.
        r: Rank.
        scale: ``alpha / r`` (or ``alpha / sqrt(r)``).
        dropout: Dropout probability on the adapter's input.
        use_dora: Add the DoRA magnitude, initialized to the base's row norms.
        base: The layer adapted (for device, dtype and DoRA's initial magnitude).
    """

    def __init__(
        self,
        adapter_name: str,
        in_features: int,
        out_features: int,
        r: int,
        scale: float,
        dropout: float,
        use_dora: bool,
        base: nn.Module,
    ) -> None:
        super().__init__(adapter_name)
        device, dtype = base.weight.device, _param_dtype(base)
        self.r = r
        self.scale = float(scale)
        self.dropout_p = float(dropout)
        self.merge_factor: torch.Tensor | None = None  # DoRA: m / ||W + sBA|| of the merge
        self.lora_a = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))  # (r, in)
        self.lora_b = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=dtype))  # (out, r)
        if device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # what nn.Linear does for its weight
        if use_dora:
            if device.type == "meta":
                norm = torch.empty(out_features, device=device, dtype=dtype)
            else:
                with torch.no_grad():
                    norm = torch.linalg.vector_norm(dense_weight(base).to(dtype), dim=1)  # (out,)
            self.magnitude: nn.Parameter | None = nn.Parameter(norm.to(device))
        else:
            self.magnitude = None
        self.train(base.training)
        declare_trainable(self, adapter=adapter_name)

    def extra_repr(self) -> str:
        """Rank, scale, dropout, DoRA, merged, active."""
        dora = ", dora" if self.magnitude is not None else ""
        return (
            f"r={self.r}, scale={self.scale:g}, dropout={self.dropout_p:g}{dora}, "
            f"merged={self.merged}, active={self.active}"
        )

    def dropping(self) -> bool:
        """Whether this adapter drops inputs in the current forward (training with dropout)."""
        return self.training and self.dropout_p > 0.0

    def delta_weight(self) -> torch.Tensor:
        """``s * B @ A`` as an ``(out, in)`` tensor in the adapter's dtype, detached.

        FSDP2 shards (``DTensor``) are gathered first (a collective: call it on every rank).
        """
        return (full_tensor(self.lora_b) @ full_tensor(self.lora_a)) * self.scale


# --------------------------------------------------------------------------- dropout path
def keep_mask(like: torch.Tensor, keep: float) -> torch.Tensor:
    """A bool mask shaped like ``like`` whose entries are ``True`` with probability ``keep``.

    On CPU, drawing one float per element (what ``torch.nn.functional.dropout`` does) costs
    more than the adapter's matmuls. Here each 64-bit draw of the generator gives four
    independent 16-bit uniforms, which is about five times faster; ``keep`` is rounded to a
    multiple of 2**-16 (an error below 8e-6). Seeded by the global torch generator as usual.
    """
    n = like.numel()
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=like.device)
    draws = words.view(torch.int16)[:n].view(like.shape)  # uniform over the int16 range
    return draws < round(keep * 65536) - 32768


class DroppedLowRank(torch.autograd.Function):
    """``result + s * B A dropout(x)`` keeping only the 1-byte mask for backward.

    Autograd would save the dropped copy of ``x`` (4 bytes per element in fp32) for the
    gradient of ``A``; here the input ``x`` itself is saved (the caller's graph holds it
    anyway) and the dropped copy is rebuilt from the mask in backward.
    """

    @staticmethod
    def forward(ctx: Any, x, result, a, b, p: float, scale: float):  # noqa: D102
        if x.device.type == "cpu":
            mask = keep_mask(x, 1.0 - p)  # bool (..., in)
            dropped = torch.ops.aten.native_dropout_backward(x, mask, 1.0 / (1.0 - p))  # x * mask / (1-p)
        else:  # one fused kernel on accelerators
            dropped, mask = torch.native_dropout(x, p, True)  # (..., in), bool mask (..., in)
        h = F.linear(dropped, a)  # (..., r)
        del dropped
        out_f = result.shape[-1]
        out = torch.addmm(result.reshape(-1, out_f), h.reshape(-1, h.shape[-1]), b.t(), alpha=scale)
        ctx.save_for_backward(x, mask, a, b, h)
        ctx.p, ctx.scale = p, scale
        return out.view(result.shape)  # (..., out)

    @staticmethod
    def backward(ctx: Any, grad):  # noqa: D102
        x, mask, a, b, h = ctx.saved_tensors
        keep = 1.0 / (1.0 - ctx.p)
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        h2 = h.reshape(-1, h.shape[-1])  # (N, r)
        grad_h = torch.mm(g, b).mul_(ctx.scale)  # (N, r)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[3]:
            grad_b = torch.mm(g.t(), h2).mul_(ctx.scale)  # (out, r)
        if ctx.needs_input_grad[2]:
            dropped = torch.ops.aten.native_dropout_backward(x, mask, keep)  # (..., in)
            grad_a = torch.mm(grad_h.t(), dropped.reshape(-1, dropped.shape[-1]))  # (r, in)
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.native_dropout_backward(
                torch.mm(grad_h, a).view(x.shape), mask, keep
            )  # (..., in)
        return grad_x, grad if ctx.needs_input_grad[1] else None, grad_a, grad_b, None, None


def _row_mask(weights: LoRAWeights, like: torch.Tensor) -> torch.Tensor | None:
    """``(B, 1, ..., 1)`` 0/1 multiplier of the rows this adapter serves, or ``None`` for all rows."""
    rows = weights.rows
    if rows is None:
        return None
    shape = (rows.shape[0],) + (1,) * (like.ndim - 1)
    return rows.to(device=like.device, dtype=like.dtype).view(shape)


def low_rank_forward(
    weights: LoRAWeights, x: torch.Tensor, result: torch.Tensor, inplace: bool = False
) -> torch.Tensor:
    """``result + s * B A dropout(x)`` in the compute dtype, returned in ``result``'s dtype.

    Args:
        weights: The adapter.
        x: The layer input, ``(..., in)``.
        result: What the layer computed so far, ``(..., out)``.
        inplace: Add into ``result`` (when nothing else reads it and no gradient is taken):
            on CPU a fresh output costs more than the adapter's products.
    """
    a, b = weights.lora_a, weights.lora_b
    out_dtype = result.dtype
    device_type = x.device.type
    autocast = torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type) if autocast else a.dtype
    if x.dtype != dtype:
        x = x.to(dtype)
    rows = _row_mask(weights, x)
    if rows is not None:
        x = x * rows  # rows of other adapters add nothing
    start = result if result.dtype == dtype else result.to(dtype)
    p = weights.dropout_p if weights.training else 0.0
    if p > 0.0:
        if a.dtype != dtype:
            a, b = a.to(dtype), b.to(dtype)
        with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
            out = DroppedLowRank.apply(x, start, a, b, p, weights.scale)
    else:
        h = F.linear(x, a)  # (..., r)
        # result + scale * h @ B^T in one fused kernel: no separate scale and add passes
        flat = start.reshape(-1, start.shape[-1])  # (N, out)
        if inplace:  # into result itself, or into reshape's copy of it
            out = flat.addmm_(h.reshape(-1, weights.r), b.t(), alpha=weights.scale).view(start.shape)
        else:
            out = torch.addmm(flat, h.reshape(-1, weights.r), b.t(), alpha=weights.scale).view(start.shape)
    return out if out.dtype == out_dtype else out.to(out_dtype)


def _routed_factors(
    parts: list[LoRAWeights], x: torch.Tensor, dtype: torch.dtype, cache: dict | None
) -> dict:
    """The routed adapters' factors stacked, each row's slot, and how the rows are served.

    Returns a dict with ``a`` ``(K+1, rank, in)`` and ``b_flat`` ``(out, (K+1) rank)`` (slot 0
    zeros for rows of no adapter; ranks zero-padded to the largest; scales folded into
    ``B``), ``keep`` ``(B, (K+1) rank)`` (1 on each row's own adapter), and either each row's
    own factors ``rows_at`` ``(B, in, rank)`` and ``rows_b`` ``(B, out, rank)`` when there are
    no more rows than slots (then no larger than the stack), or the rows of some adapter
    grouped by slot, ``grouped`` ``(M,)``, with each slot's ``(slot, start, end)`` in it,
    ``groups``. Without gradients all of it is kept in ``cache``: the factors until an
    adapter's weights, scale or dtype change, the rest until the routing changes, so serving
    builds them once per layer, not per forward.
    """
    grad = torch.is_grad_enabled() and any(p.lora_a.requires_grad or p.lora_b.requires_grad for p in parts)
    store = cache if cache is not None and not grad else {}
    key = tuple(
        (id(p), p.lora_a.data_ptr(), p.lora_a._version, p.lora_b._version, p.scale, p.r) for p in parts
    )
    key += (dtype, x.device)
    if store.get("key") != key:
        rank = max(p.r for p in parts)
        in_f, out_f = parts[0].lora_a.shape[1], parts[0].lora_b.shape[0]
        a_stack = [x.new_zeros(rank, in_f, dtype=dtype)]
        b_stack = [x.new_zeros(out_f, rank, dtype=dtype)]
        for part in parts:
            a_stack.append(F.pad(part.lora_a.to(dtype), (0, 0, 0, rank - part.r)))  # (rank, in)
            b_stack.append(F.pad(part.lora_b.to(dtype) * part.scale, (0, rank - part.r)))  # (out, rank)
        store.clear()
        store.update(key=key, a=torch.stack(a_stack), b_flat=torch.cat(b_stack, dim=1))
    routing = [p.rows for p in parts]
    known = store.get("routing")
    if known is None or len(known) != len(routing) or any(r is not k for r, k in zip(routing, known)):
        slot = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)  # (B,)
        for k, rows in enumerate(routing, start=1):
            slot = torch.where(rows.to(x.device), k, slot)
        slots, rank = store["a"].shape[:2]
        keep = F.one_hot(slot, slots).to(dtype).repeat_interleave(rank, dim=1)  # (B, (K+1) rank)
        store.update(routing=routing, slot=slot, keep=keep, rows_at=None, rows_b=None)
        if x.shape[0] <= slots:
            out_f = store["b_flat"].shape[0]
            store["rows_at"] = store["a"][slot].transpose(1, 2).contiguous()
            store["rows_b"] = store["b_flat"].view(out_f, slots, rank).permute(1, 0, 2)[slot]
        else:
            order = torch.argsort(slot, stable=True)  # rows grouped by slot, base rows first
            counts = torch.bincount(slot, minlength=slots).tolist()
            starts = list(itertools.accumulate(counts[1:], initial=0))  # in the adapter rows
            store["grouped"] = order[counts[0] :]
            store["groups"] = [(k, starts[k - 1], starts[k]) for k in range(1, slots) if counts[k]]
    return store


def routed_low_rank(
    parts: list[LoRAWeights],
    x: torch.Tensor,
    result: torch.Tensor,
    cache: dict | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    """``result`` plus, for every row, the update of the adapter routed to it: two batched products.

    Serving many tasks in one batch: rather than one small product per adapter over its
    sub-batch, the factors of all routed adapters are stacked (ranks zero-padded to the
    largest, scales folded into ``B``, a zero slot for rows of no adapter). With one token
    per row (a generation step) every row meets every adapter's ``A`` in one product and
    keeps its own adapter's slice before one product with all the ``B``; with longer rows
    and no more rows than slots each row takes its own factors and ``bmm`` computes every
    row's ``B A x``; with more rows, the rows are grouped by adapter once per routing and each
    adapter's two products run over its group.

    Args:
        parts: Routed adapters of one layer (each with a ``rows`` mask; masks are disjoint).
        x: The layer input, ``(B, ..., in)``.
        result: The base output, ``(B, ..., out)``.
        cache: A dict the layer keeps for the stacked factors (used without gradients).
        inplace: Add into ``result`` (when nothing else reads it and no gradient is taken).
    """
    batch, in_f, out_f = x.shape[0], x.shape[-1], result.shape[-1]
    device_type = x.device.type
    dtype = (
        torch.get_autocast_dtype(device_type)
        if torch.is_autocast_enabled(device_type)
        else parts[0].lora_a.dtype
    )
    f = _routed_factors(parts, x, dtype, cache)
    xs = x.reshape(batch, -1, in_f).to(dtype)  # (B, T, in)
    start = result.reshape(batch, -1, out_f).to(dtype)  # (B, T, out)
    if xs.shape[1] == 1:
        h = torch.mm(xs[:, 0], f["a"].view(-1, in_f).t()).mul_(f["keep"])  # (B, (K+1) rank): own adapter only
        if inplace:
            out = start[:, 0].addmm_(h, f["b_flat"].t()).unsqueeze(1)  # (B, 1, out)
        else:
            out = torch.addmm(start[:, 0], h, f["b_flat"].t()).unsqueeze(1)
    elif f["rows_at"] is not None:  # each row's own factors, kept: two bmm
        h = torch.bmm(xs, f["rows_at"])  # (B, T, rank)
        if inplace:
            out = start.baddbmm_(h, f["rows_b"].transpose(1, 2))  # (B, T, out)
        else:
            out = torch.baddbmm(start, h, f["rows_b"].transpose(1, 2))
    else:  # more rows than adapters: one pair of products per adapter over its rows
        rows, slot_b = f["grouped"], f["b_flat"].view(out_f, -1, f["a"].shape[1])  # (out, K+1, rank)
        xg = xs.index_select(0, rows)  # (M, T, in), grouped by adapter

        def update(k: int, s: int, e: int) -> torch.Tensor:  # (e - s, T, out)
            return F.linear(F.linear(xg[s:e], f["a"][k]), slot_b[:, k])

        if inplace:
            for k, s, e in f["groups"]:
                start.index_add_(0, rows[s:e], update(k, s, e))
            out = start
        else:
            out = start.index_add(0, rows, torch.cat([update(*group) for group in f["groups"]]))
    return out.to(result.dtype).view(result.shape)


def dora_contribution(
    weights: LoRAWeights, base: nn.Module, x: torch.Tensor, base_out: torch.Tensor
) -> torch.Tensor:
    """What a DoRA adapter adds to the base output: ``(g - 1) W x + g s B A dropout(x)``.

    ``g = m / ||W + s B A||_row`` with the norm a constant for the gradient (DoRA, section 4.3).

    Args:
        weights: The adapter (with a magnitude).
        base: The base layer (its weight is read, dequantized if 4-bit).
        x: The layer input, ``(..., in)``.
        base_out: The base layer's output ``W x + bias``, ``(..., out)``.
    """
    a, b = weights.lora_a, weights.lora_b
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else a.dtype
    h = x.to(dtype)
    with torch.no_grad():
        weight = dense_weight(base).to(a.dtype)  # (out, in)
        norm = torch.linalg.vector_norm(torch.addmm(weight, b, a, alpha=weights.scale), dim=1)  # (out,)
    g = weights.magnitude / norm  # (out,)
    p = weights.dropout_p if weights.training else 0.0
    if p > 0.0:
        h = F.dropout(h, p, True)
    low_rank = F.linear(F.linear(h, a.to(dtype)), b.to(dtype)) * weights.scale  # (..., out)
    bias = getattr(base, "bias", None)
    linear = base_out if bias is None else base_out - bias  # W x, (..., out)
    out = (g - 1) * linear.to(g.dtype) + g * low_rank.to(g.dtype)  # written so that g == 1 adds nothing
    rows = _row_mask(weights, out)
    if rows is not None:
        out = out * rows
    return out.to(base_out.dtype)
