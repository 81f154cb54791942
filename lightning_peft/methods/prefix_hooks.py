"""The machinery of prefix tuning: a bank of per-adapter prefixes and the hooks that attach them.

A forward pre-hook on each self-attention module hands it a thin cache object: attention
modules give their freshly projected (and, with RoPE, rotated) keys and values to
``cache.update`` and attend over whatever it returns; ours forwards to the model's real
cache, when there is one, and returns the result with the active adapters' prefix rows in
front. The same hook adds always-attended columns to the layer's 4D attention mask. A
pre-hook on the model that embeds positions moves a causal decoder's real tokens behind the
prefix. See :mod:`lightning_peft.methods.prefix` for the method and the paper.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.targeting import find_block_list
from ..core.virtual_tokens import CACHE_KEYS, bind_arguments, cache_length, forward_parameter_names

SUPPORTED_ATTENTION = ("eager", "sdpa")
"""Attention implementations (``config._attn_implementation``) whose masks are extended."""

__all__ = [
    "SUPPORTED_ATTENTION",
    "AttentionHook",
    "PositionHook",
    "PrefixBank",
    "accepts_cache",
    "find_attention_layers",
    "kv_shape",
    "position_owner",
]


class PrefixBank(nn.ModuleDict):
    """The prefixes of every adapter of one model, by adapter name, and what the hooks read.

    Attributes:
        shift_positions: Whether the real tokens of a causal decoder move behind the prefix.
        recording: While set, the hooks record each layer's keys and values there instead
            of adding prefixes (used to initialize prefixes from the model's activations).
    """

    def __init__(self) -> None:
        super().__init__()
        self.shift_positions = False
        self.recording: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None

    def serving(self) -> list[nn.Module]:
        """The encoders taking part in the current forward, in the order they were added."""
        return [encoder for encoder in self.values() if encoder.serves()]

    def num_tokens(self) -> int:
        """Prefix rows in front of every layer's keys for the current forward."""
        return sum(encoder.num_virtual_tokens for encoder in self.serving())

    def layer(self, index: int, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of attention layer ``index``: two (B, kv_heads, P, head_dim) tensors."""
        keys, values = [], []
        for encoder in self.serving():
            key, value = encoder.layer(index, dtype=dtype)  # (Hkv, P, D) each
            key, value = (
                key.unsqueeze(0).expand(batch, -1, -1, -1),
                value.unsqueeze(0).expand(batch, -1, -1, -1),
            )
            if encoder.rows is not None:  # rows of other adapters attend to zero rows, masked out
                keep = encoder.rows.to(device=key.device, dtype=key.dtype).view(batch, 1, 1, 1)
                key, value = key * keep, value * keep
            keys.append(key)
            values.append(value)
        return torch.cat(keys, dim=2), torch.cat(values, dim=2)

    def position_shift(self, batch: int) -> int | torch.Tensor:
        """How far each row's real tokens move: the prefix rows it attends (an int, or ``(B, 1)``)."""
        serving = self.serving()
        if all(encoder.rows is None for encoder in serving):
            return sum(encoder.num_virtual_tokens for encoder in serving)
        shift = torch.zeros(batch, 1, dtype=torch.long)
        for encoder in serving:
            rows = encoder.rows if encoder.rows is not None else torch.ones(batch, dtype=torch.bool)
            shift += rows.long().cpu().view(batch, 1) * encoder.num_virtual_tokens
        return shift

    def masked_columns(self, batch: int) -> torch.Tensor | None:
        """``(B, P)`` bool: prefix columns a row must not attend (another adapter's), or ``None``."""
        serving = self.serving()
        if all(encoder.rows is None for encoder in serving):
            return None
        columns = []
        for encoder in serving:
            rows = encoder.rows if encoder.rows is not None else torch.ones(batch, dtype=torch.bool)
            columns.append((~rows.bool()).unsqueeze(1).expand(-1, encoder.num_virtual_tokens))
        return torch.cat(columns, dim=1)


class PrefixedCache:
    """Stands in for a layer's KV cache: real entries go to ``inner``, the prefix goes in front.

    Args:
        inner: The model's cache, or ``None`` when it runs without one.
        key: (B, kv_heads, P, head_dim) prefix keys.
        value: (B, kv_heads, P, head_dim) prefix values.
        record: When given, the first sample's keys and values are stored there under
            ``layer`` and no prefix is added.
        layer: Index of the attention layer (for ``record``).
    """

    def __init__(
        self,
        inner: Any,
        key: torch.Tensor | None,
        value: torch.Tensor | None,
        record: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
        layer: int = 0,
    ) -> None:
        self.inner = inner
        self.key = key
        self.value = value
        self.record = record
        self.layer = layer

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Update the real cache, then return (B, kv_heads, P + S, head_dim) keys and values."""
        if self.inner is not None:
            key_states, value_states = self.inner.update(key_states, value_states, layer_idx, *args, **kwargs)
        if self.record is not None:
            self.record[self.layer] = (key_states[0].detach(), value_states[0].detach())
            return key_states, value_states
        key = self.key.to(key_states.dtype)  # (B, Hkv, P, D)
        value = self.value.to(value_states.dtype)
        return torch.cat([key, key_states], dim=2), torch.cat([value, value_states], dim=2)

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)


def prefix_mask(
    mask: Any,
    num: int,
    q_len: int,
    kv_len: int,
    causal: bool,
    implementation: str,
    masked: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Add ``num`` prefix key columns in front of a layer's attention mask.

    Args:
        mask: The 4D mask the layer received: bool (True = attend) or additive float, of
            shape (B or 1, 1 or heads, q_len, kv_len); or ``None``.
        num: Number of prefix rows ``P``.
        q_len: Number of query positions.
        kv_len: Number of real key positions (cache included).
        causal: Whether the layer is causal.
        implementation: ``config._attn_implementation``.
        masked: ``(B, P)`` bool, prefix columns a row must not attend (per-row routing);
            ``None`` when every row attends every prefix column.

    Returns:
        The mask with shape (..., q_len, P + kv_len), or ``None`` when everything attends.
    """
    if mask is None:
        # SDPA reads ``None`` on a causal layer as "causal, aligned top-left" (is_causal=True)
        # for more than one query; with prefix columns that must become an explicit mask.
        if masked is None and not (causal and implementation == "sdpa" and q_len > 1):
            return None
        rows = torch.arange(q_len)[:, None] + (kv_len - q_len)  # (q, 1): positions of the queries
        cols = torch.arange(kv_len)[None, :]  # (1, kv)
        real = cols <= rows if causal else torch.ones(q_len, kv_len, dtype=torch.bool)  # (q, kv)
        mask = real.view(1, 1, q_len, kv_len)
    if not isinstance(mask, torch.Tensor) or mask.ndim != 4:
        raise ValueError(
            f"prefix tuning extends 4D attention masks; this layer got {type(mask).__name__} "
            f"{tuple(getattr(mask, 'shape', ()))}. Use attn_implementation 'sdpa' or 'eager'."
        )
    if masked is not None:
        mask = mask.expand(masked.shape[0], *mask.shape[1:])
    if mask.dtype == torch.bool:
        extra = mask.new_ones(*mask.shape[:-1], num)  # (B, h, q, P)
        if masked is not None:
            extra = extra & ~masked.to(mask.device)[:, None, None, :]
    else:
        extra = mask.new_zeros(*mask.shape[:-1], num)
        if masked is not None:
            blocked = masked.to(mask.device)[:, None, None, :].expand_as(extra)
            extra = extra.masked_fill(blocked, torch.finfo(mask.dtype).min)
    return torch.cat([extra, mask], dim=-1)  # (B, h, q, P + kv)


class AttentionHook:
    """Forward pre-hook of one self-attention module: prefix cache and extended mask."""

    def __init__(self, bank: PrefixBank, layer: int, cache_key: str) -> None:
        self.bank = bank
        self.layer = layer
        self.cache_key = cache_key

    def __call__(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """Hand the attention module the prefixed cache and the extended mask (``None``: unchanged)."""
        record = self.bank.recording
        num = 0 if record is not None else self.bank.num_tokens()
        if record is None and num == 0:
            return None  # no prefix takes part: the layer runs as in the base model
        kw = bind_arguments(module, args, kwargs)
        inner = None
        for key in CACHE_KEYS:
            given = kw.pop(key, None)
            inner = given if given is not None else inner
        if record is not None:
            kw[self.cache_key] = PrefixedCache(inner, None, None, record, self.layer)
            return (), kw
        config = getattr(module, "config", None)
        implementation = getattr(config, "_attn_implementation", None) or "eager"
        if implementation not in SUPPORTED_ATTENTION:
            raise RuntimeError(
                f"prefix tuning supports attn_implementation {list(SUPPORTED_ATTENTION)}, but "
                f"{type(module).__name__} runs {implementation!r}; load the model with "
                "attn_implementation='sdpa' (or call model.set_attn_implementation('sdpa'))"
            )
        hidden = kw[forward_parameter_names(module)[0]]  # (B, T, hidden)
        batch, q_len = hidden.shape[:2]
        kv_len = q_len
        if inner is not None:
            sizes = getattr(inner, "get_mask_sizes", None)
            layer_idx = getattr(module, "layer_idx", None)
            layer_idx = self.layer if layer_idx is None else layer_idx
            kv_len = int(sizes(q_len, layer_idx)[0]) if callable(sizes) else inner.get_seq_length() + q_len
        causal = bool(getattr(module, "is_causal", False)) and kw.get("is_causal", True) is not False
        kw["attention_mask"] = prefix_mask(
            kw.get("attention_mask"),
            num,
            q_len,
            kv_len,
            causal,
            implementation,
            self.bank.masked_columns(batch),
        )
        if isinstance(kw["attention_mask"], torch.Tensor):
            kw["attention_mask"] = kw["attention_mask"].to(hidden.device)
        key, value = self.bank.layer(self.layer, batch, hidden.dtype)  # (B, Hkv, P, D) each
        kw[self.cache_key] = PrefixedCache(inner, key, value)
        return (), kw


class PositionHook:
    """Forward pre-hook of a causal model's base: real tokens start at position ``P``."""

    def __init__(self, bank: PrefixBank) -> None:
        self.bank = bank

    def __call__(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """Shift the positions of the real tokens behind the prefix (``None``: unchanged)."""
        if self.bank.recording is not None or not self.bank.shift_positions:
            return None
        if self.bank.num_tokens() == 0:
            return None
        kw = bind_arguments(module, args, kwargs)
        positions = kw.get("position_ids")
        ref = kw.get("input_ids")
        ref = kw.get("inputs_embeds") if ref is None else ref
        if positions is None:
            if ref is None:
                return None  # let the model raise its own error
            past = cache_length(kw)
            positions = torch.arange(past, past + ref.shape[1], device=ref.device).unsqueeze(0)  # (1, T)
        batch = ref.shape[0] if ref is not None else positions.shape[0]
        shift = self.bank.position_shift(batch)
        kw["position_ids"] = positions + (
            shift.to(positions.device) if isinstance(shift, torch.Tensor) else shift
        )
        return (), kw


# --------------------------------------------------------------------------- structure
def accepts_cache(module: nn.Module) -> str | None:
    """The keyword under which ``module.forward`` takes a KV cache, if it also takes ``attention_mask``."""
    names = forward_parameter_names(module)
    if "attention_mask" not in names:
        return None
    return next((key for key in CACHE_KEYS if key in names), None)


def is_cross_attention(module: nn.Module) -> bool:
    """Whether ``module`` is a cross-attention (its keys come from another sequence)."""
    return bool(getattr(module, "is_cross_attention", False)) or "cross" in type(module).__name__.lower()


def find_attention_layers(model: nn.Module) -> tuple[str, list[tuple[str, nn.Module]]]:
    """Return ``(block_list_name, [(name, attention), ...])``: one self-attention module per block.

    The self-attention module of a block is its innermost submodule whose ``forward`` takes
    an ``attention_mask`` and a KV cache (``cache`` or ``past_key_values``) and that is not a
    cross-attention: BERT ``attention.self``, Llama ``self_attn``, GPT-2 ``attn``.

    Raises:
        ValueError: If there is no block list, or some block has no such module or several.
    """
    try:
        list_name, blocks = find_block_list(model)
    except ValueError as err:
        raise ValueError(f"prefix tuning cannot find the attention layers: {err}") from err
    found: list[tuple[str, nn.Module]] = []
    for index, block in enumerate(blocks):
        candidates = [
            (name, m)
            for name, m in block.named_modules()
            if name and accepts_cache(m) is not None and not is_cross_attention(m)
        ]
        innermost = [
            (name, m)
            for name, m in candidates
            if not any(other.startswith(name + ".") for other, _ in candidates)
        ]
        if len(innermost) != 1:
            what = [f"{n} ({type(m).__name__})" for n, m in innermost] or ["none"]
            raise ValueError(
                f"prefix tuning needs exactly one self-attention module per block; block {list_name}.{index} "
                f"({type(block).__name__}) has {', '.join(what)}. Attention modules are found as submodules "
                "whose forward takes attention_mask and a KV cache (cache / past_key_values)."
            )
        name, module = innermost[0]
        found.append((f"{list_name}.{index}.{name}", module))
    return list_name, found


def kv_shape(attention: nn.Module) -> tuple[int, int]:
    """``(kv_heads, head_dim)`` of a Hugging Face attention module."""
    config = getattr(attention, "config", None)
    head_dim = getattr(attention, "head_dim", None) or getattr(attention, "attention_head_size", None)
    heads = (
        getattr(attention, "num_heads", None)
        or getattr(attention, "num_attention_heads", None)
        or getattr(config, "num_attention_heads", None)
    )
    kv_heads = getattr(attention, "num_key_value_heads", None) or getattr(config, "num_key_value_heads", None)
    groups = getattr(attention, "num_key_value_groups", None)
    if kv_heads is None and heads is not None:
        kv_heads = heads // groups if groups else heads
    if not head_dim or not kv_heads:
        raise ValueError(
            f"cannot read the key/value shape of {type(attention).__name__}: expected head_dim (or "
            "attention_head_size) and num_heads / num_key_value_heads attributes or config fields"
        )
    return int(kv_heads), int(head_dim)


def position_owner(backbone: nn.Module, list_name: str) -> tuple[str, nn.Module] | None:
    """The deepest module above the block list whose forward takes ``position_ids``."""
    parts = list_name.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        name = ".".join(parts[:depth])
        module = backbone.get_submodule(name) if name else backbone
        if "position_ids" in forward_parameter_names(module):
            return name, module
    return None
