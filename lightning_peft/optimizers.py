"""How ``CausalLM`` and ``SequenceClassifier`` build their optimizer and schedule.

Over exactly the declared-trainable parameters (the caller passes them), in two groups:
matrices decay, vectors (biases, norms, scales) do not. The optimizer is AdamW, or whatever
an optimizer factory builds: a class (``torch.optim.SGD``), a ``functools.partial``
(``partial(bitsandbytes.optim.PagedAdamW8bit, lr=2e-4)``), or what LightningCLI makes of a
recipe's ``class_path`` + ``init_args`` (its ``--optimizer`` flag, which ``lightning-peft``
routes to the module). The schedule is a linear warmup and a cosine, linear or constant
decay per step, unless a scheduler factory replaces it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

Schedule = Literal["cosine", "linear", "constant"]

__all__ = ["LRSchedulerCallable", "OptimizerCallable", "Schedule", "configure", "param_groups"]


def param_groups(
    named: Iterable[tuple[str, nn.Parameter]], weight_decay: float | None
) -> list[dict[str, Any]]:
    """Parameter groups for an optimizer: matrices decay, vectors (biases, norms, scales) do not.

    Args:
        named: ``(name, parameter)`` pairs, e.g. ``trainable_named_parameters(module)``.
        weight_decay: Decay of the matrices' group; ``None`` leaves the optimizer's own default.

    Returns:
        The non-empty groups, the decaying one first.
    """
    named = list(named)
    decay: dict[str, Any] = {"params": [p for _, p in named if p.ndim >= 2]}
    if weight_decay is not None:
        decay["weight_decay"] = weight_decay
    no_decay = {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0}
    return [g for g in (decay, no_decay) if g["params"]]


def configure(
    named: Iterable[tuple[str, nn.Parameter]],
    *,
    optimizer: OptimizerCallable | None,
    lr_scheduler: LRSchedulerCallable | None,
    lr: float,
    weight_decay: float,
    warmup_steps: int,
    schedule: Schedule,
    total_steps: Any,
) -> Any:
    """What ``configure_optimizers`` returns, for the trainable ``named`` parameters.

    Args:
        named: ``(name, parameter)`` of exactly the parameters to train.
        optimizer: Builds the optimizer from parameter groups; ``None``: AdamW with ``lr`` and
            ``weight_decay``. The factory's own arguments rule; its ``weight_decay`` applies to
            the matrices.
        lr_scheduler: Builds a scheduler from the optimizer, replacing the warmup and
            ``schedule``; it steps per epoch (LightningCLI's convention), and a
            ``ReduceLROnPlateau`` watches its ``monitor`` (LightningCLI's subclass has one),
            else ``val_loss``.
        lr: Learning rate of the default AdamW.
        weight_decay: Matrices' decay of the default AdamW.
        warmup_steps: Linear warmup steps (without ``lr_scheduler``).
        schedule: Decay after the warmup (without ``lr_scheduler``).
        total_steps: A callable giving the run's optimizer steps (called only when needed:
            ``trainer.estimated_stepping_batches`` reads the data).

    Returns:
        An optimizer, or Lightning's ``{"optimizer": ..., "lr_scheduler": {...}}``.
    """
    if optimizer is None:
        built = torch.optim.AdamW(param_groups(named, weight_decay), lr=lr)
    else:
        built = optimizer(param_groups(named, None))
    if lr_scheduler is not None:
        scheduler = lr_scheduler(built)
        config: dict[str, Any] = {"scheduler": scheduler}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = getattr(scheduler, "monitor", None) or "val_loss"
        return {"optimizer": built, "lr_scheduler": config}
    if schedule == "constant" and warmup_steps == 0:
        return built
    total = max(int(total_steps()), 1)
    warmup = min(warmup_steps, total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(built, factor)
    return {"optimizer": built, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
