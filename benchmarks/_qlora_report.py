"""The QLoRA benchmark's printed report: peak memory, its breakdown, optimizers, FSDP2 and step times."""

from __future__ import annotations

from _models import MIB

NF4_DQ_LIMIT = 4 + 8 / 64 + 32 / (64 * 256)
GOALS = {"vs_peft4": 0.55, "vs_peft_bf16": 0.60, "checkpointing_vs_floor": 1.25}
CUDA_GOALS = {"vs_peft_bf16": 0.45, "step_vs_bf16": 1.20}


def mib(x: float) -> str:
    return f"{x / MIB:.1f}"


def print_breakdown(runs: dict, floors: dict, unit: str) -> None:
    columns = [
        (k, f) for k, f in (("documented", False), ("documented_gc", True)) if "peak" in runs.get(k, {})
    ]
    if not columns:
        return
    head = " | ".join(
        f"{'checkpointing' if gc else 'no checkpointing'}: measured | floor" for _, gc in columns
    )
    print(f"\nbreakdown of the documented path, MiB ({unit}):\n")
    print(f"| part | {head} |")
    print("|---|" + "---|---|" * len(columns))
    rows = [
        ("4-bit linear weights (codes + scales)", "quantized"),
        ("embeddings, head, norms (bf16)", "other"),
        ("LoRA parameters (fp32)", "adapters"),
        ("gradients (fp32)", "grads"),
        ("optimizer state", "optimizer"),
        ("activations (growth over the forward pass)", "activations"),
    ]
    for label, key in rows:
        cells = " | ".join(f"{mib(runs[k][key])} | {mib(floors[gc][key])}" for k, gc in columns)
        print(f"| {label} | {cells} |")
    cells = " | ".join(f"{mib(runs[k]['saved_for_backward'])} | -" for k, _ in columns)
    print(f"| of which saved for backward outside checkpointed blocks | {cells} |")
    rest = []
    for k, _ in columns:
        r = runs[k]
        parts = sum(r[key] for _, key in rows)
        rest.append(f"{mib(r['peak'] - parts)} | 0")
    print(f"| allocator, libraries, temporaries (peak - the rows above) | {' | '.join(rest)} |")
    cells = " | ".join(f"{mib(runs[k]['peak'])} | {mib(floors[gc]['total'])}" for k, gc in columns)
    print(f"| peak | {cells} |")
    for k, gc in columns:
        r = runs[k]
        print(
            f"{'checkpointing' if gc else 'no checkpointing'}: loading peaked at {mib(r['load_peak'])} MiB "
            f"(resident after loading {mib(r['resident_after_load'])} MiB); peak by phase: forward "
            f"{mib(r['forward_peak'])}, backward {mib(r['backward_peak'])}, optimizer step {mib(r['step_peak'])} MiB"
        )


def measured_rows(runs: dict, labels: dict[str, str], columns: int):
    """``(label, result)`` of each run with a peak, in row order; a failed run prints its row here."""
    for name, label in labels.items():
        r = runs.get(name, {})
        if "peak" in r:
            yield label, r
        elif "error" in r:
            print(f"| {label} | failed: {r['error']} |" + " |" * (columns - 2))


def report_memory(runs: dict, labels: dict[str, str], floors: dict, args, unit: str) -> None:
    """The peak of each run (``labels``: run name to row label, in row order), the goals, the breakdown."""
    print(f"\npeak memory, {unit}, MiB (each run a fresh process):\n")
    print("| run | peak MiB | vs transformers + PEFT QLoRA | vs PEFT bf16 LoRA |")
    print("|---|---|---|---|")
    ref4, ref16 = runs.get("peft4", {}).get("peak"), runs.get("peft_bf16", {}).get("peak")
    for label, r in measured_rows(runs, labels, columns=4):
        a = f"{r['peak'] / ref4:.3f}" if ref4 else "-"
        b = f"{r['peak'] / ref16:.3f}" if ref16 else "-"
        print(f"| {label} | {mib(r['peak'])} | {a} | {b} |")
    doc, gc = runs.get("documented", {}), runs.get("documented_gc", {})
    print()
    if "bits_per_quantized_weight" in doc:
        bits = doc["bits_per_quantized_weight"]
        print(
            f"bits per quantized weight (NF4 + double quant): {bits:.4f}  (limit {NF4_DQ_LIMIT:.4f}: "
            f"{'ok' if bits <= NF4_DQ_LIMIT + 1e-3 else 'OVER'}); {doc['quantized_layers']} layers"
        )
    cuda = args.device.startswith("cuda")
    if "peak" in doc and ref4:
        goal = "" if cuda else f" (goal <= {GOALS['vs_peft4']})"
        print(f"goal, documented / transformers+PEFT QLoRA: {doc['peak'] / ref4:.3f}{goal}")
    if "peak" in doc and ref16:
        goal = CUDA_GOALS["vs_peft_bf16"] if cuda else GOALS["vs_peft_bf16"]
        print(f"goal, documented / PEFT bf16 LoRA: {doc['peak'] / ref16:.3f} (goal <= {goal})")
    if "peak" in gc:
        print(
            f"goal, documented with gradient checkpointing / floor arithmetic: "
            f"{gc['peak'] / floors[True]['total']:.3f} (goal <= {GOALS['checkpointing_vs_floor']})"
        )
    print_breakdown(runs, floors, unit)


def report_optimizers(runs: dict, labels: dict[str, str], unit: str, counts: dict) -> None:
    """Optimizer state and peak of each run (``labels``: run name to row label, in row order)."""
    if not runs:
        return
    print(
        f"\noptimizers on the documented path with gradient checkpointing ({counts['adapters'] / 1e6:.2f}M "
        f"trainable parameters; {unit}):\n"
    )
    print("| optimizer | state MiB | state bytes / parameter | peak MiB | peak vs AdamW |")
    print("|---|---|---|---|---|")
    ref = runs.get("adamw", {}).get("peak")
    for label, r in measured_rows(runs, labels, columns=5):
        per = r["optimizer"] / counts["adapters"]
        vs = f"{r['peak'] / ref:.3f}" if ref else "-"
        print(f"| {label} | {mib(r['optimizer'])} | {per:.2f} | {mib(r['peak'])} | {vs} |")
    print(
        "paged optimizers page their state to host memory under GPU memory pressure (CUDA unified memory); on "
        "CPU bitsandbytes falls back to the plain 8-bit optimizer"
    )


def report_fsdp2(runs: dict, floors: dict) -> None:
    print(
        "\nFSDP2 (ModelParallelStrategy) on 2 CPU processes (gloo), QLoRA, no checkpointing; per rank, MiB:\n"
    )
    print(
        "| path | rank | peak RSS | while loading | 4-bit codes kept (of all) | embeddings, head, norms kept |"
    )
    print("|---|---|---|---|---|---|")
    labels = {
        "documented": "CausalLM(path): each rank streams into 4-bit, then shards",
        "preloaded": "CausalLM(from_pretrained(path)): each rank loads bf16, quantizes, shards",
    }
    for kind, ranks in runs.items():
        if isinstance(ranks, dict):
            print(f"| {labels[kind]} | - | failed: {ranks['error']} | | | |")
            continue
        for rank, r in enumerate(ranks):
            print(
                f"| {labels[kind]} | {rank} | {mib(r['peak'])} | {mib(r['load_peak'])} | "
                f"{mib(r['local_code_bytes'])} ({mib(r['global_code_bytes'])}) | {mib(r['other'])} |"
            )


def report_time(timing: dict, args) -> None:
    med, low = timing.get("median_step_s", {}), timing.get("min_step_s", {})
    if med:
        print()
    for kind, s in med.items():
        print(f"step time {kind}: median {s:.3f} s, fastest {low[kind]:.3f} s")
    cuda = args.device.startswith("cuda")
    if "ours4" in med and "bf16" in med:
        goal = f"  (goal on CUDA <= {CUDA_GOALS['step_vs_bf16']})" if cuda else ""
        print(
            f"QLoRA / bf16 LoRA step time: {med['ours4'] / med['bf16']:.3f} (medians), "
            f"{low['ours4'] / low['bf16']:.3f} (fastest){goal}"
        )
    if "ours4" in med and "peft4" in med:
        print(
            f"ours / transformers+PEFT QLoRA step time: {med['ours4'] / med['peft4']:.3f} (medians), "
            f"{low['ours4'] / low['peft4']:.3f} (fastest)"
        )
    for kind, message in timing.get("errors", {}).items():
        print(f"{kind} could not run: {message}")
    if "error" in timing:
        print(f"timing run failed: {timing['error']}")
    req = timing.get("requantization")
    if req:
        print(
            f"re-quantizing merged weights instead of a bf16 export: logits cosine {req['cosine_requantized']:.5f} "
            f"(bf16-exact merge {req['cosine_merged']:.5f}), mean |diff| {req['mean_abs_requantized']:.4f} "
            f"vs {req['mean_abs_merged']:.4f}, max |diff| {req['max_abs_requantized']:.4f}"
        )
