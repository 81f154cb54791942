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
    python benchmarks/lora_vs_peft.py --hidden 512 --layers 4 --repeats 5

Numbers on a shared machine are noisy: runs alternate (ours, PEFT, PEFT, ours, ...) and each
timing is the best of several rounds, since other processes only ever add time. Run it on an
idle machine for figures you want to quote.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_base(hidden: int, layers: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=4096,
        hidden_size=hidden,
        intermediate_size=int(hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // 64, 1),
        num_key_value_heads=max(hidden // 64, 1),
        max_position_embeddings=1024,
    )
    return LlamaForCausalLM(cfg)


def build(kind: str, hidden: int, layers: int, r: int, dropout: float):
    model = build_base(hidden, layers)
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
    start = time.perf_counter()
    for _ in range(steps):
        fn(batch)
    return (time.perf_counter() - start) / steps


def bench_train(args, dropout: float = 0.0) -> tuple[float, float]:
    batch = batch_for(args.batch, args.seq)
    steps = {
        k: make_step(build(k, args.hidden, args.layers, args.r, dropout).train()) for k in ("ours", "peft")
    }
    for fn in steps.values():  # warm-up
        timed(fn, batch, 1)
    times: dict[str, list[float]] = {"ours": [], "peft": []}
    for i in range(args.repeats):
        order = ("ours", "peft") if i % 2 == 0 else ("peft", "ours")
        for kind in order:
            times[kind].append(timed(steps[kind], batch, args.steps))
    return min(times["ours"]), min(times["peft"])


def bench_inference(args) -> dict[str, float]:
    from lightning_peft import merge

    batch = {k: v for k, v in batch_for(args.batch, args.seq).items() if k != "labels"}
    models = {k: build(k, args.hidden, args.layers, args.r, 0.0).eval() for k in ("base", "ours", "peft")}
    merged = build("ours", args.hidden, args.layers, args.r, 0.0).eval()
    with torch.no_grad():
        for kind in ("ours", "peft"):  # non-zero B so nothing is skipped
            for name, p in models[kind].named_parameters():
                if "lora_b" in name.lower():
                    p.normal_(std=0.01)
        for name, p in merged.named_parameters():
            if "lora_b" in name:
                p.normal_(std=0.01)
        merge(merged)
    models = {"base": models["base"], "merged": merged, "ours": models["ours"], "peft": models["peft"]}

    def forward(model):
        def run(b):
            with torch.no_grad():
                model(**b)

        return run

    runs = {k: forward(m) for k, m in models.items()}
    for fn in runs.values():
        timed(fn, batch, 1)
    times: dict[str, list[float]] = {k: [] for k in runs}
    kinds = list(runs)
    for i in range(args.repeats):
        order = kinds if i % 2 == 0 else kinds[::-1]
        for kind in order:
            times[kind].append(timed(runs[kind], batch, args.steps))
    return {k: min(v) for k, v in times.items()}


def child_peak_rss(kind: str, args) -> dict[str, int]:
    """Train ``args.steps`` steps with dropout 0.05 in a fresh process; its peak RSS and RSS before (bytes)."""
    cmd = [
        sys.executable,
        __file__,
        "--rss-child",
        kind,
        *("--hidden", str(args.hidden), "--layers", str(args.layers), "--seq", str(args.seq)),
        *("--batch", str(args.batch), "--r", str(args.r), "--steps", str(args.steps)),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


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
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--only", default="train,rss,inference", help="comma-separated subset of: train, rss, inference"
    )
    parser.add_argument("--rss-child", choices=["ours", "peft"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child(args.rss_child, args)
        return

    print(
        f"Llama-shaped model: hidden {args.hidden}, {args.layers} layers, seq {args.seq}, batch {args.batch}, "
        f"LoRA r={args.r} on {','.join(TARGETS)}; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    parts = set(args.only.split(","))
    rows = []
    if "train" in parts:
        ours_t, peft_t = bench_train(args)
        rows.append(("training step (s), dropout 0", ours_t, peft_t, ours_t / peft_t, "<= 1.00"))
        ours_t, peft_t = bench_train(args, dropout=0.05)
        rows.append(("training step (s), dropout 0.05", ours_t, peft_t, ours_t / peft_t, "<= 1.00"))
    if "rss" in parts:
        child = {k: child_peak_rss(k, args) for k in ("ours", "peft")}
        rss = {k: v["peak_rss"] / 2**20 for k, v in child.items()}
        growth = {k: (v["peak_rss"] - v["before"]) / 2**20 for k, v in child.items()}
        rows.append(
            ("peak RSS (MiB), dropout 0.05", rss["ours"], rss["peft"], rss["ours"] / rss["peft"], "<= 1.00")
        )
        rows.append(
            (
                "  of which training (MiB)",
                growth["ours"],
                growth["peft"],
                growth["ours"] / growth["peft"],
                "(info)",
            )
        )
    if "inference" in parts:
        inf = bench_inference(args)
        rows.append(
            ("un-merged inference (s)", inf["ours"], inf["peft"], inf["ours"] / inf["peft"], "<= 1.00")
        )
        rows.append(
            (
                "merged inference vs base (s)",
                inf["merged"],
                inf["base"],
                inf["merged"] / inf["base"],
                "<= 1.02",
            )
        )
    print(f"\n{'measure':<32}{'ours':>12}{'reference':>12}{'ratio':>8}  target")
    for name, ours, ref, ratio, target in rows:
        print(f"{name:<32}{ours:>12.4f}{ref:>12.4f}{ratio:>8.3f}  {target}")
    print("\nreference = HF PEFT, except the merged row (the plain base model).")


if __name__ == "__main__":
    main()
