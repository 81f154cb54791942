"""Memory per GPU for LoRA and QLoRA on Llama-2 7B/13B/70B under DDP, FSDP and DeepSpeed ZeRO-3.

The numbers of ``docs/scaling.md``, from its formulas. Parameter counts are not taken on
trust: each Llama-2 shape is built on the ``meta`` device (no memory), LoRA r=16 is applied
to every linear layer with our callback, and ``count_parameters`` gives the exact base and
adapter sizes the formulas use.

Usage::

    python benchmarks/scaling_memory.py                 # seq 2048, micro-batch 1, 8 GPUs
    python benchmarks/scaling_memory.py --seq 4096 --batch 2 --gpus 16
"""

from __future__ import annotations

import argparse

import torch

GIB = 2**30
NF4_BITS = 4.127  # 4-bit codes + 8-bit scale per 64 weights + fp32 scale per 256 scales
SHAPES = {  # Llama-2 configs: hidden, intermediate, layers, heads, kv heads
    "7B": (4096, 11008, 32, 32, 32),
    "13B": (5120, 13824, 40, 40, 40),
    "70B": (8192, 28672, 80, 64, 8),
}
VOCAB = 32000


def counts(name: str, r: int) -> dict[str, int]:
    """Exact parameter counts of a Llama-2 shape with LoRA ``r`` on all linear layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_peft.callbacks import LoRA
    from lightning_peft.methods.base import count_parameters

    hidden, inter, layers, heads, kv = SHAPES[name]
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    base = sum(p.numel() for p in model.parameters())
    linear = sum(
        m.weight.numel()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n != "lm_head"
    )
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    LoRA(r=r, alpha=2 * r, target_modules="all-linear").apply(model)
    adapters, total = count_parameters(model)
    assert total - adapters == base
    return {
        "base": base,
        "linear": linear,
        "block": block,
        "adapters": adapters,
        "layers": layers,
        "hidden": hidden,
    }


def per_gpu(
    c: dict[str, int], *, qlora: bool, strategy: str, gpus: int, seq: int, batch: int
) -> dict[str, float]:
    """GiB per GPU: base weights, trainable state, activations, gathered blocks, total."""
    if qlora:
        base = c["linear"] * NF4_BITS / 8 + (c["base"] - c["linear"]) * 2
        block = c["block"] * NF4_BITS / 8
    else:
        base = c["base"] * 2  # bf16
        block = c["block"] * 2
    trainable = c["adapters"] * (4 + 4 + 8)  # fp32 weights, fp32 grads, AdamW's two fp32 moments
    h, layers = c["hidden"], c["layers"]
    act = 2 * seq * batch * h * layers  # bf16 block inputs kept by checkpointing
    act += 34 * seq * batch * h  # one block recomputed in backward (flash/SDPA attention: no s^2 term)
    act += 6 * seq * batch * VOCAB  # bf16 logits + their fp32 copy for the loss
    gathered = 0.0
    if strategy != "ddp":
        base, trainable = base / gpus, trainable / gpus
        gathered = 2 * block  # the block computing plus the one prefetched
    out = {"base": base, "trainable": trainable, "act": act, "gathered": gathered}
    out = {k: v / GIB for k, v in out.items()}
    out["total"] = sum(out.values())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1, help="micro-batch per GPU")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs the sharded strategies shard over")
    parser.add_argument("--r", type=int, default=16)
    args = parser.parse_args()
    print(
        f"seq {args.seq}, micro-batch {args.batch}, LoRA r={args.r} all-linear, sharded over {args.gpus} GPUs\n"
    )
    print(
        "| model | params | adapters | base | strategy | base weights | adapters+grads+AdamW | activations | gathered blocks | total GiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in SHAPES:
        c = counts(name, args.r)
        for qlora in (False, True):
            for strategy in ("ddp", "fsdp", "zero3"):
                m = per_gpu(c, qlora=qlora, strategy=strategy, gpus=args.gpus, seq=args.seq, batch=args.batch)
                kind = "NF4" if qlora else "bf16"
                label = {"ddp": "DDP", "fsdp": f"FSDP2 x{args.gpus}", "zero3": f"ZeRO-3 x{args.gpus}"}[
                    strategy
                ]
                if qlora and strategy == "zero3":
                    label += " (refused)"
                print(
                    f"| {name} | {c['base'] / 1e9:.2f}B | {c['adapters'] / 1e6:.1f}M | {kind} | {label} | "
                    f"{m['base']:.2f} | {m['trainable']:.2f} | {m['act']:.2f} | {m['gathered']:.2f} | {m['total']:.1f} |"
                )


if __name__ == "__main__":
    main()
