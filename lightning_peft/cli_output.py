"""What a ``lightning-peft`` run prints and where its files go.

- :func:`configure_wandb_mode`: Weights & Biases runs offline unless the user is logged in;
- :class:`RunSummary`: the method, its trainable share and the optimizer when a run starts;
  the last validation metrics, the best and last checkpoints (with their monitored values)
  and the run's folders when ``fit`` ends;
- :class:`RunConfig`: the run's ``config.yaml`` in the run's own folder, beside its
  ``checkpoints/``;
- :func:`quiet_wandb`, :func:`quiet_lightning_tips`, :func:`quiet_progress_off_a_terminal`:
  the warnings, advertisements and progress bars that are not the user's doing, dropped.
"""

from __future__ import annotations

import logging
import math
import netrc
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from transformers.utils import logging as transformers_logging

from lightning_peft.methods.base import (
    applied_methods,
    count_parameters,
    trainable_named_parameters,
    trainable_parameter_names,
)

__all__ = [
    "RunConfig",
    "RunSummary",
    "configure_wandb_mode",
    "describe_checkpoints",
    "describe_optimizers",
    "describe_run_files",
    "format_metrics",
    "quiet_lightning_tips",
    "quiet_progress_off_a_terminal",
    "quiet_wandb",
    "run_folder",
    "untrained_parameters",
]

_LIGHTNING_TIPS = ("💡 Tip",)  # Lightning's advertisements, dropped from the CLI's output


# --------------------------------------------------------------------------- wandb
def configure_wandb_mode(environ: dict[str, str] | None = None) -> str | None:
    """Set ``WANDB_MODE=offline`` unless the user is logged in to Weights & Biases.

    Logged in means ``WANDB_API_KEY`` is set or the netrc file (``$NETRC`` or ``~/.netrc``)
    has an entry for the wandb host (``$WANDB_BASE_URL``, by default ``api.wandb.ai``). An
    explicit ``WANDB_MODE`` is always left as it is.

    Args:
        environ: The environment to read and update; ``os.environ`` by default.

    Returns:
        The ``WANDB_MODE`` now in effect (``None`` when unset: wandb's own default, online).
    """
    env = os.environ if environ is None else environ
    if env.get("WANDB_MODE"):
        return env["WANDB_MODE"]
    if env.get("WANDB_API_KEY") or _netrc_has_wandb(env):
        return None
    env["WANDB_MODE"] = "offline"
    return "offline"


def _netrc_has_wandb(env: dict[str, str]) -> bool:
    host = urlparse(env.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    if env.get("NETRC"):
        candidates = [Path(env["NETRC"])]
    else:
        home = Path(env.get("HOME") or Path.home())
        candidates = [home / ".netrc", home / "_netrc"]
    for path in candidates:
        try:
            if path.is_file() and netrc.netrc(str(path)).authenticators(host):
                return True
        except (OSError, netrc.NetrcParseError):
            continue
    return False


def quiet_wandb(logger: WandbLogger) -> None:
    """Spare a wandb logger's run the warnings that are not the user's doing.

    Lightning passes ``anonymous=None`` to ``wandb.init``, which wandb answers with "The
    anonymous setting has no effect"; the key is dropped when the user did not set it. The
    save folder is created first, so wandb does not warn that it "does not exist".
    """
    settings = getattr(logger, "_wandb_init", None)  # Lightning's wandb.init arguments
    if isinstance(settings, dict) and settings.get("anonymous", "") is None:
        del settings["anonymous"]
    if logger.save_dir:
        os.makedirs(logger.save_dir, exist_ok=True)


class _DropPrefixes(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_progress_off_a_terminal() -> None:
    """No transformers/huggingface_hub progress bars ("Loading weights") when stderr is not a terminal.

    In a log file or a pipe each bar leaves lines of carriage returns around what matters
    (an error is then one line, not one line among bars).
    """
    if not sys.stderr.isatty():
        transformers_logging.disable_progress_bar()


def quiet_lightning_tips() -> None:
    """Drop Lightning's advertisements (the "💡 Tip" about its cloud logger) from this process's output."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropPrefixes) for f in logger.filters):
        logger.addFilter(_DropPrefixes(_LIGHTNING_TIPS))


# --------------------------------------------------------------------------- run summary
class RunSummary(L.Callback):
    """Say what a run trains when it starts, and what it produced and where when ``fit`` ends.

    The start line is printed once, after the method callbacks have applied their methods
    (they do so in ``setup``), on the global-zero process only. At the start of ``fit`` a
    second line names the optimizer and how many parameters it updates, and a warning goes to
    stderr if a trainable parameter is in no optimizer (it would never move).
    """

    def __init__(self) -> None:
        self._reported = False

    def describe(self, pl_module: L.LightningModule) -> str:
        """One line: method name(s), trainable and total parameters, and the trainable share."""
        methods = applied_methods(pl_module)
        if trainable_parameter_names(pl_module):
            trainable, total = count_parameters(pl_module)
        else:  # a module that declares nothing: fall back on requires_grad
            params = {id(p): p for p in pl_module.parameters()}.values()
            trainable = sum(p.numel() for p in params if p.requires_grad)
            total = sum(p.numel() for p in params)
        names = ", ".join(m.name for m in methods) if methods else "none"
        share = 100.0 * trainable / total if total else 0.0
        return (
            f"method: {names} | trainable params: {trainable:,} | total params: {total:,} | "
            f"trainable: {share:.4f}%"
        )

    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._reported:
            return
        self._reported = True
        if trainer.is_global_zero:
            print(self.describe(pl_module), flush=True)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Report the method and the optimizer before training starts."""
        self._report(trainer, pl_module)
        if trainer.is_global_zero:
            print(describe_optimizers(trainer.optimizers), flush=True)
            missed = untrained_parameters(pl_module, trainer.optimizers)
            if missed:
                print(
                    f"warning: {len(missed)} trainable parameter(s) are in no optimizer and will not train: "
                    f"{', '.join(missed[:3])}{' ...' if len(missed) > 3 else ''}",
                    file=sys.stderr,
                    flush=True,
                )

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Report before a ``validate`` run (during ``fit`` the report has been made already)."""
        self._report(trainer, pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Report before a ``test`` run."""
        self._report(trainer, pl_module)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Report before a ``predict`` run."""
        self._report(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Print the last validation metrics, the best and last checkpoints, and where the run's files are."""
        if trainer.is_global_zero:
            lines = [format_metrics(trainer.callback_metrics, prefix="val")]
            lines += describe_checkpoints(trainer)
            lines += describe_run_files(trainer)
            print("\n".join(lines), flush=True)


def describe_optimizers(optimizers: Sequence[torch.optim.Optimizer]) -> str:
    """One line per optimizer: its class, the parameters it updates, its groups and peak learning rate."""
    if not optimizers:
        return "optimizer: none"
    lines = []
    for optimizer in optimizers:
        groups = optimizer.param_groups
        count = sum(p.numel() for g in groups for p in g["params"])
        lrs = sorted({g.get("initial_lr", g.get("lr")) for g in groups if g.get("lr") is not None})
        lr = f", lr {', '.join(f'{x:g}' for x in lrs)}" if lrs else ""
        lines.append(
            f"optimizer: {type(optimizer).__module__}.{type(optimizer).__qualname__} | params: {count:,} "
            f"in {len(groups)} group(s){lr}"
        )
    return "\n".join(lines)


def untrained_parameters(
    pl_module: L.LightningModule, optimizers: Sequence[torch.optim.Optimizer]
) -> list[str]:
    """Names of the declared-trainable parameters that no optimizer holds (they would never change).

    Strategies whose optimizers hold flattened copies instead of the module's parameters
    (DeepSpeed, FSDP1) cannot be checked this way: nothing is reported for them.
    """
    held = {id(p) for optimizer in optimizers for g in optimizer.param_groups for p in g["params"]}
    if not held & {id(p) for p in pl_module.parameters()}:
        return []
    return [name for name, p in trainable_named_parameters(pl_module) if id(p) not in held]


def _shown_path(path: str | os.PathLike[str]) -> str:
    """``path`` relative to the current directory when it lies below it, else absolute."""
    absolute = Path(os.path.abspath(path))
    try:
        return str(absolute.relative_to(Path.cwd()))
    except ValueError:
        return str(absolute)


def _scalar(value: Any) -> float | None:
    if value is None:
        return None
    return float(value.item() if hasattr(value, "item") else value)


def describe_checkpoints(trainer: L.Trainer) -> list[str]:
    """Lines naming each ``ModelCheckpoint``'s best checkpoint (with its monitored value) and last one."""
    lines = []
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, ModelCheckpoint):
            continue
        monitor = callback.monitor
        best = callback.best_model_path
        if monitor and best:
            score = _scalar(callback.best_model_score)
            value = f" ({monitor} {score:.4f})" if score is not None else ""
            lines.append(f"best checkpoint{value}: {_shown_path(best)}")
        elif best:
            lines.append(f"checkpoint: {_shown_path(best)}")
        last = callback.last_model_path
        if last and last != best:
            current = _scalar(trainer.callback_metrics.get(monitor)) if monitor else None
            value = f" ({monitor} {current:.4f})" if current is not None else ""
            lines.append(f"last checkpoint{value}: {_shown_path(last)}")
    return lines


def run_folder(trainer: L.Trainer) -> str:
    """The run's own folder: where Lightning puts its ``checkpoints/`` (``save_dir/name/version``).

    The first logger's ``save_dir``, ``name`` and ``version`` (a wandb run's id), as
    ``ModelCheckpoint`` names its default folder; ``default_root_dir`` without a logger.
    """
    if not trainer.loggers:
        return trainer.default_root_dir
    logger = trainer.loggers[0]
    version = logger.version
    version = version if isinstance(version, str) else f"version_{version}"
    return os.path.join(logger.save_dir or trainer.default_root_dir, str(logger.name), version)


def describe_run_files(trainer: L.Trainer) -> list[str]:
    """Lines saying where the run's files went: its folder and, with wandb, the wandb run folder."""
    lines = []
    if trainer.loggers:
        lines.append(f"run folder (config.yaml, checkpoints/): {_shown_path(run_folder(trainer))}")
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            folder = getattr(getattr(logger.experiment, "settings", None), "sync_dir", None)
            if folder and os.path.isdir(folder):  # WANDB_MODE=disabled names a folder it never writes
                lines.append(f"wandb run: {_shown_path(folder)}")
    return lines


def format_metrics(metrics: dict[str, Any], prefix: str = "val") -> str:
    """Format the metrics whose name starts with ``prefix`` as a two-column text table."""
    rows = []
    for name in sorted(metrics):
        if not name.startswith(prefix):
            continue
        value = metrics[name]
        value = float(value.item() if hasattr(value, "item") else value)
        rows.append((name, f"{value:.4f}" if math.isfinite(value) else str(value)))
    if not rows:
        return f"no {prefix} metrics were logged"
    width = max(len("metric"), *(len(n) for n, _ in rows))
    vwidth = max(len("value"), *(len(v) for _, v in rows))
    rule = f"+-{'-' * width}-+-{'-' * vwidth}-+"
    lines = ["last validation metrics", rule, f"| {'metric':<{width}} | {'value':>{vwidth}} |", rule]
    lines += [f"| {n:<{width}} | {v:>{vwidth}} |" for n, v in rows]
    lines.append(rule)
    return "\n".join(lines)


class RunConfig(SaveConfigCallback):
    """LightningCLI's config saving, into the run's own folder (beside its ``checkpoints/``).

    LightningCLI writes ``config.yaml`` to ``trainer.log_dir``, which for a wandb logger is
    its ``save_dir`` shared by every run (each run overwrote the previous one's config).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "save_to_log_dir": False})

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Write the config to ``run_folder(trainer)/config.yaml`` (rank 0 only)."""
        folder = run_folder(trainer)
        os.makedirs(folder, exist_ok=True)
        self.parser.save(
            self.config,
            os.path.join(folder, self.config_filename),
            skip_none=False,
            overwrite=self.overwrite,
            multifile=self.multifile,
        )
