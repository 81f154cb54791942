"""Prompt tuning (Lester et al. 2021).

Lester, Al-Rfou and Constant 2021, "The Power of Scale for Parameter-Efficient Prompt
Tuning": a learned soft prompt of ``P`` vectors in the input-embedding space is put in front
of every sequence; the model is frozen and only those ``P x hidden`` numbers train.

Mechanism. Two hooks on the Hugging Face base model (``backbone.base_model``: ``LlamaModel``,
``GPT2Model``, ``BertModel``, ...) do the work, so the task heads above it never see the
virtual tokens:

- before ``forward``: ``input_ids`` become ``inputs_embeds`` with the prompt inserted,
  ``attention_mask`` gains ``P`` ones, ``position_ids`` / ``token_type_ids`` gain ``P``
  entries;
- after ``forward``: the ``P`` virtual positions are cut out of ``last_hidden_state`` (and of
  ``hidden_states`` when requested).

So a causal LM's logits stay (B, T, V), aligned with the user's tokens and labels (the
virtual positions never reach the loss), and a sequence classifier pools exactly as before:
Llama-style heads find the last non-pad token from the user's ``input_ids`` (which the head
still sees), and BERT's pooler reads ``[CLS]`` because in bidirectional encoders the prompt is
inserted *after* the first token. In causal decoders it goes first, as in the paper and in
Hugging Face PEFT.

Generation with a KV cache: the first (prefill) step inserts the prompt, so the cache holds
``P + T`` positions; later steps (a non-empty cache) insert nothing, but the user's attention
mask still gains ``P`` ones and explicit ``position_ids`` shift by ``P``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..targeting import find_backbone
from ._inputs import (
    bind_arguments,
    cache_length,
    extend_attention_mask,
    extend_position_ids,
    extend_token_type_ids,
    is_causal,
    shift_position_ids,
)
from .base import Method, declare_trainable, register

POSITIONS = ("auto", "start", "after_first")
PEFT_KEY = "prompt_embeddings"
"""The one tensor name of a Hugging Face PEFT prompt-tuning checkpoint."""


class SoftPrompt(nn.Module):
    """The learned prompt and the hooks that put it in front of a model's input embeddings.

    Args:
        num_virtual_tokens: Number of prompt vectors ``P``.
        dim: Width of the input embeddings.
        insert_at: Column of the user's sequence the prompt goes before (0: in front of
            everything; 1: after the first token, e.g. BERT's ``[CLS]``).
        device: Device of the prompt.
        dtype: dtype of the prompt (kept in float32 or wider for stable training; it is
            cast to the embeddings' dtype on use).
    """

    def __init__(
        self,
        num_virtual_tokens: int,
        dim: int,
        insert_at: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_virtual_tokens, dim, device=device, dtype=dtype))
        self.insert_at = insert_at
        self._pending: list[int | None] = []
        declare_trainable(self)

    @property
    def num_virtual_tokens(self) -> int:
        """``P``, the number of prompt vectors."""
        return self.weight.shape[0]

    def forward(self, batch_size: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The prompt repeated over the batch: (B, P, dim)."""
        weight = self.weight if dtype is None else self.weight.to(dtype)
        return weight.unsqueeze(0).expand(batch_size, -1, -1)  # (B, P, dim)

    def attach(self, base: nn.Module) -> None:
        """Register this prompt as ``base.soft_prompt`` and hook ``base``'s forward."""
        base.add_module("soft_prompt", self)
        base.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        base.register_forward_hook(self._after_forward, with_kwargs=True)

    # -- hooks ----------------------------------------------------------------------------
    def _before_forward(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        kw = bind_arguments(module, args, kwargs)
        num = self.num_virtual_tokens
        if cache_length(kw) > 0:
            # Cached decoding step: the prompt is already in the cache (P + past entries).
            kw["attention_mask"] = extend_attention_mask(kw.get("attention_mask"), num, at=0)
            kw["position_ids"] = shift_position_ids(kw.get("position_ids"), num)
            self._pending.append(None)
            return (), kw
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        if embeds is None:
            if ids is None:
                self._pending.append(None)
                return (), kw  # nothing to prepend to; let the model raise its own error
            embeds = module.get_input_embeddings()(ids)  # (B, T, H)
        at = min(self.insert_at, embeds.shape[1])
        prompt = self(embeds.shape[0], embeds.dtype)  # (B, P, H)
        kw["input_ids"] = None
        kw["inputs_embeds"] = torch.cat([embeds[:, :at], prompt, embeds[:, at:]], dim=1)  # (B, P + T, H)
        kw["attention_mask"] = extend_attention_mask(kw.get("attention_mask"), num, at)
        for key in ("position_ids", "token_type_ids"):
            if kw.get(key) is not None:
                extend = extend_position_ids if key == "position_ids" else extend_token_type_ids
                kw[key] = extend(kw[key], num, at)
        self._pending.append(at)
        return (), kw

    def _after_forward(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> Any:
        at = self._pending.pop() if self._pending else None
        if at is None:
            return output
        num = self.num_virtual_tokens

        def cut(h: torch.Tensor) -> torch.Tensor:  # (B, at + P + rest, H) -> (B, at + rest, H)
            return torch.cat([h[:, :at], h[:, at + num :]], dim=1)

        if isinstance(output, tuple):
            return (cut(output[0]), *output[1:])
        output["last_hidden_state"] = cut(output["last_hidden_state"])
        hidden = output.get("hidden_states") if hasattr(output, "get") else None
        if hidden is not None:
            output["hidden_states"] = tuple(cut(h) for h in hidden)
        return output


def find_soft_prompt(model: nn.Module) -> tuple[str, SoftPrompt]:
    """Return ``(qualified_name, module)`` of the soft prompt in ``model``.

    Raises:
        ValueError: If prompt tuning was not applied to ``model``.
    """
    for name, module in model.named_modules():
        if isinstance(module, SoftPrompt):
            return name, module
    raise ValueError(f"{type(model).__name__} has no soft prompt; apply PromptTuning first")


def _base_model(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(backbone, base)``: the Hugging Face model and the part of it that embeds the tokens."""
    backbone = find_backbone(model)
    base = getattr(backbone, "base_model", backbone)
    get_in = getattr(base, "get_input_embeddings", None)
    table = get_in() if callable(get_in) else None
    if not isinstance(table, nn.Embedding):
        raise ValueError(
            f"PromptTuning needs a Hugging Face model whose get_input_embeddings() is an nn.Embedding; "
            f"{type(backbone).__name__} has {type(table).__name__ if table is not None else 'none'}"
        )
    return backbone, base


@register
@dataclass
class PromptTuningConfig(Method):
    """A learned soft prompt in front of the input embeddings."""

    num_virtual_tokens: int = 20
    """Number of prompt vectors ``P``; ``P x hidden`` numbers train."""
    init_text: str | None = None
    """Initialize the prompt from the embeddings of this text's tokens (repeated to fill
    ``P`` vectors); ``None`` initializes from ``P`` randomly chosen vocabulary rows."""
    tokenizer: str | None = None
    """Tokenizer (folder or hub id) for ``init_text``; by default the model's own
    (``config._name_or_path``)."""
    position: str = "auto"
    """Where the prompt goes: ``"start"`` (before every token), ``"after_first"`` (after the
    first token, which BERT-style poolers read), or ``"auto"``: ``"start"`` for causal
    decoders and ``"after_first"`` for bidirectional encoders."""

    name = "prompt"

    def __post_init__(self) -> None:
        n = self.num_virtual_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"PromptTuning num_virtual_tokens must be a positive integer, got {n!r}")
        if self.init_text is not None and (not isinstance(self.init_text, str) or not self.init_text.strip()):
            raise ValueError(f"init_text must be a non-empty string or None, got {self.init_text!r}")
        if self.position not in POSITIONS:
            raise ValueError(
                f"unknown PromptTuning position {self.position!r}; choose from {list(POSITIONS)}"
            )

    # -- apply ----------------------------------------------------------------------------
    def _apply(self, model: nn.Module) -> None:
        backbone, base = _base_model(model)
        if any(isinstance(m, SoftPrompt) for m in base.children()):
            raise ValueError(f"{type(base).__name__} already has a soft prompt; build a fresh model")
        table: nn.Embedding = base.get_input_embeddings()
        if self.position == "auto":
            insert_at = 0 if is_causal(base) else 1
        else:
            insert_at = 0 if self.position == "start" else 1
        dtype = torch.promote_types(table.weight.dtype, torch.float32)
        prompt = SoftPrompt(
            self.num_virtual_tokens, table.embedding_dim, insert_at, device=table.weight.device, dtype=dtype
        )
        if table.weight.device.type != "meta":
            ids = self._init_token_ids(backbone, table.num_embeddings)
            with torch.no_grad():
                prompt.weight.copy_(table.weight[ids.to(table.weight.device)].to(dtype))  # (P, H)
        prompt.attach(base)

    def _init_token_ids(self, backbone: nn.Module, vocab_size: int) -> torch.Tensor:
        """Token ids whose embeddings start the prompt: ``init_text`` cycled, or random rows."""
        if self.init_text is None:
            return torch.randint(0, vocab_size, (self.num_virtual_tokens,))
        ids = self._tokenize(backbone)
        if not ids:
            raise ValueError(f"init_text {self.init_text!r} tokenizes to no tokens")
        if len(ids) > self.num_virtual_tokens:
            raise ValueError(
                f"init_text has {len(ids)} tokens but num_virtual_tokens={self.num_virtual_tokens}; "
                f"shorten the text or use num_virtual_tokens >= {len(ids)}"
            )
        if max(ids) >= vocab_size:
            raise ValueError(
                f"the tokenizer gives token id {max(ids)} but the model's vocabulary has {vocab_size} rows; "
                "pass the tokenizer that belongs to this model"
            )
        repeats = math.ceil(self.num_virtual_tokens / len(ids))
        return torch.tensor((ids * repeats)[: self.num_virtual_tokens], dtype=torch.long)

    def _tokenize(self, backbone: nn.Module) -> list[int]:
        from transformers import AutoTokenizer

        from ..modules import resolve_model_source

        source = self.tokenizer
        if source is None:
            config = getattr(backbone, "config", None)
            source = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
        if not source:
            raise ValueError(
                "init_text needs a tokenizer, and the model does not say where it was loaded from; "
                "pass tokenizer='<folder or hub id>'"
            )
        path = resolve_model_source(os.fspath(source))
        tokenizer = AutoTokenizer.from_pretrained(path)
        return list(tokenizer(self.init_text, add_special_tokens=False)["input_ids"])

    # -- Hugging Face PEFT --------------------------------------------------------------
    def to_peft(self, model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        """PEFT ``PROMPT_TUNING`` for causal LMs; ``None`` for encoders and classifiers.

        PEFT prepends the prompt in front of every token and has no notion of inserting it
        after ``[CLS]``, so only prompts placed at the start of a causal LM export. The
        state dict's single key is ``prompt_embeddings``, to be saved exactly so (PEFT
        looks it up without any ``base_model.model.`` prefix).
        """
        backbone, base = _base_model(model)
        _, prompt = find_soft_prompt(model)
        get_out = getattr(backbone, "get_output_embeddings", None)
        if prompt.insert_at != 0 or not is_causal(base) or not callable(get_out) or get_out() is None:
            return None
        text = (
            backbone.config.get_text_config()
            if hasattr(backbone.config, "get_text_config")
            else backbone.config
        )
        config = {
            "peft_type": "PROMPT_TUNING",
            "task_type": "CAUSAL_LM",
            "num_virtual_tokens": prompt.num_virtual_tokens,
            "token_dim": prompt.weight.shape[1],
            "num_transformer_submodules": 1,
            "num_attention_heads": getattr(text, "num_attention_heads", None),
            "num_layers": getattr(text, "num_hidden_layers", None),
            "prompt_tuning_init": "RANDOM",  # the weights are loaded; nothing to initialize
            "prompt_tuning_init_text": None,
            "tokenizer_name_or_path": None,
            "tokenizer_kwargs": None,
            "base_model_name_or_path": getattr(backbone.config, "_name_or_path", None) or None,
            "inference_mode": True,
            "revision": None,
            "modules_to_save": None,
        }
        return config, {PEFT_KEY: prompt.weight.detach().clone().contiguous()}

    def from_peft(self, model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map PEFT's ``prompt_embeddings`` onto the soft prompt's parameter name in ``model``."""
        keys = [k for k in state_dict if k == PEFT_KEY or k.endswith("." + PEFT_KEY)]
        if len(keys) != 1:
            raise ValueError(
                f"a PEFT prompt-tuning state dict holds one {PEFT_KEY!r}; got keys {sorted(state_dict)}"
            )
        tensor = state_dict[keys[0]]
        name, prompt = find_soft_prompt(model)
        if tuple(tensor.shape) != tuple(prompt.weight.shape):
            raise ValueError(
                f"{PEFT_KEY} has shape {tuple(tensor.shape)} but the model's prompt is {tuple(prompt.weight.shape)}"
            )
        return {f"{name}.weight": tensor}

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> PromptTuningConfig:
        """Build the config from a PEFT ``adapter_config.json`` of type ``PROMPT_TUNING``."""
        if config.get("peft_type") != "PROMPT_TUNING":
            raise ValueError(f"expected peft_type 'PROMPT_TUNING', got {config.get('peft_type')!r}")
        if config.get("num_transformer_submodules", 1) not in (1, None):
            raise ValueError(
                "only decoder-only prompt tuning (num_transformer_submodules=1) is supported, got "
                f"{config.get('num_transformer_submodules')}"
            )
        return cls(num_virtual_tokens=int(config["num_virtual_tokens"]), position="start")
