"""The Llama-shaped random models the benchmarks build (one definition of their shape)."""

from __future__ import annotations

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
"""Every linear layer of a Llama block: the LoRA targets of every benchmark."""


def llama_config(
    hidden: int,
    layers: int,
    vocab: int,
    *,
    ffn_ratio: float = 8 / 3,
    kv_group: int = 1,
    max_positions: int = 1024,
):
    """A ``LlamaConfig`` with 64-wide heads, the feed-forward ``ffn_ratio x hidden`` (rounded
    down to a multiple of 64) and one key/value head per ``kv_group`` query heads."""
    from transformers import LlamaConfig

    heads = max(hidden // 64, 1)
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(hidden * ffn_ratio) // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(heads // kv_group, 1),
        max_position_embeddings=max_positions,
    )
