"""QLoRA: our 4-bit base (FourBitPrecision's core) vs a bf16 base and vs transformers + PEFT QLoRA.

On a Llama-shaped random model of about 300M parameters, saved first to a temporary
folder as bf16 safetensors (what a hub checkpoint looks like), it measures:

* bits held per quantized weight (NF4 + double quantization, limit 4 + 8/64 + 32/(64*256)
  = 4.127);
* peak memory while loading, resident memory once every weight is paged in, and peak
  memory while loading then fine-tuning (gradient checkpointing on, as in QLoRA; ``--
  gradient-checkpointing 0`` turns it off), the 4-bit model vs the bf16 model, each in a
  fresh subprocess (peak RSS on CPU; peak allocated GPU memory on CUDA);
* QLoRA training step time vs bf16 LoRA step time (target <= 1.10) and vs transformers +
  PEFT QLoRA on the same model (target <= 1.00): every step is forward + backward + AdamW
  on a batch of ``--tokens`` tokens, bf16 autocast, fp32 LoRA parameters, the same LoRA on
  every linear layer. The three models live in one subprocess and their steps alternate,
  so machine load hits them alike; each figure is the median over rounds;
* the logit cost of re-quantizing merged weights instead of exporting them in bf16
  (:func:`lightning_peft.quantization.requantization_error`).

Usage::

    python benchmarks/qlora.py                          # ~322M parameters, 512 tokens/step
    python benchmarks/qlora.py --hidden 512 --layers 4  # a quick look
    python benchmarks/qlora.py --device cuda            # on a GPU: peak GPU memory too

A shared machine makes timings noisy; quote figures from an idle one.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from _models import TARGETS, llama_config

HERE = os.path.dirname(os.path.abspath(__file__))
NF4_DQ_LIMIT = 4 + 8 / 64 + 32 / (64 * 256)


# --------------------------------------------------------------------------- the model
def config(hidden: int, layers: int, vocab: int):
    return llama_config(hidden, layers, vocab, ffn_ratio=11 / 4, max_positions=2048)


def save_model(folder: str, hidden: int, layers: int, vocab: int) -> int:
    """Build the random model layer by layer in bf16 and save it; returns its parameter count."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(config(hidden, layers, vocab)).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    return n


def batch_for(tokens: int, vocab: int, device: str, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (1, tokens), generator=g).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


# --------------------------------------------------------------------------- the three setups
def load(kind: str, folder: str, device: str):
    """``ours4`` (our 4-bit + LoRA), ``bf16`` (bf16 base + our LoRA), ``peft4`` (transformers + PEFT QLoRA)."""
    from transformers import AutoModelForCausalLM

    if kind == "ours4":
        from lightning_peft.quantization import load_quantized

        return load_quantized(folder, dtype=torch.bfloat16, device=device)
    if kind == "bf16":
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device)
    if kind == "peft4":
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        return AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=quant, dtype=torch.bfloat16, device_map=device
        )
    raise ValueError(kind)


def add_lora(kind: str, model, r: int):
    if kind == "peft4":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=TARGETS)
        )
    else:
        from lightning_peft.callbacks import LoRA

        LoRA(r=r, alpha=2 * r, target_modules=TARGETS).apply(model)
    for p in model.parameters():  # fp32 trainable parameters for the optimizer, in every setup
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def make_step(model, device: str):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    device_type = "cuda" if device.startswith("cuda") else "cpu"

    def step(batch):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device_type == "cuda":
            torch.cuda.synchronize()
        return float(loss)

    return step


# --------------------------------------------------------------------------- subprocess jobs
def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    return float("nan")


def peak_mib(device: str) -> float:
    """Peak GPU memory allocated, or this process's peak RSS (VmHWM).

    Not ``getrusage``'s ``ru_maxrss``: Linux carries the parent's peak into a child across
    ``fork``/``exec``, so a child started by a big parent would report the parent's peak.
    """
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    if os.path.exists("/proc/self/status"):
        return _status_mib("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_mib() -> float:
    return _status_mib("VmRSS") if os.path.exists("/proc/self/status") else float("nan")


def _imports() -> None:
    """The same libraries in every job, so their memory counts alike."""
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import lightning_peft.callbacks  # noqa: F401
    import lightning_peft.quantization  # noqa: F401


def job_memory(args) -> dict:
    """Load, then train ``--steps`` steps; peak memory after each phase (fresh process)."""
    torch.set_num_threads(args.threads)
    _imports()
    start = time.perf_counter()
    model = load(args.kind, args.folder, args.device)
    out = {"kind": args.kind, "load_s": time.perf_counter() - start}
    out["load_peak_mib"], out["after_load_rss_mib"] = peak_mib(args.device), rss_mib()
    with torch.no_grad():  # page in every weight (from_pretrained maps files lazily), no big temporaries
        for t in [*model.parameters(), *model.buffers()]:
            if t.numel():
                t.detach().reshape(-1)[::1024].sum()
    out["resident_after_load_mib"] = rss_mib()
    if args.kind == "ours4":
        from lightning_peft.quantization import bits_per_parameter, quantization_report

        out["bits_per_quantized_weight"] = bits_per_parameter(model)
        out["report"] = quantization_report(model)
    model = add_lora(args.kind, model, args.r)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    step = make_step(model, args.device)
    batch = batch_for(args.tokens, args.vocab, args.device)
    for _ in range(args.steps):
        step(batch)
    out["train_peak_mib"] = peak_mib(args.device)
    return out


def job_time(args) -> dict:
    """All setups in one process, steps alternating; median seconds per step of each."""
    torch.set_num_threads(args.threads)
    kinds = ["ours4", "bf16", "peft4"]
    steps, errors = {}, {}
    for kind in kinds:
        try:
            model = add_lora(kind, load(kind, args.folder, args.device), args.r)
        except Exception as err:  # report what transformers/PEFT said, exactly
            errors[kind] = f"{type(err).__name__}: {err}"
            continue
        model.train()
        steps[kind] = (model, make_step(model, args.device))
    batch = batch_for(args.tokens, args.vocab, args.device)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _model, step in steps.values():  # warm-up
        step(batch)
    order = list(steps)
    for i in range(args.rounds):
        for kind in order[i % len(order) :] + order[: i % len(order)]:  # rotate: no fixed neighbour
            t = time.perf_counter()
            steps[kind][1](batch)
            times[kind].append(time.perf_counter() - t)
    out = {
        "median_step_s": {k: statistics.median(v) for k, v in times.items()},
        "min_step_s": {k: min(v) for k, v in times.items()},
        "all_s": times,
        "errors": errors,
    }
    if "ours4" in steps:
        from lightning_peft.quantization import requantization_error

        model = steps["ours4"][0]
        torch.manual_seed(0)
        for name, p in model.named_parameters():  # stand-in for a trained update: B != 0
            if name.endswith("lora_b"):
                torch.nn.init.normal_(p, std=0.02)
        out["requantization"] = requantization_error(model, batch_for(64, args.vocab, args.device, seed=3))
    return out


def run_job(job: str, args, kind: str | None = None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--job", job, "--folder", args.folder]
    for name in ("hidden", "layers", "vocab", "tokens", "r", "steps", "rounds", "threads", "device"):
        cmd += [f"--{name}", str(getattr(args, name))]
    cmd += ["--gradient-checkpointing", str(args.gradient_checkpointing)]
    if kind:
        cmd += ["--kind", kind]
    res = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    )
    lines = [line for line in res.stdout.splitlines() if line.startswith("RESULT ")]
    if res.returncode != 0 or not lines:
        return {"kind": kind, "error": res.stderr.strip().splitlines()[-1:] or [f"exit {res.returncode}"]}
    return json.loads(lines[-1][len("RESULT ") :])


# --------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tokens", type=int, default=512, help="tokens per training step")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2, help="training steps in the memory runs")
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds of alternating steps")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--folder", default=None, help="an existing saved model (default: build one)")
    parser.add_argument(
        "--gradient-checkpointing",
        type=int,
        default=1,
        help="1: memory runs recompute activations (as QLoRA does), so weights dominate the peak; 0: off",
    )
    parser.add_argument("--only", choices=["memory", "time"], default=None, help="run one part")
    parser.add_argument("--job", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--kind", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        result = job_memory(args) if args.job == "memory" else job_time(args)
        print("RESULT " + json.dumps(result))
        return

    tmp = None
    if args.folder is None:
        tmp = tempfile.TemporaryDirectory(prefix="qlora-bench-")
        args.folder = tmp.name
        n = save_model(args.folder, args.hidden, args.layers, args.vocab)
        print(
            f"model: Llama-shaped, {n / 1e6:.0f}M parameters, hidden {args.hidden}, {args.layers} layers, "
            f"saved as bf16 safetensors in {args.folder}"
        )
    print(f"device: {args.device}, threads: {args.threads}, {args.tokens} tokens per step, LoRA r={args.r}")
    kinds = ("ours4", "bf16")
    memory = {k: run_job("memory", args, k) for k in kinds} if args.only != "time" else {k: {} for k in kinds}
    timing = run_job("time", args) if args.only != "memory" else {}
    results = {"memory": memory, "time": timing}
    unit = "peak GPU memory allocated" if args.device.startswith("cuda") else "peak RSS"

    ours, base = memory["ours4"], memory["bf16"]
    print()
    if "bits_per_quantized_weight" in ours:
        bits = ours["bits_per_quantized_weight"]
        print(
            f"bits per quantized weight (NF4 + double quant): {bits:.4f}  (limit {NF4_DQ_LIMIT:.4f}: "
            f"{'ok' if bits <= NF4_DQ_LIMIT + 1e-3 else 'OVER'})"
        )
    labels = {
        "load_peak_mib": f"{unit} while loading",
        "resident_after_load_mib": "RSS after loading, every weight paged in",
        "train_peak_mib": f"{unit} while loading + fine-tuning {args.steps} steps",
    }
    for key, label in labels.items():
        if key in ours and key in base:
            print(
                f"{label}: 4-bit {ours[key]:.0f} MiB, bf16 {base[key]:.0f} MiB, ratio {ours[key] / base[key]:.3f}"
            )
    for kind in ("ours4", "bf16"):
        if "error" in memory[kind]:
            print(f"memory run {kind} failed: {memory[kind]['error']}")
    med, low = timing.get("median_step_s", {}), timing.get("min_step_s", {})
    for kind, s in med.items():
        print(f"step time {kind}: median {s:.3f} s, fastest {low[kind]:.3f} s")
    if "ours4" in med and "bf16" in med:
        print(
            f"QLoRA / bf16 LoRA step time: {med['ours4'] / med['bf16']:.3f} (medians), "
            f"{low['ours4'] / low['bf16']:.3f} (fastest)  (target <= 1.10)"
        )
    if "ours4" in med and "peft4" in med:
        print(
            f"ours / transformers+PEFT QLoRA step time: {med['ours4'] / med['peft4']:.3f} (medians), "
            f"{low['ours4'] / low['peft4']:.3f} (fastest)  (target <= 1.00)"
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
    print("RESULTS " + json.dumps(results, default=str))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
