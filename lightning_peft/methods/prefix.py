"""Prefix tuning (Li and Liang 2021) for encoders and decoders alike.

Li and Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation": every
self-attention layer gets ``P`` learned key and value rows in front of the keys and values
its tokens produce; the model is frozen and only those rows train. With ``projection_dim``
the rows come from a small MLP during training (the paper's reparameterization), which is
folded into plain rows for saving and inference.

Mechanism (:mod:`lightning_peft.methods.prefix_hooks`). A forward pre-hook on each
self-attention module (BERT ``attention.self``, Llama ``self_attn``, GPT-2 ``attn``: found
structurally inside the repeated blocks) hands it a thin cache object. Attention modules give their freshly projected (and, with RoPE, rotated) keys
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

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.ownership import AdapterPart, declare_trainable, undeclare
from ..core.targeting import find_backbone
from .base import Method, MethodError, register, replace_config, sync_adapters
from .prefix_hooks import (
    SUPPORTED_ATTENTION,
    AttentionHook,
    PositionHook,
    PrefixBank,
    accepts_cache,
    find_attention_layers,
    kv_shape,
    position_owner,
)

PEFT_KEY = "prompt_embeddings"
"""The one tensor name of a Hugging Face PEFT prefix-tuning checkpoint."""
BANK = "prefix_encoders"
"""Attribute of the Hugging Face model holding every adapter's prefixes (a :class:`PrefixBank`)."""
_RANDOM_STD = 0.02


# --------------------------------------------------------------------------- the prefixes
class PrefixEncoder(AdapterPart):
    """One adapter's learned prefixes for every attention layer.

    The prefixes of all layers form one (P, layers * 2 * kv_width) matrix laid out as in
    Hugging Face PEFT: for layer ``l`` the keys are columns ``2l * kv_width`` onwards and the
    values the next ``kv_width`` columns, each row reading as (kv_heads, head_dim).

    Args:
        adapter_name: The adapter.
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
        adapter_name: str,
        num_virtual_tokens: int,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        hidden_size: int,
        projection_dim: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(adapter_name)
        self.num_virtual_tokens = num_virtual_tokens
        self.num_layers = num_layers
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.init_token_ids: torch.Tensor | None = None
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
        declare_trainable(self, adapter=adapter_name)

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

    @property
    def folded_projection_dim(self) -> int | None:
        """The projection width :meth:`fold` removed and still holds, or ``None``."""
        return None if self._unfolded is None else self._unfolded[1][0].out_features

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


def prefix_bank(model: nn.Module) -> PrefixBank | None:
    """The :class:`PrefixBank` of the Hugging Face model inside ``model``, if prefix tuning was applied."""
    bank = getattr(find_backbone(model), BANK, None)
    return bank if isinstance(bank, PrefixBank) else None


def find_prefix_encoder(model: nn.Module, adapter_name: str = "default") -> tuple[str, PrefixEncoder]:
    """Return ``(qualified_name, encoder)`` of adapter ``adapter_name``'s prefixes in ``model``.

    Raises:
        ValueError: If the model has no such prefixes.
    """
    for name, module in model.named_modules():
        if isinstance(module, PrefixEncoder) and module.adapter_name == adapter_name:
            return name, module
    raise ValueError(
        f"{type(model).__name__} has no prefixes of adapter {adapter_name!r}; apply PrefixTuning first"
    )


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
    callback_name = "PrefixTuning"
    example = {"num_virtual_tokens": 4}
    starts_as_base = False
    peft_types = ("PREFIX_TUNING",)

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.num_virtual_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"PrefixTuning num_virtual_tokens must be a positive integer, got {n!r}")
        d = self.projection_dim
        if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d <= 0):
            raise ValueError(f"PrefixTuning projection_dim must be a positive integer or None, got {d!r}")

    # -- inject ---------------------------------------------------------------------------
    def inject(self, model: nn.Module) -> None:
        """Add this adapter's prefixes to the model's bank (hooking the attention layers the first time)."""
        backbone = find_backbone(model)
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
        shapes = {kv_shape(m) for _, m in layers}
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
            self.adapter_name,
            self.num_virtual_tokens,
            len(layers),
            kv_heads,
            head_dim,
            hidden,
            self.projection_dim,
            device=weight.device,
            dtype=dtype,
        )
        owner = position_owner(backbone, list_name)
        bank = prefix_bank(backbone)
        if bank is None:
            bank = PrefixBank()
            backbone.add_module(BANK, bank)
            for index, (_, attention) in enumerate(layers):
                attention.register_forward_pre_hook(
                    AttentionHook(bank, index, accepts_cache(attention)), with_kwargs=True
                )
            causal = any(bool(getattr(m, "is_causal", False)) for _, m in layers)
            if causal and owner is not None:
                owner[1].register_forward_pre_hook(PositionHook(bank), with_kwargs=True)
                bank.shift_positions = True
        bank[self.adapter_name] = encoder
        if weight.device.type != "meta" and owner is not None and isinstance(table, nn.Embedding):
            self._init_from_activations(encoder, bank, owner[1], table.num_embeddings, config)

    def _init_from_activations(
        self, encoder: PrefixEncoder, bank: PrefixBank, base: nn.Module, vocab_size: int, config: Any
    ) -> None:
        """Start from the keys/values the frozen model makes for ``P`` random tokens."""
        special = {getattr(config, k, None) for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
        pool = torch.tensor([i for i in range(vocab_size) if i not in special])
        ids = pool[torch.randint(0, len(pool), (self.num_virtual_tokens,))]
        device = encoder.flat().device
        record: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        training = base.training
        bank.recording = record
        try:
            base.eval()
            with torch.no_grad():
                base(input_ids=ids.unsqueeze(0).to(device))
        finally:
            bank.recording = None
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
        encoder.init_token_ids = ids

    # -- folding --------------------------------------------------------------------------
    def merge(self, model: nn.Module) -> None:
        """Fold the projection MLP into plain prefixes (the prefixes themselves stay separate).

        Afterwards the model records ``projection_dim=None`` for this adapter, so a delta
        saved now holds only the (P, layers * 2 * kv_width) prefixes and loads into a
        plain ``PrefixTuning``.
        """
        _, encoder = find_prefix_encoder(model, self.adapter_name)
        if not encoder.projected:
            return
        encoder.fold()
        replace_config(model, dataclasses.replace(self.config(), projection_dim=None))
        sync_adapters(model)

    def unmerge(self, model: nn.Module) -> None:
        """Bring back the projection MLP that :meth:`merge` folded, if it is still held."""
        _, encoder = find_prefix_encoder(model, self.adapter_name)
        projection_dim = encoder.folded_projection_dim
        if projection_dim is None:
            return
        encoder.unfold()
        replace_config(model, dataclasses.replace(self.config(), projection_dim=projection_dim))
        sync_adapters(model)

    def remove(self, model: nn.Module) -> None:
        """Take this adapter's prefixes out; the hooks do nothing once the bank is empty."""
        bank = prefix_bank(model)
        if bank is None or self.adapter_name not in bank:
            return
        del bank[self.adapter_name]
        for module in model.modules():
            undeclare(module, self.adapter_name)

    def check_routable(self, model: nn.Module, adapters: list[Method]) -> None:
        """Rows may use different prefixes: each row attends only its own adapter's prefix columns."""

    # -- Hugging Face PEFT ----------------------------------------------------------------
    def to_peft(self, model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """PEFT ``PREFIX_TUNING`` for causal LMs.

        PEFT puts prefixes in the KV cache of decoder models only (it refuses BERT-family
        models under transformers 5), and treats them as the first ``P`` positions, as
        ours do in decoders. Projected prefixes are exported as the values the MLP
        computes (PEFT's own inference layout). The state dict's single key is
        ``prompt_embeddings``, to be saved exactly so (PEFT looks it up without any
        ``base_model.model.`` prefix).

        Raises:
            MethodError: For encoders and classifiers, which PEFT has no prefix tuning for.
        """
        backbone = find_backbone(model)
        _, encoder = find_prefix_encoder(model, self.adapter_name)
        bank = prefix_bank(model)
        get_out = getattr(backbone, "get_output_embeddings", None)
        if bank is None or not bank.shift_positions or not callable(get_out) or get_out() is None:
            raise MethodError(
                f"PrefixTuning (adapter {self.adapter_name!r}) on {type(backbone).__name__} has no Hugging Face "
                "PEFT form: PEFT's prefix tuning covers causal language models only. Use save_delta"
            )
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
            "inference_mode": True,
            "revision": None,
            "modules_to_save": None,
        }
        with torch.no_grad():
            flat = encoder.flat().detach().clone().contiguous()  # (P, L*2*W)
        return config, {PEFT_KEY: flat}

    def from_peft(self, model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map PEFT's ``prompt_embeddings`` onto this adapter's prefix parameter in ``model``."""
        keys = [k for k in state_dict if k == PEFT_KEY or k.endswith("." + PEFT_KEY)]
        if len(keys) != 1:
            raise MethodError(
                f"a PEFT prefix-tuning state dict holds one {PEFT_KEY!r}; got keys {sorted(state_dict)}"
            )
        tensor = state_dict[keys[0]]
        name, encoder = find_prefix_encoder(model, self.adapter_name)
        if encoder.projected:
            raise MethodError(
                "PEFT stores computed prefixes; load them into PrefixTuning(projection_dim=None), not a projected one"
            )
        if tuple(tensor.shape) != tuple(encoder.prefix.shape):
            raise MethodError(
                f"{PEFT_KEY} has shape {tuple(tensor.shape)} but the model's prefixes are "
                f"{tuple(encoder.prefix.shape)} (P, layers x 2 x kv_heads x head_dim)"
            )
        return {f"{name}.prefix": tensor}

    @classmethod
    def from_peft_config(cls, config: dict[str, Any], adapter_name: str = "default") -> PrefixTuningConfig:
        """Build the config from a PEFT ``adapter_config.json`` of type ``PREFIX_TUNING``."""
        if config.get("peft_type") != "PREFIX_TUNING":
            raise MethodError(f"expected peft_type 'PREFIX_TUNING', got {config.get('peft_type')!r}")
        if config.get("num_transformer_submodules", 1) not in (1, None):
            raise MethodError(
                "only decoder-only prefix tuning (num_transformer_submodules=1) is supported, got "
                f"{config.get('num_transformer_submodules')}"
            )
        return cls(num_virtual_tokens=int(config["num_virtual_tokens"]), adapter_name=adapter_name)
