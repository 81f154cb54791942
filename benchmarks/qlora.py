"""QLoRA at the memory floor: the documented path vs transformers + PEFT, measured part by part.

A Llama-shaped random model (default: 370M parameters, hidden 1024, 24 layers, vocabulary
32000) is saved first to a temporary folder as bf16 safetensors, what a hub checkpoint
looks like. Then, each run in a fresh process, peak memory while loading and fine-tuning
(LoRA r=16 on every linear layer of every block, ``--batch`` x ``--seq`` tokens, ``--steps``
optimizer steps, bf16 autocast, fp32 adapters) of:

* **ours, documented**: ``CausalLM(folder)`` + ``Trainer(plugins=[FourBitPrecision()],
  callbacks=[LoRA(...)])``, without and with gradient checkpointing, and with glibc's heap
  left as it is (``FourBitPrecision(return_freed_memory=False)``);
* **transformers + PEFT QLoRA**: ``from_pretrained(quantization_config=BitsAndBytesConfig(NF4,
  double quant, bf16))`` + ``get_peft_model`` (also with our heap setting, to show what it
  alone buys);
* **PEFT LoRA over a bf16 base**: ``from_pretrained(dtype=bfloat16)`` + ``get_peft_model``;
* **optimizers** on the documented path with gradient checkpointing: ``torch.optim.AdamW``,
  ``bitsandbytes.optim.AdamW8bit`` and ``PagedAdamW8bit`` (built directly here).

Memory is peak RSS above the process's baseline after imports on CPU (Linux ``VmHWM``,
reset per phase through ``/proc/self/clear_refs``), peak allocated GPU memory on CUDA. For
the documented path it is broken down part by part, each measured: 4-bit linear weights
(codes and scales), the layers left in bf16 (embeddings, head, norms), adapter
parameters, gradients, optimizer state (tensor bytes), activations (resident growth over
the forward pass; the part autograd saved is counted too) and the rest, next to the floor
arithmetic of ``_models.qlora_floor``. The measuring lives in ``_memory.py``, the printed
tables in ``_qlora_report.py``.

It also measures bits per quantized weight, training step times (ours vs a bf16 base vs
transformers + PEFT QLoRA, steps alternating in one process) and the logit cost of
re-quantizing merged weights instead of exporting them in bf16.

Usage::

    python benchmarks/qlora.py                          # 370M, 2 x 128 tokens, ~45 min on 2 busy cores
    python benchmarks/qlora.py --hidden 512 --layers 4  # a quick look
    python benchmarks/qlora.py --device cuda            # on a GPU: peak allocated GPU memory
    python benchmarks/qlora.py --only memory            # or: time, optimizers

Memory is little affected by other processes; step times are: quote them from an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch
from _memory import Meter, Record, SavedTensors, measured_trainer, nbytes
from _models import TARGETS, llama_config, llama_counts, qlora_floor
from _qlora_report import report_fsdp2, report_memory, report_optimizers, report_time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# --------------------------------------------------------------------------- the model
def config(hidden: int, layers: int, vocab: int):
    return llama_config(hidden, layers, vocab, ffn_ratio=11 / 4, max_positions=2048)


def save_model(folder: str, hidden: int, layers: int, vocab: int) -> int:
    """Build the random model in bf16 and save it; returns its parameter count."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(config(hidden, layers, vocab)).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    return n


def batch_for(batch: int, seq: int, vocab: int, device: str, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


# --------------------------------------------------------------------------- the setups
def _imports() -> None:
    """The same libraries in every job, so their memory counts alike (and before the baseline)."""
    import bitsandbytes  # noqa: F401
    import lightning  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import lightning_peft  # noqa: F401
    import lightning_peft.callbacks  # noqa: F401
    import lightning_peft.plugins  # noqa: F401
    import lightning_peft.quantization  # noqa: F401


def make_optimizer(name: str, params: list[torch.Tensor], lr: float = 1e-4):
    """``adamw`` (torch, fp32 moments), ``adamw8bit`` / ``paged_adamw8bit`` (bitsandbytes)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    import warnings

    import bitsandbytes as bnb

    cls = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw8bit": bnb.optim.PagedAdamW8bit}[name]
    with warnings.catch_warnings():  # on CPU bitsandbytes warns that paging falls back to plain
        warnings.simplefilter("ignore")
        return cls(params, lr=lr)


def load(kind: str, folder: str, device: str):
    """``ours4`` (our 4-bit, streamed), ``bf16`` (bf16 base), ``peft4`` (transformers + bitsandbytes 4-bit)."""
    from transformers import AutoModelForCausalLM

    if kind == "ours4":
        from lightning_peft.quantization import load_quantized

        return load_quantized(folder, dtype=torch.bfloat16, device=device)
    if kind in ("bf16", "peft_bf16"):
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
    """PEFT's LoRA for the PEFT setups, ours otherwise; fp32 trainable parameters in every setup."""
    if kind.startswith("peft"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=TARGETS)
        )
    else:
        from lightning_peft.callbacks import LoRA

        LoRA(r=r, alpha=2 * r, target_modules=TARGETS).apply(model)
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def make_step(model, device: str, optimizer: str = "adamw"):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(optimizer, params)
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
def job_documented(args) -> dict:
    """The documented path in a Lightning run, measured phase by phase through a callback."""

    from lightning_peft import CausalLM
    from lightning_peft.methods.base import trainable_named_parameters
    from lightning_peft.plugins import FourBitPrecision

    batch = batch_for(args.batch, args.seq, args.vocab, "cpu")
    loader = torch.utils.data.DataLoader([batch] * args.steps, batch_size=None)
    meter = Meter(args.device)
    record = Record(meter)

    class Documented(CausalLM):
        def configure_optimizers(self):  # the optimizer under test, built directly
            params = [p for _, p in trainable_named_parameters(self)]
            self.optimizer_under_test = make_optimizer(args.optimizer, params, lr=self.hparams.lr)
            return self.optimizer_under_test

    start = time.perf_counter()
    module = Documented(args.folder, lr=1e-4, schedule="constant", gradient_checkpointing=bool(args.gc))
    plugin = FourBitPrecision(return_freed_memory=bool(args.heap))
    trainer = measured_trainer(
        args, record, plugin, accelerator="cuda" if args.device.startswith("cuda") else "cpu", devices=1
    )
    trainer.fit(module, loader)
    out = record.result()
    out["seconds"] = time.perf_counter() - start
    from lightning_peft.quantization import bits_per_parameter, quantization_report

    out["bits_per_quantized_weight"] = bits_per_parameter(module)
    out["quantized_layers"] = quantization_report(module)["quantized_layers"]
    return out


def job_manual(args) -> dict:
    """A transformers/PEFT (or our streamed) setup in a plain training loop, measured phase by phase."""
    if args.heap:
        from lightning_peft.quantization import return_large_blocks_to_os

        return_large_blocks_to_os()
    batch = batch_for(args.batch, args.seq, args.vocab, args.device)
    meter = Meter(args.device)
    record = Record(meter)
    start = time.perf_counter()
    model = load(args.kind, args.folder, args.device)
    with torch.no_grad():  # page in every weight (from_pretrained maps files lazily)
        for t in [*model.parameters(), *model.buffers()]:
            if t.numel():
                t.detach().reshape(-1)[::1024].sum()
    model = add_lora(args.kind, model, args.r)
    record.loaded(model)
    if args.gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(args.optimizer, params)
    saved = SavedTensors(model)
    device_type = "cuda" if args.device.startswith("cuda") else "cpu"
    for _ in range(args.steps):
        record.forward_starts()
        with saved, torch.autocast(device_type, dtype=torch.bfloat16):
            loss = model(**batch).loss
        record.forward_ends(saved)
        loss.backward()
        del loss
        record.backward_ends(params)
        opt.step()
        opt.zero_grad(set_to_none=True)
        record.step_ends(opt)
    out = record.result()
    out["seconds"] = time.perf_counter() - start
    return out


def job_time(args) -> dict:
    """All setups in one process, steps alternating; median seconds per step of each."""
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
    batch = batch_for(args.batch, args.seq, args.vocab, args.device)
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
        out["requantization"] = requantization_error(model, batch_for(1, 64, args.vocab, args.device, seed=3))
    return out


def job_fsdp2(args) -> dict:
    """QLoRA under FSDP2 on 2 CPU processes (gloo): each rank's peak and what it keeps.

    ``--kind documented``: ``CausalLM(folder)``, each rank streams the checkpoint into
    4-bit, LoRA is applied, the blocks are sharded. ``--kind preloaded``: each rank loads
    the bf16 model with ``from_pretrained`` first (what a module passed in means), the
    plugin quantizes it, then it is sharded. Lightning re-runs this script for rank 1;
    each rank writes its figures to ``--out``.
    """
    from lightning.pytorch.strategies import ModelParallelStrategy
    from transformers import AutoModelForCausalLM

    from lightning_peft import CausalLM
    from lightning_peft.plugins import FourBitPrecision

    batch = batch_for(args.batch, args.seq, args.vocab, "cpu")
    meter = Meter("cpu")
    record = Record(meter)

    if args.kind == "preloaded":
        module = CausalLM(AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.bfloat16), lr=1e-4)
    else:
        module = CausalLM(args.folder, lr=1e-4)
    trainer = measured_trainer(
        args,
        record,
        FourBitPrecision(),
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
    )
    trainer.fit(module, torch.utils.data.DataLoader([batch] * (2 * args.steps), batch_size=None))
    out = record.result()
    from lightning_peft.quantization import is_4bit

    codes = [m.weight for m in module.modules() if is_4bit(m)]
    out["local_code_bytes"] = sum(nbytes(w) for w in codes)
    out["global_code_bytes"] = sum(w.numel() * w.element_size() for w in codes)
    with open(os.path.join(args.out, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(out, f)
    return out


JOBS = {"documented": job_documented, "manual": job_manual, "time": job_time, "fsdp2": job_fsdp2}


def run_job(job: str, args, **overrides: Any) -> dict:
    """Run ``job`` in a fresh process with ``args`` (and ``overrides``); its RESULT line, parsed."""
    values = {**vars(args), "kind": None, "gc": 0, "heap": 1, "optimizer": "adamw", **overrides}
    cmd = [sys.executable, os.path.abspath(__file__), "--job", job]
    for name in ("folder", "hidden", "layers", "vocab", "batch", "seq", "r", "steps", "rounds", "threads"):
        cmd += [f"--{name}", str(values[name])]
    cmd += ["--device", values["device"], "--gc", str(values["gc"]), "--heap", str(values["heap"])]
    cmd += ["--optimizer", values["optimizer"]]
    if values["kind"]:
        cmd += ["--kind", values["kind"]]
    if values.get("out"):
        cmd += ["--out", values["out"]]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")  # this checkout's lightning_peft
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in res.stdout.splitlines() if line.startswith("RESULT ")]
    if res.returncode != 0 or not lines:
        tail = res.stderr.strip().splitlines()[-1:] or [f"exit {res.returncode}"]
        return {"error": tail[0]}
    return json.loads(lines[-1][len("RESULT ") :])


# --------------------------------------------------------------------------- the runs
RUNS = {  # name: (job, options, label)
    "documented": ("documented", {}, "ours, documented: CausalLM(path) + FourBitPrecision + LoRA"),
    "documented_gc": ("documented", {"gc": 1}, "ours, documented, gradient checkpointing"),
    "peft4": ("manual", {"kind": "peft4", "heap": 0}, "transformers + PEFT QLoRA"),
    "peft_bf16": ("manual", {"kind": "peft_bf16", "heap": 0}, "PEFT LoRA, bf16 base"),
    "documented_heap": (
        "documented",
        {"heap": 0},
        "ours, documented, glibc heap as is (return_freed_memory=False)",
    ),
    "peft4_heap": (
        "manual",
        {"kind": "peft4", "heap": 1},
        "transformers + PEFT QLoRA, with our heap setting",
    ),
}
OPTIMIZER_RUNS = {  # name: (optimizer, label)
    "adamw": ("adamw", "torch.optim.AdamW (fp32 states)"),
    "adamw8bit": ("adamw8bit", "bitsandbytes AdamW8bit"),
    "paged_adamw8bit": ("paged_adamw8bit", "bitsandbytes PagedAdamW8bit"),
}


def run_labels(table: dict[str, tuple]) -> dict[str, str]:
    """The report's label of each run of ``table`` (:data:`RUNS` or :data:`OPTIMIZER_RUNS`), in its order."""
    return {name: row[-1] for name, row in table.items()}


def run_fsdp2(args) -> dict:
    """Both FSDP2 variants; each rank's figures."""
    out = {}
    for kind in ("documented", "preloaded"):
        with tempfile.TemporaryDirectory(prefix="qlora-fsdp2-") as tmp:
            res = run_job("fsdp2", args, kind=kind, out=tmp, threads=max(1, args.threads // 2))
            ranks = [os.path.join(tmp, f"rank{i}.json") for i in range(2)]
            if all(os.path.exists(r) for r in ranks):
                out[kind] = [json.load(open(r)) for r in ranks]
            else:
                out[kind] = {"error": res.get("error", "no result")}
    return out


# --------------------------------------------------------------------------- main
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=2, help="sequences per step")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps in the memory runs")
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds of alternating steps")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--folder", default=None, help="an existing saved model (default: build one)")
    parser.add_argument(
        "--only",
        choices=["memory", "optimizers", "fsdp2", "time"],
        action="append",
        help="run only these parts (default: all but fsdp2, which --only fsdp2 adds)",
    )
    for hidden in ("--job", "--kind", "--optimizer", "--out"):
        parser.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--gc", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--heap", type=int, default=1, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    if args.job:
        _imports()
        args.optimizer = args.optimizer or "adamw"
        print("RESULT " + json.dumps(JOBS[args.job](args), default=str))
        return

    tmp = None
    if args.folder is None:
        tmp = tempfile.TemporaryDirectory(prefix="qlora-bench-")
        args.folder = tmp.name
        save_model(args.folder, args.hidden, args.layers, args.vocab)
    counts = llama_counts(config(args.hidden, args.layers, args.vocab), args.r)
    parts = set(args.only or ["memory", "optimizers", "time"])
    unit = (
        "peak allocated GPU memory"
        if args.device.startswith("cuda")
        else "peak RSS above the post-import baseline"
    )
    print(
        f"model: Llama-shaped, {counts['base'] / 1e6:.0f}M parameters ({counts['linear'] / 1e6:.0f}M in linear "
        f"layers), hidden {args.hidden}, {args.layers} layers, vocabulary {args.vocab}, bf16 safetensors in "
        f"{args.folder}"
    )
    print(
        f"device: {args.device}, threads: {args.threads}, {args.batch} x {args.seq} tokens per step, "
        f"LoRA r={args.r} on every linear layer ({counts['adapters'] / 1e6:.2f}M parameters), "
        f"{args.steps} optimizer steps"
    )
    floors = {
        gc: qlora_floor(counts, seq=args.seq, batch=args.batch, checkpointing=gc) for gc in (False, True)
    }
    results: dict[str, Any] = {"counts": counts, "floor": {str(k): v for k, v in floors.items()}}
    if "memory" in parts:
        runs = {}
        for name, (job, options, _label) in RUNS.items():
            runs[name] = run_job(job, args, **options)
        results["memory"] = runs
        report_memory(runs, run_labels(RUNS), floors, args, unit)
    if "optimizers" in parts:
        reuse = results.get("memory", {}).get("documented_gc", {})
        runs = {"adamw": reuse if "peak" in reuse else run_job("documented", args, gc=1)}
        for name, (optimizer, _label) in OPTIMIZER_RUNS.items():
            if name != "adamw":
                runs[name] = run_job("documented", args, gc=1, optimizer=optimizer)
        results["optimizers"] = runs
        report_optimizers(runs, run_labels(OPTIMIZER_RUNS), unit, counts)
    if "fsdp2" in parts:
        results["fsdp2"] = run_fsdp2(args)
        report_fsdp2(results["fsdp2"], floors)
    if "time" in parts:
        timing = run_job("time", args)
        results["time"] = timing
        report_time(timing, args)
    print("RESULTS " + json.dumps(results, default=str))


if __name__ == "__main__":
    main()
