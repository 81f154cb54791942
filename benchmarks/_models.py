"""The Llama-shaped models the benchmarks build (one definition of their shape) and QLoRA's floor arithmetic."""

from __future__ import annotations

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
"""Every linear layer of a Llama block: the LoRA targets of every benchmark."""

NF4_BITS = 4.127
"""Bits per NF4 weight with double quantization: 4 + an 8-bit scale per 64 weights + an fp32 scale per 256 scales."""

MIB = 2**20
GIB = 2**30


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


def llama_counts(config, r: int) -> dict[str, int]:
    """Exact parameter counts of a Llama config with LoRA ``r`` on every linear layer of its blocks.

    The model is built on the ``meta`` device (no memory), LoRA is applied with our callback
    and ``count_parameters`` gives the adapter count: nothing is taken on trust.
    """
    import torch
    from transformers import LlamaForCausalLM

    from lightning_peft.callbacks import LoRA
    from lightning_peft.methods.base import count_parameters

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    base = sum(p.numel() for p in model.parameters())
    linear = sum(
        m.weight.numel()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n != "lm_head"
    )
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    LoRA(r=r, alpha=2 * r, target_modules=TARGETS).apply(model)
    adapters, total = count_parameters(model)
    assert total - adapters == base
    return {
        "base": base,
        "linear": linear,
        "block": block,
        "adapters": adapters,
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
        "vocab": config.vocab_size,
    }


OPTIMIZER_STATE_BYTES = {"adamw": 8.0, "adamw8bit": 2.0 + 8 / 256, "paged_adamw8bit": 2.0 + 8 / 256}
"""Optimizer-state bytes per trainable parameter: AdamW's two fp32 moments, or two 8-bit
moments with an fp32 scale per block of 256 (bitsandbytes' blockwise 8-bit states)."""


def activation_bytes(counts: dict[str, int], *, seq: int, batch: int, checkpointing: bool) -> float:
    """Activation bytes of one training step (bf16; docs/scaling.md's assumptions).

    Without checkpointing every block keeps about ``34 s b h`` bytes (Korthikanti et al.
    2022, with flash/SDPA attention: no ``s^2`` term); with it, each block's input is kept
    (``2 s b h``) and one block is recomputed at a time. The logits in bf16 plus their
    fp32 copy for the loss add ``6 s b V``.
    """
    h, layers, vocab = counts["hidden"], counts["layers"], counts["vocab"]
    logits = 6 * seq * batch * vocab
    if checkpointing:
        return 2 * seq * batch * h * layers + 34 * seq * batch * h + logits
    return 34 * seq * batch * h * layers + logits


def qlora_floor(
    counts: dict[str, int],
    *,
    seq: int,
    batch: int,
    checkpointing: bool,
    optimizer: str = "adamw",
    bits: float = NF4_BITS,
) -> dict[str, float]:
    """QLoRA's memory floor in bytes, part by part, and its ``total``.

    4-bit linear weights, bf16 embeddings/head/norms, fp32 adapters, their fp32 gradients,
    the optimizer state and the activations; nothing for allocators, libraries or
    temporaries.
    """
    a = counts["adapters"]
    parts = {
        "quantized": counts["linear"] * bits / 8,
        "other": (counts["base"] - counts["linear"]) * 2,
        "adapters": 4 * a,
        "grads": 4 * a,
        "optimizer": OPTIMIZER_STATE_BYTES[optimizer] * a,
        "activations": activation_bytes(counts, seq=seq, batch=batch, checkpointing=checkpointing),
    }
    parts["total"] = sum(parts.values())
    return parts
