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
arithmetic of ``_models.qlora_floor``.

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
from _models import MIB, TARGETS, llama_config, llama_counts, qlora_floor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NF4_DQ_LIMIT = 4 + 8 / 64 + 32 / (64 * 256)
GOALS = {"vs_peft4": 0.55, "vs_peft_bf16": 0.60, "checkpointing_vs_floor": 1.25}
CUDA_GOALS = {"vs_peft_bf16": 0.45, "step_vs_bf16": 1.20}


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


# --------------------------------------------------------------------------- measuring
class Meter:
    """Current and peak memory of this process: RSS on CPU, allocated memory on CUDA.

    ``reset()`` restarts the peak at the current value (``/proc/self/clear_refs`` on Linux),
    so each phase of a step has its own peak; :attr:`high` keeps the maximum over all.
    Not ``getrusage``'s ``ru_maxrss``: Linux carries a parent's peak into a child process.
    """

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.can_reset = self.cuda or os.path.exists("/proc/self/clear_refs")
        self.base = self.current()
        self.high = 0.0
        self.reset()

    @staticmethod
    def _status(field: str) -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024.0
        return float("nan")

    def current(self) -> float:
        """Bytes above the baseline."""
        value = torch.cuda.memory_allocated() if self.cuda else self._status("VmRSS")
        return value - getattr(self, "base", 0.0)

    def peak(self) -> float:
        """Peak bytes above the baseline since the last :meth:`reset`."""
        value = torch.cuda.max_memory_allocated() if self.cuda else self._status("VmHWM")
        value -= self.base
        self.high = max(self.high, value)
        return value

    def reset(self) -> None:
        self.peak()  # fold the finished phase into ``high``
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        elif self.can_reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")


def _nbytes(t: torch.Tensor | None) -> int:
    """Bytes this process holds of ``t`` (its own shard of an FSDP2 ``DTensor``)."""
    if t is None:
        return 0
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def tensor_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of the 4-bit layers (codes and every scale), of the other frozen tensors, and of the trainable ones."""
    from lightning_peft.quantization import is_4bit

    seen: set[int] = set()
    out = {"quantized": 0, "other": 0, "adapters": 0}
    for module in model.modules():
        if is_4bit(module):
            weight = module.weight
            state = getattr(weight, "quant_state", None) or module.quant_state
            seen.add(id(weight))
            out["quantized"] += _nbytes(weight) + _nbytes(state.absmax) + _nbytes(state.code)
            if state.nested:
                out["quantized"] += _nbytes(state.state2.absmax) + _nbytes(state.state2.code)
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            out["adapters" if param.requires_grad else "other"] += _nbytes(param)
    out["other"] += sum(_nbytes(b) for b in model.buffers())
    return out


def optimizer_bytes(optimizer: Any) -> int:
    return sum(_nbytes(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))


class SavedTensors:
    """Bytes autograd saves for backward (outside checkpointed blocks), parameters excluded."""

    def __init__(self, model: torch.nn.Module) -> None:
        tensors = [*model.parameters(), *model.buffers()]
        local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]  # FSDP2 shards
        self.skip = {t.untyped_storage().data_ptr() for t in local}
        self.seen: dict[int, int] = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if hasattr(t, "to_local"):
            return t  # a sharded parameter: no activation
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.skip and storage.device.type != "meta":
            self.seen[storage.data_ptr()] = storage.nbytes()
        return t

    def __enter__(self) -> SavedTensors:
        self.seen.clear()
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.seen.values())


class Record:
    """What a run measured: the largest value of each part over the steps, and the peaks."""

    def __init__(self, meter: Meter) -> None:
        self.meter = meter
        self.out: dict[str, Any] = {}

    def max(self, key: str, value: float) -> None:
        self.out[key] = max(self.out.get(key, float("-inf")), float(value))

    def loaded(self, model: torch.nn.Module) -> None:
        self.out["load_peak"] = self.meter.peak()
        self.out["resident_after_load"] = self.meter.current()
        self.out.update({k: float(v) for k, v in tensor_bytes(model).items()})

    def forward_starts(self) -> None:
        self.meter.reset()
        self._start = self.meter.current()

    def forward_ends(self, saved: SavedTensors) -> None:
        self.max("activations", self.meter.current() - self._start)
        self.max("saved_for_backward", saved.total)
        self.max("forward_peak", self.meter.peak())
        self.meter.reset()

    def backward_ends(self, params: list[torch.Tensor]) -> None:
        self.max("grads", sum(_nbytes(p.grad) for p in params))
        self.max("backward_peak", self.meter.peak())
        self.meter.reset()

    def step_ends(self, optimizer: Any) -> None:
        self.max("optimizer", optimizer_bytes(optimizer))
        self.max("step_peak", self.meter.peak())
        self.meter.reset()

    def result(self) -> dict[str, Any]:
        self.meter.peak()
        self.out["peak"] = self.meter.high
        return self.out


# --------------------------------------------------------------------------- the setups
def probe(record: Record):
    """A Lightning callback feeding ``record`` at each phase of a training step."""
    import lightning as L

    from lightning_peft.methods.base import trainable_named_parameters

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            record.loaded(pl_module)
            self.params = [p for _, p in trainable_named_parameters(pl_module)]
            self.saved = SavedTensors(pl_module)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            record.forward_starts()
            self.saved.__enter__()

        def on_before_backward(self, trainer, pl_module, loss):
            self.saved.__exit__(None, None, None)
            record.forward_ends(self.saved)

        def on_after_backward(self, trainer, pl_module):
            record.backward_ends(self.params)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            record.step_ends(trainer.optimizers[0])  # the optimizer configure_optimizers returned

    return Probe()


def measured_trainer(args, record: Record, plugin: Any, **kwargs: Any):
    """A quiet Trainer of ``args.steps`` steps: LoRA r=``args.r`` on every projection, ``plugin``, the probe."""
    import lightning as L

    from lightning_peft.callbacks import LoRA

    return L.Trainer(
        max_steps=args.steps,
        plugins=[plugin],
        callbacks=[LoRA(r=args.r, alpha=2 * args.r, target_modules=TARGETS), probe(record)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


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
    out["local_code_bytes"] = sum(_nbytes(w) for w in codes)
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


# --------------------------------------------------------------------------- the report
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


def report_memory(runs: dict, floors: dict, args, unit: str) -> None:
    print(f"\npeak memory, {unit}, MiB (each run a fresh process):\n")
    print("| run | peak MiB | vs transformers + PEFT QLoRA | vs PEFT bf16 LoRA |")
    print("|---|---|---|---|")
    ref4, ref16 = runs.get("peft4", {}).get("peak"), runs.get("peft_bf16", {}).get("peak")
    for name, (_job, _opts, label) in RUNS.items():
        r = runs.get(name, {})
        if "peak" not in r:
            if "error" in r:
                print(f"| {label} | failed: {r['error']} | | |")
            continue
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


def report_optimizers(runs: dict, unit: str, counts: dict) -> None:
    if not runs:
        return
    print(
        f"\noptimizers on the documented path with gradient checkpointing ({counts['adapters'] / 1e6:.2f}M "
        f"trainable parameters; {unit}):\n"
    )
    print("| optimizer | state MiB | state bytes / parameter | peak MiB | peak vs AdamW |")
    print("|---|---|---|---|---|")
    ref = runs.get("adamw", {}).get("peak")
    for name, (_opt, label) in OPTIMIZER_RUNS.items():
        r = runs.get(name, {})
        if "peak" not in r:
            if "error" in r:
                print(f"| {label} | failed: {r['error']} | | | |")
            continue
        per = r["optimizer"] / counts["adapters"]
        vs = f"{r['peak'] / ref:.3f}" if ref else "-"
        print(f"| {label} | {mib(r['optimizer'])} | {per:.2f} | {mib(r['peak'])} | {vs} |")
    print(
        "paged optimizers page their state to host memory under GPU memory pressure (CUDA unified memory); on "
        "CPU bitsandbytes falls back to the plain 8-bit optimizer"
    )


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
        report_memory(runs, floors, args, unit)
    if "optimizers" in parts:
        reuse = results.get("memory", {}).get("documented_gc", {})
        runs = {"adamw": reuse if "peak" in reuse else run_job("documented", args, gc=1)}
        for name, (optimizer, _label) in OPTIMIZER_RUNS.items():
            if name != "adamw":
                runs[name] = run_job("documented", args, gc=1, optimizer=optimizer)
        results["optimizers"] = runs
        report_optimizers(runs, unit, counts)
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
