"""LoRA: lightning-peft vs Hugging Face PEFT on the same Llama-shaped model, CPU.

Measures, with the same model, targets, rank, batch and seed:

* training step time (forward + backward + AdamW step), ours / PEFT, alternating runs in
  one process, without and with dropout 0.05 (target <= 1.00);
* peak RSS of a training run with dropout 0.05, each in a fresh subprocess, ours / PEFT
  (target <= 1.00);
* inference latency after merging, ours / the plain base model (target <= 1.02);
* un-merged inference latency, ours / PEFT (target <= 1.00).

Usage::

    python benchmarks/lora_vs_peft.py               # hidden 768, 4 layers, seq 256, batch 4
    python benchmarks/lora_vs_peft.py --hidden 512 --layers 4 --processes 5

Timings are noisy on shared machines, and part of the noise belongs to a process rather than
to a model (where the allocator happened to place the weights, huge pages or not), so one
process can favour either side by 10-20 %. The timed comparisons therefore run in
``--processes`` fresh processes (building the two models in alternating order); inside each,
runs alternate (ours, PEFT, PEFT, ours, ...) and each side's time is the best of its rounds.
The table prints the median ratio over the processes and their range.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from _models import TARGETS, llama_config

DEVICE = torch.device("cpu")
DTYPE = torch.float32


def build_base(hidden: int, layers: int, seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(hidden, layers, 4096))


def build(kind: str, hidden: int, layers: int, r: int, dropout: float):
    model = build_base(hidden, layers).to(DEVICE, DTYPE)
    if kind == "ours":
        from lightning_peft.callbacks import LoRA

        LoRA(r=r, alpha=2 * r, dropout=dropout, target_modules=TARGETS).apply(model)
    elif kind == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=TARGETS)
        )
    elif kind != "base":
        raise ValueError(kind)
    return model


def batch_for(batch: int, seq: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 4096, (batch, seq), generator=g)
    ids = ids.to(DEVICE)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def make_step(model):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(batch):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def timed(fn, batch, steps: int) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        fn(batch)
    sync()
    return (time.perf_counter() - start) / steps


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def alternate(runs: dict, batch, args) -> dict[str, float]:
    """Best time per call of each run over ``args.repeats`` alternating rounds of ``args.steps`` calls."""
    for fn in runs.values():  # warm-up
        timed(fn, batch, 1)
    times: dict[str, list[float]] = {k: [] for k in runs}
    kinds = list(runs)
    for i in range(args.repeats):
        for kind in kinds if i % 2 == 0 else kinds[::-1]:
            times[kind].append(timed(runs[kind], batch, args.steps))
    return {k: min(v) for k, v in times.items()}


def bench_train(args, order: tuple[str, str], dropout: float = 0.0) -> dict[str, float]:
    batch = batch_for(args.batch, args.seq)
    steps = {k: make_step(build(k, args.hidden, args.layers, args.r, dropout).train()) for k in order}
    return alternate(steps, batch, args)


def bench_inference(args, order: tuple[str, str]) -> dict[str, float]:
    from lightning_peft import merge

    batch = {k: v for k, v in batch_for(args.batch, args.seq).items() if k != "labels"}
    models = {"base": build("base", args.hidden, args.layers, args.r, 0.0).eval()}
    for kind in order:
        models[kind] = build(kind, args.hidden, args.layers, args.r, 0.0).eval()
    merged = build("ours", args.hidden, args.layers, args.r, 0.0).eval()
    with torch.no_grad():
        for model in (models["ours"], models["peft"], merged):  # non-zero B so nothing is skipped
            for name, p in model.named_parameters():
                if "lora_b" in name.lower():
                    p.normal_(std=0.01)
        merge(merged)
    models["merged"] = merged

    def forward(model):
        def run(b):
            with torch.no_grad():
                model(**b)

        return run

    return alternate({k: forward(m) for k, m in models.items()}, batch, args)


def timing_child(args) -> None:
    """One process's timings (seconds per call), as JSON on the last line of stdout."""
    order = ("ours", "peft") if args.timing_child % 2 == 0 else ("peft", "ours")
    parts = set(args.only.split(","))
    out: dict[str, dict[str, float]] = {}
    if "train" in parts:
        out["train"] = bench_train(args, order)
        out["train_dropout"] = bench_train(args, order, dropout=0.05)
    if "inference" in parts:
        out["inference"] = bench_inference(args, order)
    print(json.dumps(out))


def _child_args(args) -> list[str]:
    return [
        *("--hidden", str(args.hidden), "--layers", str(args.layers), "--seq", str(args.seq)),
        *("--batch", str(args.batch), "--r", str(args.r), "--steps", str(args.steps)),
        *(
            "--repeats",
            str(args.repeats),
            "--only",
            args.only,
            "--device",
            args.device,
            "--dtype",
            args.dtype,
        ),
    ]


def run_child(flag: list[str], args) -> dict:
    cmd = [sys.executable, __file__, *flag, *_child_args(args)]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child {flag} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def child_peak_rss(kind: str, args) -> dict[str, int]:
    """Train ``args.steps`` steps with dropout 0.05 in a fresh process; its peak RSS and RSS before (bytes)."""
    return run_child(["--rss-child", kind], args)


def _vm(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes (``VmHWM``: peak RSS of this address space)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_child(kind: str, args) -> None:
    # getrusage's ru_maxrss survives fork+exec (it would report the parent's peak); VmHWM does not.
    model = build(kind, args.hidden, args.layers, args.r, 0.05).train()
    step = make_step(model)
    batch = batch_for(args.batch, args.seq)
    gc.collect()
    if DEVICE.type == "cuda":  # peak allocated GPU memory instead of RSS
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        timed(step, batch, args.steps)
        print(json.dumps({"peak_rss": torch.cuda.max_memory_allocated(), "before": before}))
        return
    before = _vm("VmRSS")
    timed(step, batch, args.steps)
    print(json.dumps({"peak_rss": _vm("VmHWM"), "before": before}))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed round")
    parser.add_argument("--repeats", type=int, default=6, help="alternating rounds per measurement")
    parser.add_argument("--processes", type=int, default=3, help="fresh processes for the timed comparisons")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16"), help="model and LoRA dtype"
    )
    parser.add_argument(
        "--only", default="train,rss,inference", help="comma-separated subset of: train, rss, inference"
    )
    parser.add_argument("--rss-child", choices=["ours", "peft"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--timing-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    global DEVICE, DTYPE
    DEVICE, DTYPE = torch.device(args.device), getattr(torch, args.dtype)
    if args.rss_child:
        rss_child(args.rss_child, args)
        return
    if args.timing_child is not None:
        timing_child(args)
        return

    print(
        f"Llama-shaped model: hidden {args.hidden}, {args.layers} layers, seq {args.seq}, batch {args.batch}, "
        f"LoRA r={args.r} on {','.join(TARGETS)}; torch {torch.__version__}, {args.device} ({args.dtype}), "
        f"{torch.get_num_threads()} threads; "
        f"timings: {args.processes} processes x {args.repeats} rounds x {args.steps} steps"
    )
    parts = set(args.only.split(","))
    rows = []
    if parts & {"train", "inference"}:
        runs = [run_child(["--timing-child", str(i)], args) for i in range(args.processes)]
        measures = [
            ("train", "training step (s), dropout 0", "ours", "peft", "<= 1.00"),
            ("train_dropout", "training step (s), dropout 0.05", "ours", "peft", "<= 1.00"),
            ("inference", "un-merged inference (s)", "ours", "peft", "<= 1.00"),
            ("inference", "merged inference vs base (s)", "merged", "base", "<= 1.02"),
        ]
        for key, name, ours, ref, target in measures:
            if key in runs[0]:
                rows.append(
                    timing_row(name, [r[key][ours] for r in runs], [r[key][ref] for r in runs], target)
                )
    if "rss" in parts:
        child = {k: child_peak_rss(k, args) for k in ("ours", "peft")}
        rss = {k: v["peak_rss"] / 2**20 for k, v in child.items()}
        growth = {k: (v["peak_rss"] - v["before"]) / 2**20 for k, v in child.items()}
        memory = "peak GPU memory (MiB)" if args.device.startswith("cuda") else "peak RSS (MiB)"
        rows.append(
            (
                f"{memory}, dropout 0.05",
                rss["ours"],
                rss["peft"],
                rss["ours"] / rss["peft"],
                "",
                "<= 1.00",
            )
        )
        rows.append(
            (
                "  of which training (MiB)",
                growth["ours"],
                growth["peft"],
                growth["ours"] / growth["peft"],
                "",
                "(info)",
            )
        )
    print(f"\n{'measure':<32}{'ours':>10}{'reference':>11}{'ratio':>8}  {'range':<13}  target")
    for name, ours, ref, ratio, spread, target in rows:
        print(f"{name:<32}{ours:>10.4f}{ref:>11.4f}{ratio:>8.3f}  {spread:<13}  {target}")
    print(
        "\nreference = HF PEFT, except the merged row (the plain base model). Timing rows: median over"
        "\nprocesses of each side's best time, the median of the per-process ratios, and their range."
    )


def timing_row(name: str, ours: list[float], ref: list[float], target: str) -> tuple:
    ratios = sorted(o / r for o, r in zip(ours, ref))
    spread = f"{ratios[0]:.3f}-{ratios[-1]:.3f}" if len(ratios) > 1 else ""
    return name, statistics.median(ours), statistics.median(ref), statistics.median(ratios), spread, target


if __name__ == "__main__":
    main()
