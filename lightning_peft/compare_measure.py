"""The measurements of one ``lightning-peft compare`` run, taken inside its ``fit`` process.

:class:`Measure` is the callback ``lightning-peft compare`` appends to every run
(``--trainer.callbacks+=lightning_peft.compare_measure.Measure``). When ``fit`` ends it writes
the run's numbers as JSON to the file named by the ``LIGHTNING_PEFT_COMPARE_OUT`` environment
variable; the parent process (:mod:`lightning_peft.compare`) reads them back. This module is all
a run process imports of the comparison.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lightning_peft.merging import merge, unmerge
from lightning_peft.methods.base import applied_methods, count_parameters

try:  # not on every platform
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None  # type: ignore[assignment]

__all__ = [
    "MEASURE_ENV",
    "Measure",
    "checkpoint_file",
    "median_after_warmup",
    "monitored_value",
    "parameter_sums",
    "peak_memory_mib",
    "time_call",
]

MEASURE_ENV = "LIGHTNING_PEFT_COMPARE_OUT"
"""Environment variable naming the JSON file :class:`Measure` writes."""


def median_after_warmup(values: Sequence[float], warmup: int) -> float | None:
    """Median of ``values`` after dropping the first ``warmup`` of them.

    The warm-up never takes more than half of the values, so short runs still report a time.

    Args:
        values: Measurements in the order they were taken.
        warmup: How many leading measurements to drop (compilation, allocator and cache warm-up).

    Returns:
        The median of the rest, or ``None`` when there are no values.
    """
    if not values:
        return None
    skip = min(max(warmup, 0), len(values) // 2)
    return float(statistics.median(values[skip:]))


def peak_memory_mib(device: torch.device) -> float | None:
    """Peak memory of this process in MiB: CUDA memory allocated on ``device``, else resident memory.

    On CPU this reads ``VmHWM`` (the resident high-water mark) from ``/proc/self/status``; unlike
    ``ru_maxrss`` it does not inherit the peak of the process that forked this one. Without
    ``/proc`` (macOS) it falls back on ``ru_maxrss``.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    if resource is None:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, kB elsewhere


def time_call(fn: Callable[[], Any], warmup: int, repeats: int, sync: Callable[[], None]) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``repeats`` calls after ``warmup`` calls.

    Args:
        fn: What to time.
        warmup: Untimed calls first.
        repeats: Timed calls.
        sync: Called before reading the clock (``torch.cuda.synchronize`` on a GPU).
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(repeats, 1)):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(1000.0 * (time.perf_counter() - start))
    return float(statistics.median(times))


def _scalar(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value.item() if hasattr(value, "item") else value)
    return value if math.isfinite(value) else None


def _first_batch(loaders: Any) -> Any:
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    if isinstance(loaders, list | tuple):
        loaders = next((loader for loader in loaders if loader is not None), None)
    try:
        return None if loaders is None else next(iter(loaders))
    except (StopIteration, TypeError):
        return None


class Measure(L.Callback):
    """Measure one ``fit`` run and write the numbers as JSON when it ends.

    Added to every run by ``lightning-peft compare``; works in any Lightning run. It times each
    training batch (``on_train_batch_start`` to ``on_train_batch_end``, synchronizing CUDA on a
    GPU). In ``on_train_end`` it reads the parameter counts, the monitored metric and the peak
    memory, and keeps one validation batch. In ``on_fit_end``, after every checkpoint is
    written, it reads the checkpoint size and times forwards of that batch in eval mode on the
    run's device, before and after :func:`lightning_peft.merge` (then unmerges: use it on runs
    whose in-memory model is not used afterwards, like ``lightning-peft fit``). Only the
    global-zero process writes the file.

    Args:
        out: JSON file to write; the ``LIGHTNING_PEFT_COMPARE_OUT`` environment variable when
            ``None``. Nothing is written when both are unset.
        warmup_steps: Training batches left out of the step time (at most half of them).
        latency_warmup: Untimed forwards before the timed ones.
        latency_repeats: Timed forwards; the median is reported.
    """

    def __init__(
        self,
        out: str | None = None,
        warmup_steps: int = 5,
        latency_warmup: int = 3,
        latency_repeats: int = 10,
    ) -> None:
        self.out = out
        self.warmup_steps = warmup_steps
        self.latency_warmup = latency_warmup
        self.latency_repeats = latency_repeats
        self.step_times: list[float] = []
        self._start: float | None = None
        self.result: dict[str, Any] | None = None
        self.batch: Any = None

    @staticmethod
    def _sync(device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Start the clock of one training batch."""
        self._sync(pl_module.device)
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Stop the clock of one training batch."""
        if self._start is None:
            return
        self._sync(pl_module.device)
        self.step_times.append(time.perf_counter() - self._start)
        self._start = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Read the counts, the monitored metric, the step time and the peak memory; keep one batch."""
        trainable, total = count_parameters(pl_module)
        if trainable == 0:  # a module that declares nothing: fall back on requires_grad
            trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        metric, value = monitored_value(trainer)
        step = median_after_warmup(self.step_times, self.warmup_steps)
        self.result = {
            "method": ",".join(m.name for m in applied_methods(pl_module)) or "none",
            "trainable_params": trainable,
            "trainable_pct": 100.0 * trainable / total if total else None,
            "val_metric": metric,
            "val_value": value,
            "peak_mem_mib": peak_memory_mib(pl_module.device),
            "step_time_ms": None if step is None else 1000.0 * step,
            "checkpoint_bytes": None,
            "latency_ms": None,
            "latency_unmerged_ms": None,
        }
        self.batch = _first_batch(trainer.val_dataloaders)
        if self.batch is None:
            self.batch = _first_batch(trainer.train_dataloader)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Add the checkpoint size and the latencies, then write the JSON file (global zero only).

        Runs after every checkpoint is written (``ModelCheckpoint`` saves its last one in
        ``on_train_end``), so merging cannot touch a saved file. Lightning has moved the model
        to the CPU by now: it goes back to the run's device for the timing, and returns.
        """
        if self.result is None:
            return
        result = dict(self.result)
        ckpt = checkpoint_file(trainer)
        result["checkpoint_bytes"] = ckpt.stat().st_size if ckpt is not None else None
        if self.batch is not None:  # every rank runs the forwards: sharded models need all of them
            try:
                result["latency_ms"], result["latency_unmerged_ms"] = self.latency(
                    trainer, pl_module, self.batch
                )
            except Exception as err:  # a failed timing must not lose the run's other numbers
                print(f"compare: latency not measured: {type(err).__name__}: {err}", file=sys.stderr)
        path = self.out or os.environ.get(MEASURE_ENV)
        if path and trainer.is_global_zero:
            tmp = Path(f"{path}.tmp")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(result, indent=1))
            os.replace(tmp, path)

    def latency(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any
    ) -> tuple[float, float | None]:
        """Median forward time of ``batch`` (ms) on the run's device, merged where the method merges.

        The model runs in eval mode under ``no_grad`` and the run's precision; it is unmerged
        afterwards (exact up to float rounding) and put back on its device and in its modes.

        Returns:
            ``(latency_ms, latency_unmerged_ms)``. The second is ``None`` when there is nothing
            to merge: :func:`lightning_peft.merge` raised ``ValueError`` or left every
            parameter as it was; the first is then the time of the model as it is.
        """
        device, home = trainer.strategy.root_device, pl_module.device
        modes = {module: module.training for module in pl_module.modules()}
        pl_module.to(device)
        pl_module.eval()
        batch = pl_module.transfer_batch_to_device(batch, device, 0)
        if isinstance(batch, dict):
            inputs = {k: v for k, v in batch.items() if k != "labels"}  # inference: no loss

            def forward() -> Any:
                return pl_module(**inputs)
        else:

            def forward() -> Any:
                return pl_module(batch)

        def timed() -> float:
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                return time_call(
                    forward, self.latency_warmup, self.latency_repeats, lambda: self._sync(device)
                )

        try:
            unmerged = timed()
            before = parameter_sums(pl_module)
            try:
                merge(pl_module)
            except ValueError:  # nothing to merge (adapters, prompts, ...) or a 4-bit base
                return unmerged, None
            try:
                if parameter_sums(pl_module) == before:  # merging folded nothing (partial, full, ...)
                    return unmerged, None
                return timed(), unmerged
            finally:
                unmerge(pl_module)
        finally:
            pl_module.to(home)
            for module, training in modes.items():
                module.train(training)


def parameter_sums(module: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], float]]:
    """Each parameter's shape and float64 sum: a cheap check of whether anything changed them."""
    return {
        name: (tuple(p.shape), float(p.detach().double().sum()) if p.device.type != "meta" else 0.0)
        for name, p in module.named_parameters()
    }


def monitored_value(trainer: L.Trainer) -> tuple[str | None, float | None]:
    """The metric a ``ModelCheckpoint`` monitors and its best value.

    Without a monitoring ``ModelCheckpoint``: the last logged ``val_acc``, else ``val_loss``.

    Returns:
        ``(metric name, value)``; either may be ``None``.
    """
    for callback in trainer.checkpoint_callbacks:
        monitor = getattr(callback, "monitor", None)
        if monitor:
            best = _scalar(getattr(callback, "best_model_score", None))
            return monitor, best if best is not None else _scalar(trainer.callback_metrics.get(monitor))
    for name in ("val_acc", "val_loss"):
        if name in trainer.callback_metrics:
            return name, _scalar(trainer.callback_metrics[name])
    return None, None


def checkpoint_file(trainer: L.Trainer) -> Path | None:
    """The best checkpoint file of the run, else its last one; ``None`` when none was written."""
    callbacks = [c for c in trainer.checkpoint_callbacks if hasattr(c, "best_model_path")]
    callbacks.sort(key=lambda c: not getattr(c, "monitor", None))  # monitoring callbacks first
    for attribute in ("best_model_path", "last_model_path"):
        for callback in callbacks:
            path = getattr(callback, attribute, "")
            if path and Path(path).is_file():
                return Path(path)
    return None
