"""Prefix tuning (Li and Liang 2021) for encoders and decoders alike.

Li and Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation": every
self-attention layer gets ``P`` learned key and value rows in front of the keys and values
its tokens produce; the model is frozen and only those rows train. With ``projection_dim``
the rows come from a small MLP during training (the paper's reparameterization), which is
folded into plain rows for saving and inference.

Mechanism. A forward pre-hook on each self-attention module (BERT ``attention.self``, Llama
``self_attn``, GPT-2 ``attn``: found structurally inside the repeated blocks) hands it a thin
cache object. Attention modules give their freshly projected (and, with RoPE, rotated) keys
and values to ``cache.update`` and attend over whatever it returns; ours forwards to the
model's real cache, when there is one, and returns the result with the layer's ``P`` prefix
rows in front. The same hook adds ``P`` always-attended columns to the layer's 4D attention
mask. So

- the real KV cache holds only real tokens: generation, mask sizes and ``cache.get_seq_length()``
  work unchanged, and the prefix is re-attached at every step;
- prefix keys are never rotated: they are used as they are, like keys already in a cache;
- padding masks keep masking only the padded columns; prefix columns are never masked.

Positions. In causal decoders the prefix plays the part of ``P`` tokens that came first:
a pre-hook on the model that embeds positions (``LlamaModel``, ``GPT2Model``) moves the real
tokens to positions ``P, P + 1, ...``. This is Hugging Face PEFT's convention (there the
prefix *is* the first ``P`` cache entries), so a decoder's prefixes export to PEFT's
``PREFIX_TUNING`` format and give the same logits there. Bidirectional encoders (BERT,
MiniLM) keep their positions: they have no cache to stand in for, and their position tables
were trained from 0.

Initialization. Without projection, the prefixes start as the keys and values the frozen
model itself produces for ``P`` random vocabulary tokens at positions ``0..P-1`` (the
paper's advice to initialize from real activations). A decoder then starts out computing
exactly what the base model computes on those tokens followed by the input. With
projection, the last layer of the MLP is fitted (least squares) to the same activations.
Models on the ``meta`` device get a random normal init instead.

Supported attention implementations: ``"eager"`` and ``"sdpa"`` (the defaults on CPU and
most GPUs). Flash and flex attention take masks in other layouts and are refused with a
clear error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..targeting import find_backbone, find_block_list
from ._inputs import CACHE_KEYS, bind_arguments, cache_length, forward_parameter_names
from .base import (
    _METHODS_ATTR,
    Method,
    declare_trainable,
    register,
    set_applied_methods,
    sync_requires_grad,
)

PEFT_KEY = "prompt_embeddings"
"""The one tensor name of a Hugging Face PEFT prefix-tuning checkpoint."""
SUPPORTED_ATTENTION = ("eager", "sdpa")
"""Attention implementations (``config._attn_implementation``) whose masks are extended."""
_RANDOM_STD = 0.02


# --------------------------------------------------------------------------- the prefixes
class PrefixEncoder(nn.Module):
    """The learned prefixes of every attention layer.

    The prefixes of all layers form one (P, layers * 2 * kv_width) matrix laid out as in
    Hugging Face PEFT: for layer ``l`` the keys are columns ``2l * kv_width`` onwards and the
    values the next ``kv_width`` columns, each row reading as (kv_heads, head_dim).

    Args:
        num_virtual_tokens: Number of prefix rows ``P`` per layer.
        num_layers: Number of attention layers.
        kv_heads: Key/value heads per layer (fewer than query heads under grouped-query attention).
        head_dim: Width of one head.
        hidden_size: Width of the virtual-token embeddings that feed the projection MLP.
        projection_dim: Hidden width of the MLP; ``None`` learns the prefixes directly.
        device: Device of the new parameters.
        dtype: dtype of the new parameters.
    """

    def __init__(
        self,
        num_virtual_tokens: int,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        hidden_size: int,
        projection_dim: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.num_layers = num_layers
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.shift_positions = False
        self._recording: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._unfolded: tuple[nn.Parameter, nn.Sequential] | None = None
        width = num_layers * 2 * kv_heads * head_dim
        kw = {"device": device, "dtype": dtype}
        if projection_dim is None:
            self.prefix = nn.Parameter(torch.empty(num_virtual_tokens, width, **kw))  # (P, L*2*W)
        else:
            self.embedding = nn.Parameter(torch.empty(num_virtual_tokens, hidden_size, **kw))  # (P, H)
            self.transform = nn.Sequential(
                nn.Linear(hidden_size, projection_dim, **kw),
                nn.Tanh(),
                nn.Linear(projection_dim, width, **kw),
            )
        self.reset_parameters()
        declare_trainable(self)

    @property
    def kv_width(self) -> int:
        """``kv_heads * head_dim``: the width of one layer's keys (or values) per token."""
        return self.kv_heads * self.head_dim

    @property
    def projected(self) -> bool:
        """Whether the prefixes come from the projection MLP (not yet folded)."""
        return "transform" in self._modules

    def reset_parameters(self) -> None:
        """Random init: N(0, 0.02) prefixes, or N(0, 1) embeddings and default Linear layers."""
        with torch.no_grad():
            if self.projected:
                nn.init.normal_(self.embedding)
                for layer in self.transform:
                    if isinstance(layer, nn.Linear):
                        layer.reset_parameters()
            else:
                nn.init.normal_(self.prefix, std=_RANDOM_STD)

    def flat(self) -> torch.Tensor:
        """All prefixes: (P, layers * 2 * kv_width)."""
        if self.projected:
            return self.transform(self.embedding)  # (P, L*2*W)
        return self.prefix

    def layer(self, index: int, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of attention layer ``index``: two (kv_heads, P, head_dim) tensors."""
        w = self.kv_width
        rows = self.flat()[:, 2 * index * w : (2 * index + 2) * w]  # (P, 2*W)
        if dtype is not None:
            rows = rows.to(dtype)
        rows = rows.view(self.num_virtual_tokens, 2, self.kv_heads, self.head_dim)  # (P, 2, Hkv, D)
        rows = rows.permute(1, 2, 0, 3)  # (2, Hkv, P, D)
        return rows[0], rows[1]

    # -- projection folding ---------------------------------------------------------------
    @torch.no_grad()
    def fold(self) -> None:
        """Replace the projection MLP by the prefixes it computes (no-op without one)."""
        if not self.projected:
            return
        value = self.transform(self.embedding).detach().clone()  # (P, L*2*W)
        unfolded = (self.embedding, self.transform)
        del self.embedding
        del self.transform
        self.prefix = nn.Parameter(value)
        object.__setattr__(self, "_unfolded", unfolded)

    def unfold(self) -> bool:
        """Bring back the projection MLP removed by :meth:`fold`; ``False`` if there is none."""
        if self._unfolded is None or self.projected:
            return False
        embedding, transform = self._unfolded
        del self.prefix
        self.embedding = embedding
        self.transform = transform
        object.__setattr__(self, "_unfolded", None)
        return True

    @torch.no_grad()
    def fit_to(self, target: torch.Tensor) -> None:
        """Set the prefixes to ``target`` (P, layers * 2 * kv_width).

        Without projection this copies; with projection the last Linear layer is solved by
        least squares so the MLP reproduces ``target`` (exactly when ``projection_dim >= P``).
        """
        if not self.projected:
            self.prefix.copy_(target.to(self.prefix.dtype))
            return
        last: nn.Linear = self.transform[-1]
        hidden = self.transform[:-1](self.embedding).double()  # (P, proj)
        ones = torch.ones(hidden.shape[0], 1, dtype=hidden.dtype, device=hidden.device)
        design = torch.cat([hidden, ones], dim=1)  # (P, proj + 1)
        solution = torch.linalg.pinv(design) @ target.double()  # (proj + 1, L*2*W)
        last.weight.copy_(solution[:-1].T.to(last.weight.dtype))
        last.bias.copy_(solution[-1].to(last.bias.dtype))


# --------------------------------------------------------------------------- hooks
class _PrefixedCache:
    """Stands in for a layer's KV cache: real entries go to ``inner``, the prefix goes in front.

    Args:
        inner: The model's cache, or ``None`` when it runs without one.
        key: (kv_heads, P, head_dim) prefix keys.
        value: (kv_heads, P, head_dim) prefix values.
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
        batch = key_states.shape[0]
        key = self.key.to(key_states.dtype).unsqueeze(0).expand(batch, -1, -1, -1)  # (B, Hkv, P, D)
        value = self.value.to(value_states.dtype).unsqueeze(0).expand(batch, -1, -1, -1)
        return torch.cat([key, key_states], dim=2), torch.cat([value, value_states], dim=2)

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)


def _prefix_mask(
    mask: Any, num: int, q_len: int, kv_len: int, causal: bool, implementation: str
) -> torch.Tensor | None:
    """Add ``num`` always-attended key columns in front of a layer's attention mask.

    Args:
        mask: The 4D mask the layer received: bool (True = attend) or additive float, of
            shape (B or 1, 1 or heads, q_len, kv_len); or ``None``.
        num: Number of prefix rows ``P``.
        q_len: Number of query positions.
        kv_len: Number of real key positions (cache included).
        causal: Whether the layer is causal.
        implementation: ``config._attn_implementation``.

    Returns:
        The mask with shape (..., q_len, P + kv_len), or ``None`` when everything attends.
    """
    if mask is None:
        # SDPA reads ``None`` on a causal layer as "causal, aligned top-left" (is_causal=True)
        # for more than one query; with prefix columns that must become an explicit mask.
        if not (causal and implementation == "sdpa" and q_len > 1):
            return None
        rows = torch.arange(q_len)[:, None]  # (q, 1)
        cols = torch.arange(kv_len)[None, :]  # (1, kv)
        real = cols <= rows  # (q, kv)
        full = torch.cat([torch.ones(q_len, num, dtype=torch.bool), real], dim=1)  # (q, P + kv)
        return full.view(1, 1, q_len, num + kv_len)
    if not isinstance(mask, torch.Tensor) or mask.ndim != 4:
        raise ValueError(
            f"prefix tuning extends 4D attention masks; this layer got {type(mask).__name__} "
            f"{tuple(getattr(mask, 'shape', ()))}. Use attn_implementation 'sdpa' or 'eager'."
        )
    if mask.dtype == torch.bool:
        extra = mask.new_ones(*mask.shape[:-1], num)  # (B, h, q, P)
    else:
        extra = mask.new_zeros(*mask.shape[:-1], num)
    return torch.cat([extra, mask], dim=-1)  # (B, h, q, P + kv)


class _AttentionHook:
    """Forward pre-hook of one self-attention module: prefix cache and extended mask."""

    def __init__(self, encoder: PrefixEncoder, layer: int, cache_key: str) -> None:
        self.encoder = encoder
        self.layer = layer
        self.cache_key = cache_key

    def __call__(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        kw = bind_arguments(module, args, kwargs)
        inner = None
        for key in CACHE_KEYS:
            given = kw.pop(key, None)
            inner = given if given is not None else inner
        record = self.encoder._recording
        if record is not None:
            kw[self.cache_key] = _PrefixedCache(inner, None, None, record, self.layer)
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
        q_len = hidden.shape[1]
        kv_len = q_len
        if inner is not None:
            sizes = getattr(inner, "get_mask_sizes", None)
            layer_idx = getattr(module, "layer_idx", None)
            layer_idx = self.layer if layer_idx is None else layer_idx
            kv_len = int(sizes(q_len, layer_idx)[0]) if callable(sizes) else inner.get_seq_length() + q_len
        causal = bool(getattr(module, "is_causal", False)) and kw.get("is_causal", True) is not False
        kw["attention_mask"] = _prefix_mask(
            kw.get("attention_mask"), self.encoder.num_virtual_tokens, q_len, kv_len, causal, implementation
        )
        if isinstance(kw["attention_mask"], torch.Tensor):
            kw["attention_mask"] = kw["attention_mask"].to(hidden.device)
        key, value = self.encoder.layer(self.layer, dtype=hidden.dtype)
        kw[self.cache_key] = _PrefixedCache(inner, key, value)
        return (), kw


class _PositionHook:
    """Forward pre-hook of a causal model's base: real tokens start at position ``P``."""

    def __init__(self, encoder: PrefixEncoder) -> None:
        self.encoder = encoder

    def __call__(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if self.encoder._recording is not None or not self.encoder.shift_positions:
            return None
        kw = bind_arguments(module, args, kwargs)
        positions = kw.get("position_ids")
        if positions is None:
            ref = kw.get("input_ids")
            ref = kw.get("inputs_embeds") if ref is None else ref
            if ref is None:
                return None  # let the model raise its own error
            past = cache_length(kw)
            positions = torch.arange(past, past + ref.shape[1], device=ref.device).unsqueeze(0)  # (1, T)
        kw["position_ids"] = positions + self.encoder.num_virtual_tokens
        return (), kw


# --------------------------------------------------------------------------- structure
def _accepts_cache(module: nn.Module) -> str | None:
    names = forward_parameter_names(module)
    if "attention_mask" not in names:
        return None
    return next((key for key in CACHE_KEYS if key in names), None)


def _is_cross_attention(module: nn.Module) -> bool:
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
            if name and _accepts_cache(m) is not None and not _is_cross_attention(m)
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


def _kv_shape(attention: nn.Module) -> tuple[int, int]:
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


def _position_owner(backbone: nn.Module, list_name: str) -> tuple[str, nn.Module] | None:
    """The deepest module above the block list whose forward takes ``position_ids``."""
    parts = list_name.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        name = ".".join(parts[:depth])
        module = backbone.get_submodule(name) if name else backbone
        if "position_ids" in forward_parameter_names(module):
            return name, module
    return None


def find_prefix_encoder(model: nn.Module) -> tuple[str, PrefixEncoder]:
    """Return ``(qualified_name, encoder)`` of the prefixes in ``model``.

    Raises:
        ValueError: If prefix tuning was not applied to ``model``.
    """
    for name, module in model.named_modules():
        if isinstance(module, PrefixEncoder):
            return name, module
    raise ValueError(f"{type(model).__name__} has no prefixes; apply PrefixTuning first")


# --------------------------------------------------------------------------- the method
@register
@dataclass
class PrefixTuningConfig(Method):
    """Learned key/value prefixes in every self-attention layer."""

    num_virtual_tokens: int = 20
    """Number of prefix rows ``P`` per layer; ``layers x 2 x P x kv_width`` numbers train
    (``kv_width = kv_heads x head_dim``, smaller than ``hidden`` under grouped-query attention)."""
    projection_dim: int | None = None
    """Hidden width of the reparameterization MLP (``P x hidden`` embeddings ->
    Linear(hidden, projection_dim) -> tanh -> Linear(projection_dim, layers x 2 x kv_width));
    ``None`` learns the prefixes directly. :meth:`merge` folds the MLP into plain prefixes."""

    name = "prefix"

    def __post_init__(self) -> None:
        n = self.num_virtual_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"PrefixTuning num_virtual_tokens must be a positive integer, got {n!r}")
        d = self.projection_dim
        if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d <= 0):
            raise ValueError(f"PrefixTuning projection_dim must be a positive integer or None, got {d!r}")

    # -- apply ----------------------------------------------------------------------------
    def _apply(self, model: nn.Module) -> None:
        backbone = find_backbone(model)
        if any(isinstance(m, PrefixEncoder) for m in backbone.modules()):
            raise ValueError(f"{type(backbone).__name__} already has prefixes; build a fresh model")
        config = getattr(backbone, "config", None)
        if getattr(config, "is_encoder_decoder", False) or getattr(config, "add_cross_attention", False):
            raise ValueError(
                "PrefixTuning supports encoder-only and decoder-only models; "
                f"{type(backbone).__name__} has cross-attention"
            )
        implementation = getattr(config, "_attn_implementation", None) or "eager"
        if implementation not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"PrefixTuning supports attn_implementation {list(SUPPORTED_ATTENTION)}; "
                f"{type(backbone).__name__} uses {implementation!r}. Load it with attn_implementation='sdpa' "
                "(or call model.set_attn_implementation('sdpa')) first"
            )
        list_name, layers = find_attention_layers(backbone)
        shapes = {_kv_shape(m) for _, m in layers}
        if len(shapes) != 1:
            raise ValueError(f"PrefixTuning needs one key/value shape in all layers; found {sorted(shapes)}")
        kv_heads, head_dim = shapes.pop()
        weight = next(layers[0][1].parameters(), None)
        if weight is None:
            raise ValueError(f"{layers[0][0]} ({type(layers[0][1]).__name__}) has no weights")
        dtype = (
            torch.promote_types(weight.dtype, torch.float32) if weight.is_floating_point() else torch.float32
        )
        get_in = getattr(backbone, "get_input_embeddings", None)
        table = get_in() if callable(get_in) else None
        hidden = (
            getattr(table, "embedding_dim", None)
            or getattr(config, "hidden_size", None)
            or kv_heads * head_dim
        )
        encoder = PrefixEncoder(
            self.num_virtual_tokens,
            len(layers),
            kv_heads,
            head_dim,
            hidden,
            self.projection_dim,
            device=weight.device,
            dtype=dtype,
        )
        backbone.add_module("prefix_encoder", encoder)
        for index, (_, attention) in enumerate(layers):
            attention.register_forward_pre_hook(
                _AttentionHook(encoder, index, _accepts_cache(attention)), with_kwargs=True
            )
        causal = any(bool(getattr(m, "is_causal", False)) for _, m in layers)
        owner = _position_owner(backbone, list_name)
        if causal and owner is not None:
            owner[1].register_forward_pre_hook(_PositionHook(encoder), with_kwargs=True)
            encoder.shift_positions = True
        if weight.device.type != "meta" and owner is not None and isinstance(table, nn.Embedding):
            self._init_from_activations(encoder, owner[1], table.num_embeddings, config)

    def _init_from_activations(
        self, encoder: PrefixEncoder, base: nn.Module, vocab_size: int, config: Any
    ) -> None:
        """Start from the keys/values the frozen model makes for ``P`` random tokens."""
        special = {getattr(config, k, None) for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
        pool = torch.tensor([i for i in range(vocab_size) if i not in special])
        ids = pool[torch.randint(0, len(pool), (self.num_virtual_tokens,))]
        device = encoder.flat().device
        record: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        training = base.training
        object.__setattr__(encoder, "_recording", record)
        try:
            base.eval()
            with torch.no_grad():
                base(input_ids=ids.unsqueeze(0).to(device))
        finally:
            object.__setattr__(encoder, "_recording", None)
            base.train(training)
        want = (encoder.kv_heads, self.num_virtual_tokens, encoder.head_dim)
        rows = []
        for layer in range(encoder.num_layers):
            key, value = record[layer]  # (Hkv, P, D) each
            if tuple(key.shape) != want or tuple(value.shape) != want:
                raise ValueError(f"layer {layer} makes keys of shape {tuple(key.shape)}, expected {want}")
            pair = torch.stack([key, value])  # (2, Hkv, P, D)
            rows.append(pair.permute(2, 0, 1, 3).reshape(self.num_virtual_tokens, 2 * encoder.kv_width))
        encoder.fit_to(torch.cat(rows, dim=1).float())  # (P, L*2*W)
        object.__setattr__(encoder, "init_token_ids", ids)

    # -- folding --------------------------------------------------------------------------
    def merge(self, model: nn.Module) -> None:
        """Fold the projection MLP into plain prefixes (the prefixes themselves stay separate).

        Afterwards the model records ``projection_dim=None``, so a delta saved now holds only
        the (P, layers * 2 * kv_width) prefixes and loads into a plain ``PrefixTuning``.
        """
        _, encoder = find_prefix_encoder(model)
        if not encoder.projected:
            return
        projection_dim = encoder.transform[0].out_features
        encoder.fold()
        _rerecord(model, self.num_virtual_tokens, None, projection_dim)
        sync_requires_grad(model)

    def unmerge(self, model: nn.Module) -> None:
        """Bring back the projection MLP that :meth:`merge` folded, if it is still held."""
        _, encoder = find_prefix_encoder(model)
        if encoder._unfolded is None:
            return
        projection_dim = encoder._unfolded[1][0].out_features
        encoder.unfold()
        _rerecord(model, self.num_virtual_tokens, projection_dim, None)
        sync_requires_grad(model)

    # -- Hugging Face PEFT ----------------------------------------------------------------
    def to_peft(self, model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        """PEFT ``PREFIX_TUNING`` for causal LMs; ``None`` for encoders and classifiers.

        PEFT puts prefixes in the KV cache of decoder models only (it refuses BERT-family
        models under transformers 5), and treats them as the first ``P`` positions, as
        ours do in decoders. Projected prefixes are exported as the values the MLP
        computes (PEFT's own inference layout). The state dict's single key is
        ``prompt_embeddings``, to be saved exactly so (PEFT looks it up without any
        ``base_model.model.`` prefix).
        """
        backbone = find_backbone(model)
        _, encoder = find_prefix_encoder(model)
        get_out = getattr(backbone, "get_output_embeddings", None)
        if not encoder.shift_positions or not callable(get_out) or get_out() is None:
            return None
        config = {
            "peft_type": "PREFIX_TUNING",
            "task_type": "CAUSAL_LM",
            "num_virtual_tokens": encoder.num_virtual_tokens,
            "token_dim": encoder.kv_width,
            "num_layers": encoder.num_layers,
            "num_attention_heads": encoder.kv_heads,
            "num_transformer_submodules": 1,
            "encoder_hidden_size": encoder.kv_width,
            "prefix_projection": False,
            "base_model_name_or_path": getattr(getattr(backbone, "config", None), "_name_or_path", None)
            or None,
            "inference_mode": True,
            "revision": None,
            "modules_to_save": None,
        }
        with torch.no_grad():
            flat = encoder.flat().detach().clone().contiguous()  # (P, L*2*W)
        return config, {PEFT_KEY: flat}

    def from_peft(self, model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map PEFT's ``prompt_embeddings`` onto the prefix parameter's name in ``model``."""
        keys = [k for k in state_dict if k == PEFT_KEY or k.endswith("." + PEFT_KEY)]
        if len(keys) != 1:
            raise ValueError(
                f"a PEFT prefix-tuning state dict holds one {PEFT_KEY!r}; got keys {sorted(state_dict)}"
            )
        tensor = state_dict[keys[0]]
        name, encoder = find_prefix_encoder(model)
        if encoder.projected:
            raise ValueError(
                "PEFT stores computed prefixes; load them into PrefixTuning(projection_dim=None), not a projected one"
            )
        if tuple(tensor.shape) != tuple(encoder.prefix.shape):
            raise ValueError(
                f"{PEFT_KEY} has shape {tuple(tensor.shape)} but the model's prefixes are "
                f"{tuple(encoder.prefix.shape)} (P, layers x 2 x kv_heads x head_dim)"
            )
        return {f"{name}.prefix": tensor}

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> PrefixTuningConfig:
        """Build the config from a PEFT ``adapter_config.json`` of type ``PREFIX_TUNING``."""
        if config.get("peft_type") != "PREFIX_TUNING":
            raise ValueError(f"expected peft_type 'PREFIX_TUNING', got {config.get('peft_type')!r}")
        if config.get("num_transformer_submodules", 1) not in (1, None):
            raise ValueError(
                "only decoder-only prefix tuning (num_transformer_submodules=1) is supported, got "
                f"{config.get('num_transformer_submodules')}"
            )
        return cls(num_virtual_tokens=int(config["num_virtual_tokens"]))


def _rerecord(model: nn.Module, num: int, new_dim: int | None, old_dim: int | None) -> None:
    """Update the recorded prefix config of ``model`` from ``projection_dim=old_dim`` to ``new_dim``."""
    for module in model.modules():
        methods = getattr(module, _METHODS_ATTR, None)
        if methods is None:
            continue
        updated = [
            PrefixTuningConfig(num, new_dim)
            if m.name == PrefixTuningConfig.name and getattr(m, "projection_dim", None) == old_dim
            else m
            for m in methods
        ]
        set_applied_methods(module, updated)
        return
