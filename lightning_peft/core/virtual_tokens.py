"""Input rewriting shared by the methods that add virtual tokens (prompt and prefix tuning).

Both methods make a model attend to ``P`` positions the user never passed, so the user's
``attention_mask`` (and, for prompt tuning, ``position_ids`` and ``token_type_ids``) must
grow by ``P`` entries, and a KV-cached generation step must know that the cache already
holds them. These helpers do that on the keyword arguments of a Hugging Face ``forward``,
typically from a ``register_forward_pre_hook(..., with_kwargs=True)`` hook.

All helpers are pure functions of tensors: they never modify their inputs in place.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

CACHE_KEYS = ("cache", "past_key_values")
"""Keyword names under which Hugging Face models receive the KV cache (transformers 5
renamed ``past_key_values`` to ``cache``; both are accepted)."""

_SIGNATURES: dict[type, list[str]] = {}


def forward_parameter_names(module: nn.Module) -> list[str]:
    """Names of the positional-or-keyword parameters of ``module.forward``, in order."""
    cls = type(module)
    if cls not in _SIGNATURES:
        params = inspect.signature(module.forward).parameters.values()
        _SIGNATURES[cls] = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return _SIGNATURES[cls]


def bind_arguments(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Turn a call's positional arguments into keyword arguments (a new dict).

    Args:
        module: The module whose ``forward`` is being called.
        args: The positional arguments of the call.
        kwargs: Its keyword arguments.

    Raises:
        ValueError: If there are more positional arguments than named parameters.
    """
    names = forward_parameter_names(module)
    if len(args) > len(names):
        raise ValueError(
            f"{type(module).__name__}.forward got {len(args)} positional arguments but names only {len(names)}"
        )
    bound = dict(kwargs)
    for name, value in zip(names, args):
        bound[name] = value
    return bound


def cache_length(kwargs: dict[str, Any]) -> int:
    """Number of positions already held by the KV cache in ``kwargs`` (0 without a cache).

    Accepts a ``transformers`` ``Cache`` object under ``cache`` or ``past_key_values`` and
    the legacy tuple-of-tuples layout (``past[layer][0]``: (B, heads, S, head_dim)).
    """
    for key in CACHE_KEYS:
        cache = kwargs.get(key)
        if cache is None:
            continue
        get = getattr(cache, "get_seq_length", None)
        if callable(get):
            return int(get())
        if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
            return int(cache[0][0].shape[-2])
    return 0


def extend_attention_mask(mask: torch.Tensor | None, num: int, at: int = 0) -> torch.Tensor | None:
    """Insert ``num`` attended positions (ones) into a 2D padding mask at column ``at``.

    Args:
        mask: (B, T) padding mask (1 = attend), or ``None`` (everything attends).
        num: Number of virtual positions to add.
        at: Column before which they go (0 = on the left).

    Returns:
        (B, num + T) mask of ``mask``'s dtype, or ``None`` if ``mask`` was ``None``.

    Raises:
        ValueError: If ``mask`` is not 2D (4D masks cannot be extended without knowing the
            model's masking rules).
    """
    if mask is None:
        return None
    if mask.ndim != 2:
        raise ValueError(
            f"virtual tokens need a 2D (batch, seq) attention_mask to extend; got shape {tuple(mask.shape)}. "
            "Pass the tokenizer's padding mask instead of a prebuilt 4D mask."
        )
    ones = mask.new_ones(mask.shape[0], num)  # (B, P)
    return torch.cat([mask[:, :at], ones, mask[:, at:]], dim=1)  # (B, P + T)


def extend_position_ids(position_ids: torch.Tensor | None, num: int, at: int = 0) -> torch.Tensor | None:
    """Insert ``num`` consecutive positions at column ``at`` and shift the later ones by ``num``.

    The virtual positions continue from the position before ``at`` (or start at the first
    position when ``at == 0``), so ``arange(T)`` becomes ``arange(num + T)``.

    Args:
        position_ids: (..., T) positions (any leading dims), or ``None``.
        num: Number of virtual positions.
        at: Column before which they go.

    Returns:
        (..., num + T) positions, or ``None``.
    """
    if position_ids is None:
        return None
    start = position_ids[..., :1] if at == 0 else position_ids[..., at - 1 : at] + 1  # (..., 1)
    steps = torch.arange(num, device=position_ids.device, dtype=position_ids.dtype)  # (P,)
    virtual = start + steps  # (..., P)
    return torch.cat([position_ids[..., :at], virtual, position_ids[..., at:] + num], dim=-1)


def shift_position_ids(position_ids: torch.Tensor | None, num: int) -> torch.Tensor | None:
    """Positions of new tokens in a cached step, after ``num`` virtual positions (``+ num``)."""
    return None if position_ids is None else position_ids + num


def extend_token_type_ids(token_type_ids: torch.Tensor | None, num: int, at: int = 0) -> torch.Tensor | None:
    """Insert ``num`` columns at ``at`` carrying the first token's segment id.

    Args:
        token_type_ids: (B, T) segment ids, or ``None``.
        num: Number of virtual positions.
        at: Column before which they go.

    Returns:
        (B, num + T) segment ids, or ``None``.
    """
    if token_type_ids is None:
        return None
    first = token_type_ids[:, :1].expand(-1, num)  # (B, P)
    return torch.cat([token_type_ids[:, :at], first, token_type_ids[:, at:]], dim=1)


def is_causal(model: nn.Module) -> bool:
    """Whether ``model``'s self-attention is causal (decoders) rather than bidirectional (encoders).

    Reads the ``is_causal`` attribute Hugging Face attention modules carry; without one,
    falls back to ``config.is_decoder`` and to whether the model can generate.
    """
    flags = [m.is_causal for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    if flags:
        return any(flags)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "is_decoder", False):
        return True
    can_generate = getattr(model, "can_generate", None)
    return bool(can_generate()) if callable(can_generate) else False
