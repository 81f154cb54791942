"""Prompt tuning (Lester et al. 2021).

Lester, Al-Rfou and Constant 2021, "The Power of Scale for Parameter-Efficient Prompt
Tuning": a learned soft prompt of ``P`` vectors in the input-embedding space is put in front
of every sequence; the model is frozen and only those ``P x hidden`` numbers train.

Mechanism. Two forward hooks of a :class:`PromptBank` (a pre-hook that rewrites the keyword
arguments and a hook that trims the output) do the work; where they sit depends on the
model (every prompt adapter of one model shares them; the active ones go in front in the
order they were added):

- Causal LMs (a causal decoder with an output embedding, e.g. ``LlamaForCausalLM``): on
  the LM itself, as Hugging Face PEFT does. Before ``forward``, ``input_ids`` become
  ``inputs_embeds`` with the prompt in front, ``attention_mask`` gains ``P`` ones on the
  left, ``labels`` gain ``P`` entries of -100 and explicit ``position_ids`` /
  ``token_type_ids`` gain ``P`` entries. So the last virtual position predicts the first
  real token and the loss equals PEFT's. After ``forward``, the logits (and
  ``hidden_states``) keep only the user's ``T`` positions: (B, T, V).
- Everything else (sequence classifiers, encoders, bare base models): on the base model
  (``backbone.base_model``: ``LlamaModel``, ``BertModel``, ...), so the task head never sees
  the virtual tokens. The pre-hook inserts the prompt the same way (no labels reach the
  base model); the hook cuts the ``P`` positions out of ``last_hidden_state`` (and of
  ``hidden_states``). A Llama-style head still finds the last non-pad token from the
  user's ``input_ids``, which it still sees, and BERT's pooler still reads ``[CLS]``
  because in bidirectional encoders the prompt goes *after* the first token. In causal
  decoders it goes first, as in the paper and in PEFT.

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
from transformers import AutoTokenizer

from ..core.ownership import AdapterPart, declare_trainable, undeclare
from ..core.targeting import find_backbone
from ..core.virtual_tokens import (
    bind_arguments,
    cache_length,
    extend_attention_mask,
    extend_position_ids,
    extend_token_type_ids,
    is_causal,
    shift_position_ids,
)
from ..hub import resolve_model_source
from .base import Method, MethodError, register

POSITIONS = ("auto", "start", "after_first")
PEFT_KEY = "prompt_embeddings"
"""The one tensor name of a Hugging Face PEFT prompt-tuning checkpoint."""
BANK = "soft_prompts"
"""Attribute (of the hooked model) holding every adapter's prompt (a :class:`PromptBank`)."""


class SoftPrompt(AdapterPart):
    """One adapter's learned prompt: ``P`` vectors in the input-embedding space.

    Args:
        adapter_name: The adapter.
        num_virtual_tokens: Number of prompt vectors ``P``.
        dim: Width of the input embeddings.
        device: Device of the prompt.
        dtype: dtype of the prompt (kept in float32 or wider for stable training; it is
            cast to the embeddings' dtype on use).
    """

    def __init__(
        self,
        adapter_name: str,
        num_virtual_tokens: int,
        dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(adapter_name)
        self.weight = nn.Parameter(torch.zeros(num_virtual_tokens, dim, device=device, dtype=dtype))  # (P, H)
        declare_trainable(self, adapter=adapter_name)

    @property
    def num_virtual_tokens(self) -> int:
        """``P``, the number of prompt vectors."""
        return self.weight.shape[0]


class PromptBank(nn.ModuleDict):
    """Every adapter's prompt on one model, and the hooks that put the active ones in front of its inputs.

    Args:
        insert_at: Column of the user's sequence the prompt goes before (0: in front of
            everything; 1: after the first token, e.g. BERT's ``[CLS]``).
        trim: What the output hook trims: ``"logits"`` (hooked on a causal LM: labels are
            extended on the way in, logits trimmed on the way out) or ``"hidden"`` (hooked
            on a base model: the virtual positions are cut from its hidden states).
    """

    def __init__(self, insert_at: int = 0, trim: str = "hidden") -> None:
        super().__init__()
        if trim not in ("logits", "hidden"):
            raise ValueError(f"trim must be 'logits' or 'hidden', got {trim!r}")
        if trim == "logits" and insert_at != 0:
            raise ValueError("a prompt hooked on a causal LM's logits must go first (insert_at=0)")
        self.insert_at = insert_at
        self.trim = trim
        self._pending: list[tuple[int, int, int] | None] = []

    def served_rows(self) -> torch.Tensor | None:
        """``(B,)`` bool: the rows some prompt serves under per-row routing; ``None`` when not routed."""
        serving = [p for p in self.values() if p.serves()]
        if not serving or all(p.rows is None for p in serving):
            return None
        served = torch.zeros_like(serving[0].rows)
        for part in serving:
            served = served | part.rows
        return served

    def prompt(self, batch_size: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The serving prompts: one after the other (B, P, dim), or each row's own when routed per row."""
        serving = [p for p in self.values() if p.serves()]
        if self.served_rows() is not None:  # each row its own prompt (equal lengths), zeros for base rows
            stack = torch.stack(
                [torch.zeros_like(serving[0].weight)] + [p.weight for p in serving]
            )  # (E+1, P, H)
            slot = torch.zeros(batch_size, dtype=torch.long, device=stack.device)
            for k, part in enumerate(serving, start=1):
                slot = torch.where(part.rows.to(stack.device), k, slot)
            rows = stack[slot]  # (B, P, H)
            return rows if dtype is None else rows.to(dtype)
        weight = (
            torch.cat([p.weight for p in serving], dim=0) if len(serving) > 1 else serving[0].weight
        )  # (P, H)
        if dtype is not None:
            weight = weight.to(dtype)
        return weight.unsqueeze(0).expand(batch_size, -1, -1)  # (B, P, H)

    def num_tokens(self) -> int:
        """Prompt vectors in front of the input for the current forward."""
        serving = [p for p in self.values() if p.serves()]
        if self.served_rows() is not None:
            return serving[0].num_virtual_tokens  # routed prompts have equal lengths
        return sum(p.num_virtual_tokens for p in serving)

    def attach(self, target: nn.Module) -> None:
        """Register this bank as ``target.soft_prompts`` and hook ``target``'s forward."""
        target.add_module(BANK, self)
        target.register_forward_pre_hook(self.before_forward, with_kwargs=True)
        target.register_forward_hook(self.after_forward, with_kwargs=True)

    # -- hooks ----------------------------------------------------------------------------
    def before_forward(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """Put the prompt in front of the input embeddings and extend masks, positions and labels."""
        num = self.num_tokens()
        if num == 0:
            self._pending.append(None)
            return None  # no prompt takes part: the model runs as the base model
        kw = bind_arguments(module, args, kwargs)
        served = self.served_rows()  # (B,) under per-row routing: base rows must not see a prompt
        past = cache_length(kw)
        if past > 0:
            # Cached decoding step: the prompt is already in the cache (P + past entries).
            if served is not None:
                self._route_cached_step(kw, num, past, served)
            else:
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
        batch, length = embeds.shape[:2]
        at = min(self.insert_at, length)
        prompt = self.prompt(batch, embeds.dtype)  # (B, P, H)
        kw["input_ids"] = None
        kw["inputs_embeds"] = torch.cat([embeds[:, :at], prompt, embeds[:, at:]], dim=1)  # (B, P + T, H)
        if served is not None:
            self._route_first_step(kw, num, at, batch, length, served.to(embeds.device))
        else:
            kw["attention_mask"] = extend_attention_mask(kw.get("attention_mask"), num, at)
            if kw.get("position_ids") is not None:
                kw["position_ids"] = extend_position_ids(kw["position_ids"], num, at)
        if kw.get("token_type_ids") is not None:
            kw["token_type_ids"] = extend_token_type_ids(kw["token_type_ids"], num, at)
        labels = kw.get("labels")
        if self.trim == "logits" and labels is not None:
            ignore = labels.new_full((labels.shape[0], num), -100)  # (B, P)
            kw["labels"] = torch.cat([ignore, labels], dim=1)  # (B, P + T)
        self._pending.append((at, length, num))
        return (), kw

    @staticmethod
    def _route_first_step(
        kw: dict[str, Any], num: int, at: int, batch: int, length: int, served: torch.Tensor
    ) -> None:
        """Masks and positions when rows are routed: base rows ignore the prompt columns and keep their positions."""
        mask = kw.get("attention_mask")
        if mask is None:
            mask = torch.ones(batch, length, dtype=torch.long, device=served.device)
        columns = served.to(mask.dtype).unsqueeze(1).expand(-1, num)  # (B, P): 0 for base rows
        kw["attention_mask"] = torch.cat([mask[:, :at], columns, mask[:, at:]], dim=1)  # (B, P + T)
        positions = kw.get("position_ids")
        if positions is None:
            positions = torch.arange(length, device=served.device).unsqueeze(0).expand(batch, -1)  # (B, T)
        positions = positions.expand(batch, -1)
        routed = extend_position_ids(positions, num, at)  # (B, P + T): the single-adapter layout
        base = torch.cat([positions[:, :at], positions.new_zeros(batch, num), positions[:, at:]], dim=1)
        kw["position_ids"] = torch.where(served.unsqueeze(1), routed, base)

    @staticmethod
    def _route_cached_step(kw: dict[str, Any], num: int, past: int, served: torch.Tensor) -> None:
        """A cached step under routing: base rows skip the cached prompt entries and their positions."""
        ref = kw.get("input_ids")
        ref = kw.get("inputs_embeds") if ref is None else ref
        batch, new = ref.shape[0], ref.shape[1]
        mask = kw.get("attention_mask")
        if mask is None:
            mask = torch.ones(batch, past - num + new, dtype=torch.long, device=served.device)
        columns = served.to(mask.device, mask.dtype).unsqueeze(1).expand(-1, num)  # (B, P)
        kw["attention_mask"] = torch.cat([columns, mask], dim=1)  # (B, P + past - P + new)
        positions = kw.get("position_ids")
        if positions is None:
            steps = torch.arange(past - num, past - num + new, device=served.device)  # real positions
            positions = steps.unsqueeze(0).expand(batch, -1)
        kw["position_ids"] = positions + num * served.to(positions.device).long().unsqueeze(1)

    def after_forward(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> Any:
        """Cut the prompt positions out of the output again."""
        pending = self._pending.pop() if self._pending else None
        if pending is None:
            return output
        at, length, num = pending

        def cut(h: torch.Tensor) -> torch.Tensor:  # (B, at + P + rest, ...) -> (B, at + rest, ...)
            if h.shape[1] != length + num:
                # logits_to_keep already kept only the last positions: keep at most T of them
                return h[:, -length:] if h.shape[1] > length else h
            return torch.cat([h[:, :at], h[:, at + num :]], dim=1)

        first = "logits" if self.trim == "logits" else "last_hidden_state"
        if isinstance(output, tuple):
            index = 1 if self.trim == "logits" and kwargs.get("labels") is not None else 0
            return (*output[:index], cut(output[index]), *output[index + 1 :])
        output[first] = cut(output[first])
        hidden = output.get("hidden_states")
        if hidden is not None:
            output["hidden_states"] = tuple(cut(h) for h in hidden)
        return output


def find_soft_prompt(model: nn.Module, adapter_name: str = "default") -> tuple[str, SoftPrompt]:
    """Return ``(qualified_name, module)`` of adapter ``adapter_name``'s soft prompt in ``model``.

    Raises:
        ValueError: If the model has no such prompt.
    """
    for name, module in model.named_modules():
        if isinstance(module, SoftPrompt) and module.adapter_name == adapter_name:
            return name, module
    raise ValueError(
        f"{type(model).__name__} has no soft prompt of adapter {adapter_name!r}; apply PromptTuning first"
    )


def prompt_bank(model: nn.Module) -> PromptBank | None:
    """The :class:`PromptBank` inside ``model``, if prompt tuning was applied."""
    return next((m for m in model.modules() if isinstance(m, PromptBank)), None)


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


def _is_causal_lm(backbone: nn.Module, base: nn.Module) -> bool:
    """A causal decoder with an LM head (its logits are per token and its labels are token ids)."""
    get_out = getattr(backbone, "get_output_embeddings", None)
    return backbone is not base and is_causal(base) and callable(get_out) and get_out() is not None


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
    callback_name = "PromptTuning"
    example = {"num_virtual_tokens": 4}
    starts_as_base = False
    peft_types = ("PROMPT_TUNING",)

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.num_virtual_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"PromptTuning num_virtual_tokens must be a positive integer, got {n!r}")
        if self.init_text is not None and (not isinstance(self.init_text, str) or not self.init_text.strip()):
            raise ValueError(f"init_text must be a non-empty string or None, got {self.init_text!r}")
        if self.tokenizer is not None and (
            not isinstance(self.tokenizer, (str, os.PathLike)) or not str(self.tokenizer)
        ):
            raise ValueError(
                f"tokenizer must be a folder or hub id (or None for the model's own), got {self.tokenizer!r}"
            )
        if self.position not in POSITIONS:
            raise ValueError(
                f"unknown PromptTuning position {self.position!r}; choose from {list(POSITIONS)}"
            )

    # -- inject ---------------------------------------------------------------------------
    def inject(self, model: nn.Module) -> None:
        """Add this adapter's prompt to the model's bank (hooking the model the first time)."""
        backbone, base = _base_model(model)
        table: nn.Embedding = base.get_input_embeddings()
        if self.position == "auto":
            insert_at = 0 if is_causal(base) else 1
        else:
            insert_at = 0 if self.position == "start" else 1
        on_logits = insert_at == 0 and _is_causal_lm(backbone, base)
        bank = prompt_bank(backbone)
        if bank is None:
            bank = PromptBank(insert_at, trim="logits" if on_logits else "hidden")
            bank.attach(backbone if on_logits else base)
        elif bank.insert_at != insert_at:
            raise ValueError(
                f"prompt adapters of one model must go to the same place; {list(bank)} insert at column "
                f"{bank.insert_at}, this one (position={self.position!r}) at {insert_at}"
            )
        dtype = torch.promote_types(table.weight.dtype, torch.float32)
        prompt = SoftPrompt(
            self.adapter_name,
            self.num_virtual_tokens,
            table.embedding_dim,
            device=table.weight.device,
            dtype=dtype,
        )
        if table.weight.device.type != "meta":
            ids = self._init_token_ids(backbone, table.num_embeddings)
            with torch.no_grad():
                prompt.weight.copy_(table.weight[ids.to(table.weight.device)].to(dtype))  # (P, H)
        bank[self.adapter_name] = prompt

    def check_routable(self, model: nn.Module, adapters: list[Method]) -> None:
        """Rows may use different prompts of one length (each row gets its own; base rows none).

        Raises:
            MethodError: If the routed prompts have different lengths.
        """
        lengths = {a.adapter_name: a.num_virtual_tokens for a in adapters}
        if len(set(lengths.values())) > 1:
            raise MethodError(
                f"adapter_per_row: prompts of different lengths cannot share a batch ({lengths}); route prompts "
                "of equal num_virtual_tokens together, or run the others in their own batches"
            )

    def remove(self, model: nn.Module) -> None:
        """Take this adapter's prompt out; the hooks do nothing once the bank is empty."""
        bank = prompt_bank(model)
        if bank is None or self.adapter_name not in bank:
            return
        del bank[self.adapter_name]
        for module in model.modules():
            undeclare(module, self.adapter_name)

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
    def to_peft(self, model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """PEFT ``PROMPT_TUNING`` for causal LMs.

        PEFT prepends the prompt in front of every token and has no notion of inserting it
        after ``[CLS]``, so only prompts placed at the start of a causal LM export. The
        state dict's single key is ``prompt_embeddings``, to be saved exactly so (PEFT
        looks it up without any ``base_model.model.`` prefix).

        Raises:
            MethodError: For encoders and classifiers.
        """
        backbone, _ = _base_model(model)
        _, prompt = find_soft_prompt(model, self.adapter_name)
        bank = prompt_bank(model)
        if bank is None or bank.trim != "logits":
            raise MethodError(
                f"PromptTuning (adapter {self.adapter_name!r}) on {type(backbone).__name__} has no Hugging Face "
                "PEFT form: PEFT prepends prompts to causal language models only. Use save_delta"
            )
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
            "inference_mode": True,
            "revision": None,
            "modules_to_save": None,
        }
        return config, {PEFT_KEY: prompt.weight.detach().clone().contiguous()}

    def from_peft(self, model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map PEFT's ``prompt_embeddings`` onto this adapter's prompt parameter in ``model``."""
        keys = [k for k in state_dict if k == PEFT_KEY or k.endswith("." + PEFT_KEY)]
        if len(keys) != 1:
            raise MethodError(
                f"a PEFT prompt-tuning state dict holds one {PEFT_KEY!r}; got keys {sorted(state_dict)}"
            )
        tensor = state_dict[keys[0]]
        name, prompt = find_soft_prompt(model, self.adapter_name)
        if tuple(tensor.shape) != tuple(prompt.weight.shape):
            raise MethodError(
                f"{PEFT_KEY} has shape {tuple(tensor.shape)} but the model's prompt is {tuple(prompt.weight.shape)}"
            )
        return {f"{name}.weight": tensor}

    @classmethod
    def from_peft_config(cls, config: dict[str, Any], adapter_name: str = "default") -> PromptTuningConfig:
        """Build the config from a PEFT ``adapter_config.json`` of type ``PROMPT_TUNING``."""
        if config.get("peft_type") != "PROMPT_TUNING":
            raise MethodError(f"expected peft_type 'PROMPT_TUNING', got {config.get('peft_type')!r}")
        if config.get("num_transformer_submodules", 1) not in (1, None):
            raise MethodError(
                "only decoder-only prompt tuning (num_transformer_submodules=1) is supported, got "
                f"{config.get('num_transformer_submodules')}"
            )
        return cls(
            num_virtual_tokens=int(config["num_virtual_tokens"]), position="start", adapter_name=adapter_name
        )
