"""Partial fine-tuning: train chosen parts of the model and freeze the rest.

Covers head-only training (linear probing), BitFit (Ben Zaken et al. 2022, "BitFit: Simple
Parameter-efficient Fine-tuning for Transformer-based Masked Language-models": biases only),
LayerNorm-only tuning, embeddings-only tuning, and unfreezing the last N transformer blocks,
in any combination.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.layers import is_norm
from ..core.ownership import declare_trainable
from ..core.targeting import find_backbone, find_block_list, head_module_names
from .base import Method, register

PARTS = ("head", "bias", "layernorm", "embeddings")


@register
@dataclass
class PartialFinetuningConfig(Method):
    """Train named parts of the model and/or its last N transformer blocks."""

    parts: list[str] = field(default_factory=list)
    """Any of ``"head"`` (``lm_head``/output embeddings, ``classifier``/``score``), ``"bias"``
    (every bias: BitFit), ``"layernorm"`` (every normalization layer), ``"embeddings"``
    (input embeddings, plus position/token-type embeddings where the model has them)."""
    last_n_layers: int | None = None
    """Also train every parameter of the last N transformer blocks."""

    name = "partial"
    callback_name = "PartialFinetuning"
    example = {"parts": ["layernorm"], "last_n_layers": 1}
    in_place = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.parts, str):
            self.parts = [self.parts]
        if not isinstance(self.parts, (list, tuple)) or not all(isinstance(p, str) for p in self.parts):
            raise ValueError(f"parts must be a list of names from {list(PARTS)}, got {self.parts!r}")
        self.parts = list(self.parts)
        unknown = [p for p in self.parts if p not in PARTS]
        if unknown:
            raise ValueError(f"unknown part(s) {unknown}; choose from {list(PARTS)}")
        if self.last_n_layers is not None and (
            isinstance(self.last_n_layers, bool)
            or not isinstance(self.last_n_layers, int)
            or self.last_n_layers < 1
        ):
            raise ValueError(f"last_n_layers must be a positive integer or None, got {self.last_n_layers!r}")
        if not self.parts and self.last_n_layers is None:
            raise ValueError(f"PartialFinetuning needs parts (from {list(PARTS)}) and/or last_n_layers")

    def merge(self, model: nn.Module) -> None:
        """Nothing to fold: the trained tensors are the base's own."""

    def folded_layers(self, model: nn.Module, dtype: torch.dtype) -> dict[str, dict[str, torch.Tensor]]:
        """No layer is wrapped: the plain model already holds every trained tensor."""
        return {}

    def inject(self, model: nn.Module) -> None:
        """Declare the chosen parts trainable."""
        adapter = self.adapter_name
        if self.last_n_layers is not None:
            name, blocks = find_block_list(model)
            if self.last_n_layers > len(blocks):
                raise ValueError(
                    f"last_n_layers={self.last_n_layers} but the model has only {len(blocks)} "
                    f"transformer blocks (in {name}); choose 1..{len(blocks)}"
                )
            for block in list(blocks)[-self.last_n_layers :]:
                declare_trainable(block, adapter=adapter)
        if "head" in self.parts:
            heads = head_module_names(model)
            if not heads:
                raise ValueError(
                    f"part 'head' found no task head in {type(model).__name__} (looked for the output "
                    "embeddings and modules named lm_head, classifier, score)"
                )
            for name in heads:
                declare_trainable(model.get_submodule(name), adapter=adapter)
        if "embeddings" in self.parts:
            self._declare_embeddings(model, adapter)
        found = {"bias": False, "layernorm": False}
        for module in model.modules():
            if "bias" in self.parts:
                biases = [
                    n for n, p in module.named_parameters(recurse=False) if n == "bias" and p is not None
                ]
                if biases:
                    declare_trainable(module, biases, adapter=adapter)
                    found["bias"] = True
            if "layernorm" in self.parts and is_norm(module):
                declare_trainable(module, adapter=adapter)
                found["layernorm"] = True
        for part, hit in found.items():
            if part in self.parts and not hit:
                what = "bias parameters" if part == "bias" else "normalization layers"
                raise ValueError(f"part {part!r}: {type(model).__name__} has no {what}; choose other parts")

    @staticmethod
    def _declare_embeddings(model: nn.Module, adapter: str) -> None:
        backbone = find_backbone(model)
        get_in = getattr(backbone, "get_input_embeddings", None)
        table = get_in() if callable(get_in) else None
        if table is None:
            raise ValueError(f"part 'embeddings' found no input embedding layer in {type(model).__name__}")
        declare_trainable(table, adapter=adapter)
        # Position / token-type tables are nn.Embedding siblings of the token table
        # (BERT's embeddings block, GPT-2's wpe beside wte); Llama has none.
        owner = next(n for n, m in backbone.named_modules() if m is table).rpartition(".")[0]
        for name, module in backbone.named_modules():
            if isinstance(module, nn.Embedding) and name.rpartition(".")[0] == owner:
                declare_trainable(module, adapter=adapter)
