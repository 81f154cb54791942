"""Memory of a training step, part by part: a peak meter, tensor and optimizer bytes, what autograd saves."""

from __future__ import annotations

import os
from typing import Any

import torch
from _models import TARGETS


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


def nbytes(t: torch.Tensor | None) -> int:
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
            out["quantized"] += nbytes(weight) + nbytes(state.absmax) + nbytes(state.code)
            if state.nested:
                out["quantized"] += nbytes(state.state2.absmax) + nbytes(state.state2.code)
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            out["adapters" if param.requires_grad else "other"] += nbytes(param)
    out["other"] += sum(nbytes(b) for b in model.buffers())
    return out


def optimizer_bytes(optimizer: Any) -> int:
    return sum(nbytes(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))


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
        self.max("grads", sum(nbytes(p.grad) for p in params))
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


# --------------------------------------------------------------------------- the measured Trainer
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
