"""Serving many LoRA adapters in one batch: lightning-peft vs Hugging Face PEFT, CPU.

A Llama-shaped model carries ``k`` LoRA adapters (r=16 on all seven projections); a batch of
``k`` rows routes row *i* to adapter *i*: ours with ``adapter_per_row`` (each layer gathers
every row's factors and computes all rows' updates in two batched products), PEFT with
``model(..., adapter_names=[...])`` (one product per adapter over its sub-batch). Both
models hold the same weights; the outputs are checked equal before timing.

Printed, per row length and ``k``: the median forward time of each side, their ratio (goal
at k = 8: ours / PEFT <= 0.8), the base model's time without adapters and the ratio of the
time each side adds to it (the LoRA part, which is all that routing changes); then each
side's cost of k = 8 against k = 1. One token per row is a generation step (one new token
per row, no cache), 16 a short prompt, 128 a longer one.

Usage::

    python benchmarks/multi_adapter.py                       # hidden 1024, 4 layers, 1/16/128 tokens
    python benchmarks/multi_adapter.py --hidden 256 --layers 1 --seq 16 --repeats 3 --ks 1 2

Like the other benchmarks, timings on a shared machine are noisy: each side's time is the
median of ``--repeats`` rounds, the two sides alternating within a round.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _models import TARGETS, llama_config
from transformers import LlamaForCausalLM


def build(kind: str, hidden: int, layers: int, r: int, k: int):
    """The base with ``k`` adapters ``a0..a{k-1}`` of seeded random weights (the same on both sides)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(hidden, layers, 4096)).eval()
    names = [f"a{i}" for i in range(k)]
    if kind == "ours":
        from lightning_peft.callbacks import LoRA

        for name in names:
            LoRA(r=r, alpha=2 * r, target_modules=TARGETS, adapter_name=name).apply(model)
        pairs = lambda: [  # noqa: E731
            (m.lora[n].lora_a, m.lora[n].lora_b) for m in model.modules() if hasattr(m, "lora") for n in names
        ]
    else:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS)
        model = get_peft_model(model, config, adapter_name=names[0])
        for name in names[1:]:
            model.add_adapter(name, config)
        pairs = lambda: [  # noqa: E731
            (m.lora_A[n].weight, m.lora_B[n].weight)
            for m in model.modules()
            if hasattr(m, "lora_A")
            for n in names
        ]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for a, b in pairs():
            a.copy_(torch.randn(a.shape, generator=g) * 0.02)
            b.copy_(torch.randn(b.shape, generator=g) * 0.02)
    return model.eval(), names


def forward(kind: str, model, names: list[str], ids: torch.Tensor) -> torch.Tensor:
    if kind == "base":
        return model(input_ids=ids).logits
    if kind == "ours":
        from lightning_peft import adapter_per_row

        with adapter_per_row(model, names):
            return model(input_ids=ids).logits
    return model(input_ids=ids, adapter_names=names).logits


def measure(hidden: int, layers: int, r: int, seq: int, k: int, repeats: int) -> dict[str, float]:
    ids = torch.randint(0, 4096, (k, seq), generator=torch.Generator().manual_seed(2))
    sides = {kind: build(kind, hidden, layers, r, k) for kind in ("ours", "peft")}
    torch.manual_seed(0)
    sides["base"] = (LlamaForCausalLM(llama_config(hidden, layers, 4096)).eval(), [])  # no adapters
    with torch.no_grad():
        ours = forward("ours", *sides["ours"], ids)
        theirs = forward("peft", *sides["peft"], ids)
        gap = float((ours - theirs).abs().max())
        if gap > 1e-3:
            raise AssertionError(f"k={k}: outputs differ by {gap}")
        times: dict[str, list[float]] = {"ours": [], "peft": [], "base": []}
        for round_ in range(repeats + 1):
            for kind in ("ours", "peft", "base") if round_ % 2 else ("base", "peft", "ours"):
                start = time.perf_counter()
                forward(kind, *sides[kind], ids)
                if round_:  # the first round warms up
                    times[kind].append(time.perf_counter() - start)
    return {kind: statistics.median(values) for kind, values in times.items()} | {"gap": gap}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--seq", type=int, nargs="+", default=[1, 16, 128])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"Llama hidden {args.hidden}, {args.layers} layers, LoRA r={args.r} on {len(TARGETS)} projections, "
          f"one row per adapter, forward, {torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'tokens':>6} | {'k':>3} | {'ours (ms)':>10} | {'PEFT (ms)':>10} | {'ours / PEFT':>11} | "
          f"{'base (ms)':>10} | {'LoRA part ours / PEFT':>21} | max |diff|")  # fmt: skip
    results: dict[int, dict[int, dict[str, float]]] = {}
    for seq in args.seq:
        results[seq] = {}
        for k in args.ks:
            row = results[seq][k] = measure(args.hidden, args.layers, args.r, seq, k, args.repeats)
            extra = (row["ours"] - row["base"]) / max(row["peft"] - row["base"], 1e-9)
            print(f"{seq:>6} | {k:>3} | {1000 * row['ours']:>10.1f} | {1000 * row['peft']:>10.1f} | "
                  f"{row['ours'] / row['peft']:>11.3f} | {1000 * row['base']:>10.1f} | {extra:>21.3f} | "
                  f"{row['gap']:.1e}")  # fmt: skip
    first, last = min(args.ks), max(args.ks)
    for seq, rows in results.items():
        costs = ""
        if first != last:
            costs = ", cost of k={} vs k={}: ours {:.2f}x, PEFT {:.2f}x".format(
                last, first, rows[last]["ours"] / rows[first]["ours"], rows[last]["peft"] / rows[first]["peft"]
            )
        print(f"{seq} tokens per row: ours / PEFT at k={last} {rows[last]['ours'] / rows[last]['peft']:.3f} "
              f"(goal <= 0.80){costs}")  # fmt: skip


if __name__ == "__main__":
    main()
