"""Memory per GPU for LoRA and QLoRA on Llama 7B to 70B, and QLoRA's headline: a 65B model on one 48 GB GPU.

The numbers of ``docs/scaling.md`` and ``docs/qlora.md``, from their formulas
(``_models.qlora_floor`` and ``per_gpu`` below). Parameter counts are not taken on trust:
each Llama shape is built on the ``meta`` device (no memory), LoRA r=16 is applied to every
linear layer with our callback, and ``count_parameters`` gives the exact base and adapter
sizes the formulas use.

Printed:

* per-GPU memory of LoRA and QLoRA on Llama-2 7B/13B/70B under DDP, FSDP2 and ZeRO-3;
* QLoRA fine-tuning Llama-65B and Llama-2-70B on one GPU (base, adapters, gradients,
  optimizer state, activations with gradient checkpointing at ``--seq`` 2048, batch 1), with
  32-bit and 8-bit AdamW, and the largest model that fits in 48 GB and in 24 GB;
* with ``--measure``: a scaling run on this machine. Llama shapes of about 100M, 370M and
  1B parameters are built from configs, saved as bf16 safetensors to a temporary folder
  (deleted right after each run), and fine-tuned with QLoRA on the documented path
  (``CausalLM(folder)`` + ``FourBitPrecision`` + ``LoRA``, gradient checkpointing) in a
  fresh process each (``benchmarks/qlora.py``'s job). Peak memory is fitted as
  ``c + k x parameters`` (bytes per parameter ``k``), and the fit's prediction is printed
  next to the floor arithmetic at the same settings, up to 70B. ``--plot`` draws it.

Usage::

    python benchmarks/scaling_memory.py                  # seq 2048, micro-batch 1, 8 GPUs
    python benchmarks/scaling_memory.py --seq 4096 --batch 2 --gpus 16
    python benchmarks/scaling_memory.py --measure --plot docs/qlora-scaling.png   # ~20 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import tempfile

from _models import GIB, MIB, NF4_BITS, llama_counts, qlora_floor

SHAPES = {  # hidden, intermediate, layers, heads, kv heads (vocabulary 32000)
    "7B": (4096, 11008, 32, 32, 32),  # Llama-2 7B
    "13B": (5120, 13824, 40, 40, 40),  # Llama-2 13B
    "70B": (8192, 28672, 80, 64, 8),  # Llama-2 70B
}
FAMILY = {  # the Llama family, for "the largest model that fits"
    "7B": SHAPES["7B"],
    "13B": SHAPES["13B"],
    "33B": (6656, 17920, 60, 52, 52),  # LLaMA 33B ("30B")
    "34B": (8192, 22016, 48, 64, 8),  # Code Llama 34B
    "65B": (8192, 22016, 80, 64, 64),  # LLaMA 65B, QLoRA's headline model
    "70B": SHAPES["70B"],
}
HEADLINE = ("65B", "70B")
MEASURED = {"100M": (640, 12), "370M": (1024, 24), "1B": (2048, 18)}  # hidden, layers; MLP 11/4 hidden
VOCAB = 32000
GPU_BUDGETS = (48, 24)  # GB cards (48 GiB / 24 GiB of memory)
RESERVE_GIB = 1.5  # CUDA context, allocator fragmentation, buffers (docs/scaling.md: 1-2 GiB)


def config_of(shape: tuple[int, int, int, int, int]):
    from transformers import LlamaConfig

    hidden, inter, layers, heads, kv = shape
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
    )


def counts(name: str, r: int) -> dict[str, int]:
    """Exact parameter counts of a Llama shape of :data:`FAMILY` with LoRA ``r`` on all linear layers."""
    return llama_counts(config_of(FAMILY[name]), r)


def per_gpu(
    c: dict[str, int], *, qlora: bool, strategy: str, gpus: int, seq: int, batch: int
) -> dict[str, float]:
    """GiB per GPU: base weights, trainable state, activations, gathered blocks, total."""
    floor = qlora_floor(c, seq=seq, batch=batch, checkpointing=True)
    if qlora:
        base = floor["quantized"] + floor["other"]
        block = c["block"] * NF4_BITS / 8
    else:
        base = c["base"] * 2  # bf16
        block = c["block"] * 2
    trainable = floor["adapters"] + floor["grads"] + floor["optimizer"]  # fp32 weights, grads, AdamW moments
    act = floor["activations"]
    gathered = 0.0
    if strategy != "ddp":
        base, trainable = base / gpus, trainable / gpus
        gathered = 2 * block  # the block computing plus the one prefetched
    out = {"base": base, "trainable": trainable, "act": act, "gathered": gathered}
    out = {k: v / GIB for k, v in out.items()}
    out["total"] = sum(out.values())
    return out


# --------------------------------------------------------------------------- the strategies table
def strategies_table(args) -> None:
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


# --------------------------------------------------------------------------- the headline
def one_gpu(c: dict[str, int], *, seq: int, batch: int, optimizer: str) -> dict[str, float]:
    """GiB of QLoRA on one GPU (or per GPU under DDP), part by part."""
    floor = qlora_floor(c, seq=seq, batch=batch, checkpointing=True, optimizer=optimizer)
    return {k: v / GIB for k, v in floor.items()}


def headline(args) -> dict:
    print(
        f"\nQLoRA on one GPU: NF4 base with double quantization, LoRA r={args.r} on every linear layer, "
        f"gradient checkpointing, seq {args.seq}, batch {args.batch}; GiB\n"
    )
    print(
        "| model | params | adapters | 4-bit linear | bf16 embeddings+head | adapters (fp32) | gradients | "
        "optimizer state | activations | total |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    family = {name: counts(name, args.r) for name in FAMILY}
    totals: dict[str, dict[str, float]] = {}
    for name in HEADLINE:
        c = family[name]
        for optimizer, label in (("adamw", "AdamW 32-bit"), ("adamw8bit", "AdamW 8-bit")):
            g = one_gpu(c, seq=args.seq, batch=args.batch, optimizer=optimizer)
            totals.setdefault(name, {})[optimizer] = g["total"]
            print(
                f"| {name}, {label} | {c['base'] / 1e9:.1f}B | {c['adapters'] / 1e6:.0f}M | {g['quantized']:.2f} | "
                f"{g['other']:.2f} | {g['adapters']:.2f} | {g['grads']:.2f} | {g['optimizer']:.2f} | "
                f"{g['activations']:.2f} | **{g['total']:.1f}** |"
            )
    print(
        f"\nfits a card when the total plus {RESERVE_GIB} GiB (CUDA context, allocator, buffers) is within its "
        "memory; paged optimizers move the optimizer state to host memory only when the GPU runs out\n"
    )
    print(
        "| model | params | total, AdamW 32-bit | total, AdamW 8-bit | "
        + " | ".join(f"{b} GB" for b in GPU_BUDGETS)
        + " |"
    )
    print("|---|---|---|---|" + "---|" * len(GPU_BUDGETS))
    fits: dict[int, tuple[str, float]] = {}
    for name, c in sorted(family.items(), key=lambda kv: kv[1]["base"]):
        g32 = one_gpu(c, seq=args.seq, batch=args.batch, optimizer="adamw")["total"]
        g8 = one_gpu(c, seq=args.seq, batch=args.batch, optimizer="adamw8bit")["total"]
        cells = []
        for budget in GPU_BUDGETS:
            room = budget - RESERVE_GIB
            cell = "yes" if g32 <= room else ("with 8-bit AdamW" if g8 <= room else "no")
            cells.append(cell)
            if g8 <= room and c["base"] > fits.get(budget, ("", 0))[1]:
                fits[budget] = (name, c["base"])
        print(f"| {name} | {c['base'] / 1e9:.1f}B | {g32:.1f} | {g8:.1f} | " + " | ".join(cells) + " |")
    print()
    ref = family["65B"]
    per_param = (
        one_gpu(ref, seq=args.seq, batch=args.batch, optimizer="adamw8bit")["total"] * GIB / ref["base"]
    )
    for budget in GPU_BUDGETS:
        name = fits.get(budget, ("none", 0))[0]
        estimate = (budget - RESERVE_GIB) * GIB / per_param
        print(
            f"largest Llama that fits in {budget} GB: {name} (at 65B's {per_param:.3f} bytes per parameter, "
            f"about {estimate / 1e9:.0f}B parameters)"
        )
    return {"family": {k: v["base"] for k, v in family.items()}, "totals": totals, "fits": fits}


# --------------------------------------------------------------------------- the measured scaling run
def measure(args) -> dict:
    """Fine-tune each size of ``args.sizes`` on the documented path in a fresh process; fit bytes per parameter."""
    import qlora

    results = {}
    print(
        f"\nmeasured on this machine ({'GPU' if args.device.startswith('cuda') else 'CPU'}): QLoRA on the "
        f"documented path, gradient checkpointing, {args.measure_batch} x {args.measure_seq} tokens, LoRA r={args.r}, "
        f"2 AdamW steps; {'peak allocated' if args.device.startswith('cuda') else 'peak RSS above the post-import baseline'}\n"
    )
    previous = {}
    if args.reuse:  # the runs of an earlier --measure, from its printed RESULTS line
        with open(args.reuse) as f:
            line = next(x for x in f if x.startswith("RESULTS "))
        previous = json.loads(line[len("RESULTS ") :])["measured"]["runs"]
    for name, (hidden, layers) in args.sizes.items():
        if "peak" in previous.get(name, {}):
            results[name] = previous[name]
            print(f"  {name}: {results[name]['peak'] / MIB:.0f} MiB (from {args.reuse})")
            continue
        with tempfile.TemporaryDirectory(prefix="scaling-", dir=args.tmp) as folder:
            qlora.save_model(folder, hidden, layers, args.vocab)
            job_args = qlora.parse(
                [
                    *("--folder", folder, "--hidden", str(hidden), "--layers", str(layers)),
                    *("--vocab", str(args.vocab), "--batch", str(args.measure_batch)),
                    *("--seq", str(args.measure_seq), "--r", str(args.r), "--device", args.device),
                ]
            )
            run = qlora.run_job("documented", job_args, gc=1)
        c = llama_counts(qlora.config(hidden, layers, args.vocab), args.r)
        floor = qlora_floor(c, seq=args.measure_seq, batch=args.measure_batch, checkpointing=True)
        results[name] = {"counts": c, "floor": floor["total"], **run}
        print(
            f"  {name}: {run.get('peak', float('nan')) / MIB:.0f} MiB"
            + (f" ({run['error']})" if "error" in run else "")
        )
    ok = {k: v for k, v in results.items() if "peak" in v}
    if len(ok) < 2:
        return {"runs": results}
    k, c0 = _least_squares([v["counts"]["base"] for v in ok.values()], [v["peak"] for v in ok.values()])
    ka, ca = _least_squares([v["floor"] for v in ok.values()], [v["peak"] for v in ok.values()])
    print(
        f"\nfit: peak = {c0 / MIB:.0f} MiB + {k:.3f} bytes x parameters (least squares over {len(ok)} sizes)"
    )
    print(f"fit against the arithmetic: peak = {ca / MIB:.0f} MiB + {ka:.3f} x floor arithmetic\n")
    print(
        "| model | params | bf16 share | measured peak MiB | fit (bytes/parameter) MiB | "
        "fit (x arithmetic) MiB | floor arithmetic MiB | measured / floor |"
    )
    print("|---|---|---|---|---|---|---|---|")
    extrapolated = {}
    rows = [(f"{n} (measured)", v["counts"], v) for n, v in ok.items()]
    rows += [(f"{n} (extrapolated)", counts(n, args.r), None) for n in FAMILY]
    for label, c, run in rows:
        p = c["base"]
        floor = qlora_floor(c, seq=args.measure_seq, batch=args.measure_batch, checkpointing=True)["total"]
        share = (p - c["linear"]) / p
        measured = f"{run['peak'] / MIB:.0f}" if run else "-"
        ratio = f"{run['peak'] / floor:.2f}" if run else "-"
        print(
            f"| {label} | {p / 1e9:.2f}B | {share:.0%} | {measured} | {(c0 + k * p) / MIB:.0f} | "
            f"{(ca + ka * floor) / MIB:.0f} | {floor / MIB:.0f} | {ratio} |"
        )
        if run is None:
            extrapolated[label.split()[0]] = {
                "params": p,
                "fit": c0 + k * p,
                "fit_arithmetic": ca + ka * floor,
                "floor": floor,
            }
    fits = {"bytes_per_parameter": k, "constant": c0, "per_floor": ka, "per_floor_constant": ca}
    return {"runs": results, "fit": fits, "extrapolated": extrapolated}


def _least_squares(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Slope and intercept of the least-squares line through ``(xs, ys)``."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return slope, my - slope * mx


def plot(path: str, measured: dict, head: dict, args) -> None:
    """Memory against parameters: the headline arithmetic, the measured points, their fits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.2))
    family = head["family"]
    names = sorted(family, key=family.get)
    xs = [family[n] for n in names]
    for optimizer, style, label in (("adamw", "-", "AdamW 32-bit"), ("adamw8bit", "--", "8-bit AdamW")):
        ys = [
            one_gpu(counts(n, args.r), seq=args.seq, batch=args.batch, optimizer=optimizer)["total"]
            for n in names
        ]
        ax.plot(
            xs,
            ys,
            style,
            marker="o",
            ms=4,
            color="C0",
            label=f"floor arithmetic, one GPU, seq {args.seq}, {label}",
        )
        if optimizer == "adamw":
            for n, x, y in zip(names, xs, ys):
                if n in ("7B", "13B", "33B", "65B"):
                    ax.annotate(
                        n, (x, y), textcoords="offset points", xytext=(-14, 7), fontsize=8, color="C0"
                    )
    for budget, color in zip(GPU_BUDGETS, ("C3", "C1")):
        ax.axhline(budget - RESERVE_GIB, color=color, lw=1, ls=":")
        ax.text(
            3e9,
            (budget - RESERVE_GIB) * 1.05,
            f"{budget} GB card less {RESERVE_GIB} GiB",
            color=color,
            fontsize=8,
        )
    fit = measured.get("fit")
    if fit:
        runs = sorted(
            (v for v in measured["runs"].values() if "peak" in v), key=lambda v: v["counts"]["base"]
        )
        mx = [v["counts"]["base"] for v in runs]
        setting = f"{args.measure_batch}x{args.measure_seq} tokens"
        ax.plot(
            mx,
            [v["peak"] / GIB for v in runs],
            "s",
            color="C2",
            ms=7,
            label=f"measured here (CPU), {setting}",
        )
        ext = sorted(measured["extrapolated"].values(), key=lambda e: e["params"])
        line_x = [*mx, *(e["params"] for e in ext)]
        ax.plot(
            line_x,
            [(fit["constant"] + fit["bytes_per_parameter"] * x) / GIB for x in line_x],
            "-",
            color="C2",
            lw=1,
            label=f"fit: {fit['constant'] / MIB:.0f} MiB + {fit['bytes_per_parameter']:.2f} bytes/parameter",
        )
        floors = [v["floor"] for v in runs] + [e["floor"] for e in ext]
        ax.plot(
            line_x,
            [(fit["per_floor_constant"] + fit["per_floor"] * f) / GIB for f in floors],
            ":",
            color="C4",
            lw=1.5,
            label=f"fit: {fit['per_floor_constant'] / MIB:.0f} MiB + {fit['per_floor']:.2f} x floor arithmetic, {setting}",
        )
        ax.plot(
            line_x, [f / GIB for f in floors], "^", color="C4", ms=4, label=f"floor arithmetic, {setting}"
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("GiB (peak RSS above baseline on CPU; GPU memory)")
    ax.set_title(f"QLoRA fine-tuning memory: NF4 base, LoRA r={args.r}, gradient checkpointing")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"\nplot written to {path}")


def parse_sizes(text: str) -> dict[str, tuple[int, int]]:
    """``"100M,370M,1B"`` (named shapes) or ``"64x1,128x2"`` (hidden x layers)."""
    out = {}
    for item in text.split(","):
        if item in MEASURED:
            out[item] = MEASURED[item]
        else:
            hidden, layers = item.split("x")
            out[item] = (int(hidden), int(layers))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1, help="micro-batch per GPU")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs the sharded strategies shard over")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--measure", action="store_true", help="run the scaling measurement on this machine")
    parser.add_argument("--sizes", type=parse_sizes, default=parse_sizes("100M,370M,1B"))
    parser.add_argument("--vocab", type=int, default=VOCAB, help="vocabulary of the measured models")
    parser.add_argument("--measure-seq", type=int, default=128)
    parser.add_argument("--measure-batch", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tmp", default=None, help="where the measured models are saved (and deleted)")
    parser.add_argument("--plot", default=None, help="write the plot (PNG) here")
    parser.add_argument(
        "--reuse", default=None, help="take measured sizes from an earlier run's printed output"
    )
    args = parser.parse_args()
    strategies_table(args)
    head = headline(args)
    measured = measure(args) if args.measure else {}
    if args.plot:
        plot(args.plot, measured, head, args)
    print("RESULTS " + json.dumps({"headline": head, "measured": measured}, default=str))


if __name__ == "__main__":
    main()
